"""Exceptions with messages meant for people: each names the file, field or argument at fault."""

from __future__ import annotations


class XmrError(Exception):
    """Base class: the CLI prints these without a traceback (unless --debug)."""


class ConfigError(XmrError):
    """A configuration file, field or override is invalid."""


class DataError(XmrError):
    """An annotation file, record or image is missing or malformed."""


class CheckpointError(XmrError):
    """A checkpoint file is missing, truncated, of an unknown format or does not fit the model."""


class UnsupportedQuery(XmrError):
    """The model cannot answer this kind of query (e.g. image + text on a text-to-image model)."""
