"""The lazy registry: names bound to "module:Attribute", imported on first use, duplicates refused."""

from __future__ import annotations

import sys

import pytest

from xmr.errors import ConfigError
from xmr.registry import FORMATS, INDEX_BACKENDS, METHODS, TASKS, Registry


def test_entries_import_lazily_and_resolve(tmp_path, monkeypatch):
    (tmp_path / "xmr_plugin_mod.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("plug-in")
    registry.register("thing", "xmr_plugin_mod:Thing")
    assert "xmr_plugin_mod" not in sys.modules and "thing" in registry
    assert registry.get("thing").__name__ == "Thing" and "xmr_plugin_mod" in sys.modules
    assert registry.names() == ["thing"]


def test_duplicates_and_malformed_targets_are_refused():
    registry = Registry("plug-in")
    registry.register("a", "m:A")
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register("a", "m:B")
    with pytest.raises(ValueError, match="module:Attribute"):
        registry.register("b", "no_colon")


def test_unknown_names_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown method 'irrra' \(did you mean 'irra'\?\)"):
        METHODS.get("irrra")


def test_built_in_registrations():
    assert "irra" in METHODS and METHODS.get("irra").name == "irra"
    assert {"cuhk_pedes", "icfg_pedes", "rstpreid", "folder"} <= set(FORMATS.names())
    assert set(INDEX_BACKENDS.names()) == {"faiss", "milvus"}
    assert set(TASKS.names()) == {"person", "image_text", "composed"}
    for name in TASKS.names():
        assert TASKS.get(name)().name == name
