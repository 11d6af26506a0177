"""Search your own images: embed a collection, index it, and query it (two stages) from Python, CLI and HTTP."""
