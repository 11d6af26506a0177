"""Command line: `xmr train | evaluate | demo` (cli/app.py) and `xmr embed | index | search | serve` (cli/search.py)."""

from xmr.cli.app import app, main

__all__ = ["app", "main"]
