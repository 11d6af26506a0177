"""xmr: cross-modal retrieval toolkit."""

__version__ = "0.1.0"
