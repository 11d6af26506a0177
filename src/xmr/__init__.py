"""xmr: cross-modal retrieval toolkit."""

__version__ = "0.1.0"


def load(index, checkpoint=None, **kwargs):
    """Open an index for search: ``xmr.load("gallery.index").search_text("a man in a red jacket")``.

    See `xmr.search.retriever.load` for the arguments.
    """
    from xmr.search.retriever import load as _load

    return _load(index, checkpoint, **kwargs)
