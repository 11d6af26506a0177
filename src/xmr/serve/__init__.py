"""HTTP search service and web page over a `xmr.search.retriever.Retriever`.

    from xmr.serve import ServeSettings, create_app, run
    run(xmr.load("gallery.index"), ServeSettings(port=8000, api_key="secret"))

Needs the `serve` extra (fastapi, uvicorn, python-multipart).
"""

from __future__ import annotations

from xmr.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run", "serve_in_thread"]


def __getattr__(name: str):
    if name in ("create_app", "run", "serve_in_thread"):
        from xmr.serve import api

        return getattr(api, name)
    raise AttributeError(f"module 'xmr.serve' has no attribute {name!r}")
