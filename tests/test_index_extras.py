"""Index side arrays and stored-row reads: add/remove/compaction/save/open (mmap) for every backend, errors,
old layouts, crash safety, and the index package's import structure."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xmr.index import FORMAT_VERSION, IndexStoreError, create_index, open_index, read_manifest, storage
from xmr.index.synthetic import clustered_vectors

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("faiss", reason="the faiss backend tests need faiss-cpu")

DIM = 16
KINDS = {
    "flat": {},
    "hnsw": {"efSearch": 256},
    "ivfpq": {"nlist": 8, "m": 4, "nbits": 4, "nprobe": 8, "train_min": 400},  # trains during the second add
}
N = 600


def _data(n: int = N, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Unit vectors and two side arrays per row: float region features (4, 3) and a bool flag."""
    rng = np.random.default_rng(seed)
    x = clustered_vectors(n, DIM, clusters=12, seed=seed)
    extras = {"regions": rng.standard_normal((n, 4, 3)).astype(np.float32), "flag": rng.random((n, 1)) < 0.5}
    return x, extras


def _paths(ids) -> list[str]:
    return [f"img/{i:05d}.jpg" for i in ids]


def _rows(extras: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {name: value[rows] for name, value in extras.items()}


def _check_rows(index, ids: np.ndarray, x: np.ndarray, extras: dict[str, np.ndarray]) -> None:
    """vectors(ids) and extras(ids) of an index whose id i holds row i of x / extras."""
    np.testing.assert_array_equal(index.vectors(ids), x[ids])  # the stored float32 vectors, bit for bit
    got = index.extras(ids)
    assert sorted(got) == ["flag", "regions"] and index.extra_names == ("regions", "flag")
    assert got["regions"].dtype == np.float16 and got["regions"].shape == (len(ids), 4, 3)
    np.testing.assert_allclose(got["regions"].astype(np.float32), extras["regions"][ids], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(got["regions"], extras["regions"][ids].astype(np.float16))
    assert got["flag"].dtype == np.bool_
    np.testing.assert_array_equal(got["flag"], extras["flag"][ids])


# ----------------------------------------------------------------------------------------------
# FAISS kinds
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_extras_and_vectors_round_trip_through_add_remove_save_open(kind, tmp_path):
    x, extras = _data()
    index = create_index(DIM, "m", kind=kind, params=KINDS[kind])
    index.add(x[:300], _paths(range(300)), _rows(extras, slice(0, 300)))
    index.add(x[300:500], _paths(range(300, 500)), _rows(extras, slice(300, 500)))
    removed = [0, 7, 299, 300, 450]
    assert index.remove(removed) == len(removed)
    live = np.setdiff1d(np.arange(500), removed)
    _check_rows(index, live, x, extras)
    _check_rows(index, np.array([499, 1, 1, 300 + 1]), x, extras)  # any order, repeats
    index.save(tmp_path / "idx")
    folder = storage.current_version(tmp_path / "idx")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["extras"] == [{"name": "regions", "shape": [4, 3], "dtype": "float16"},
                                  {"name": "flag", "shape": [1], "dtype": "bool"}]
    assert manifest["version"] == FORMAT_VERSION == 2
    on_disk = np.load(folder / "extra.regions.npy")
    assert on_disk.shape == (len(live), 4, 3) and on_disk.dtype == np.float16  # compacted with the vectors
    np.testing.assert_array_equal(on_disk, extras["regions"][live].astype(np.float16))
    _check_rows(index, live, x, extras)  # the saved index adopted the compacted rows
    for mmap in (False, True):
        reopened = open_index(tmp_path / "idx", mmap=mmap)
        assert isinstance(reopened._extras["regions"].parts[0], np.memmap) == mmap
        _check_rows(reopened, live, x, extras)
        with pytest.raises(KeyError, match="id 7"):
            reopened.extras([1, 7])
        with pytest.raises(KeyError, match="id 7"):
            reopened.vectors([7])
    # mapped base + appended rows, removals across both, compaction by the next save
    mapped = open_index(tmp_path / "idx", mmap=True)
    assert mapped.add(x[500:], _paths(range(500, N)), _rows(extras, slice(500, N))).tolist() == list(range(500, N))
    mapped.remove([1, 550])
    live = np.setdiff1d(np.arange(N), [*removed, 1, 550])
    _check_rows(mapped, live, x, extras)
    mapped.save()
    for mmap in (False, True):
        _check_rows(open_index(tmp_path / "idx", mmap=mmap), live, x, extras)


def test_vectors_and_extras_take_ids_of_any_shape(tmp_path):
    x, extras = _data(50)
    index = create_index(DIM, "m")
    index.add(x, _paths(range(50)), extras)
    ids = np.array([[3, 4, 5], [9, 0, 0]])  # e.g. a stage-1 shortlist (Q, K')
    assert index.vectors(ids).shape == (2, 3, DIM)
    np.testing.assert_array_equal(index.vectors(ids), x[ids])
    got = index.extras(ids, names=["regions"])
    assert list(got) == ["regions"] and got["regions"].shape == (2, 3, 4, 3)
    assert index.vectors([]).shape == (0, DIM) and index.extras([])["flag"].shape == (0, 1)
    assert index.vectors(range(2)).shape == (2, DIM)


def test_index_without_extras_reads_vectors_and_has_no_extra_names(tmp_path):
    x, _ = _data(40)
    index = create_index(DIM, "m", kind="hnsw")
    index.add(x, _paths(range(40)))
    assert index.extra_names == () and index.extras([1, 2]) == {}
    index.save(tmp_path / "idx")
    reopened = open_index(tmp_path / "idx", mmap=True)
    np.testing.assert_array_equal(reopened.vectors([5, 39]), x[[5, 39]])
    assert not [p for p in storage.current_version(tmp_path / "idx").iterdir() if p.name.startswith("extra.")]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_adding_rows_with_other_side_arrays_is_refused_and_changes_nothing():
    x, extras = _data(60)
    index = create_index(DIM, "m")
    index.add(x[:40], _paths(range(40)), _rows(extras, slice(0, 40)))
    more, paths = x[40:], _paths(range(40, 60))
    cases = {
        r"side array 'regions' \(per-row shape \(4, 3\), float16\) is missing": None,
        r"side array 'flag' .* is missing": {"regions": extras["regions"][40:]},
        r"'other' is not a side array of this index \(it keeps 'regions', 'flag'\)":
            {**_rows(extras, slice(40, 60)), "other": np.zeros((20, 2), np.float32)},
        r"add\(extras\)\['regions'\]: expected a numpy array of shape \(20, 4, 3\)":
            {**_rows(extras, slice(40, 60)), "regions": np.zeros((20, 4, 2), np.float32)},
        r"add\(extras\)\['regions'\]: expected a numpy array of shape \(20, 4, 3\) \(one row per vector\), got shape "
        r"\(19, 4, 3\)": {**_rows(extras, slice(40, 60)), "regions": extras["regions"][41:]},
        r"add\(extras\)\['flag'\]: this side array is stored as bool, got dtype float32":
            {**_rows(extras, slice(40, 60)), "flag": np.zeros((20, 1), np.float32)},
        r"add\(extras\)\['regions'\]: row 3 has NaN": {
            **_rows(extras, slice(40, 60)),
            "regions": np.where(np.arange(20)[:, None, None] == 3, np.nan, extras["regions"][40:]).astype(np.float32)},
        r"add\(extras\)\['regions'\]: row 5 has .*out-of-float16-range": {
            **_rows(extras, slice(40, 60)),
            "regions": np.where(np.arange(20)[:, None, None] == 5, 1e6, extras["regions"][40:]).astype(np.float32)},
        r"add\(extras\): expected a dict": [1, 2],
    }
    for message, bad in cases.items():
        with pytest.raises(IndexStoreError, match=message):
            index.add(more, paths, bad)
    assert len(index) == 40 and index._table.next_id == 40  # checked before any id was handed out
    assert all(rows.rows == 40 for rows in index._extras.values())
    index.add(more, paths, _rows(extras, slice(40, 60)))
    _check_rows(index, np.arange(60), x, extras)
    with pytest.raises(IndexStoreError, match=r"extras\(names\): 'nope' is not a side array"):
        index.extras([1], names=["nope"])
    with pytest.raises(KeyError, match="id -1"):
        index.vectors([3, -1])
    with pytest.raises(KeyError, match="id 60"):
        index.extras([60])
    with pytest.raises(IndexStoreError, match=r"vectors\(ids\): expected integer ids"):
        index.vectors([1.5])


def test_bad_side_array_names_and_dtypes_are_refused_on_first_add():
    x, _ = _data(10)
    for name, value, message in [
        ("bad-name", np.zeros((10, 2), np.float32), "side array name 'bad-name' must be a letter"),
        ("_x", np.zeros((10, 2), np.float32), "side array name '_x'"),
        ("text", np.array([["a"]] * 10), r"\['text'\]: dtype <U1 cannot be stored"),
        ("scalar", np.float32(1.0), r"\['scalar'\]: expected a numpy array of shape \(n, ...\)"),
    ]:
        index = create_index(DIM, "m")
        with pytest.raises(IndexStoreError, match=message):
            index.add(x, _paths(range(10)), {name: value})
        assert len(index) == 0 and index.extra_names == ()


def test_an_index_without_rows_takes_new_side_arrays(tmp_path):
    x, extras = _data(30)
    index = create_index(DIM, "m")
    index.add(x[:10], _paths(range(10)), {"regions": extras["regions"][:10]})
    index.remove(range(10))
    with pytest.raises(IndexStoreError, match="'regions'.* is missing"):  # tombstoned rows still hold them
        index.add(x[10:20], _paths(range(10, 20)))
    index.save(tmp_path / "idx")  # compacted: no rows left
    index.add(x[10:20], _paths(range(10, 20)), {"flag": extras["flag"][10:20]})
    assert index.extra_names == ("flag",)
    index.save()
    reopened = open_index(tmp_path / "idx")
    assert reopened.extra_names == ("flag",) and read_manifest(tmp_path / "idx").extras[0]["name"] == "flag"
    np.testing.assert_array_equal(reopened.extras(np.arange(10, 20))["flag"], extras["flag"][10:20])


@pytest.mark.parametrize("damage,message", [
    ("missing", r"extra\.regions\.npy: missing from the index's live version"),
    ("shape", r"extra\.regions\.npy: shape \(3, 4, 3\) does not match the 20 ids"),
    ("dtype", r"extra\.regions\.npy: expected dtype float16, found float32"),
    ("spec", r"manifest\.json: field 'extras' must list \{name, shape, dtype\}"),
    ("duplicate", r"manifest\.json: field 'extras' must be a list of side arrays with distinct names"),
])
def test_corrupt_side_arrays_name_the_file(damage, message, tmp_path):
    x, extras = _data(20)
    index = create_index(DIM, "m")
    index.add(x, _paths(range(20)), extras)
    folder = index.save(tmp_path / "idx")
    path, manifest = folder / "extra.regions.npy", json.loads((folder / "manifest.json").read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "shape":
        np.save(path, extras["regions"][:3].astype(np.float16))
    elif damage == "dtype":
        np.save(path, extras["regions"])
    elif damage == "spec":
        manifest["extras"][0]["dtype"] = "float32"  # floating side arrays are stored as float16 only
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "duplicate":
        manifest["extras"].append(manifest["extras"][0])
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStoreError, match=message):
        open_index(tmp_path / "idx")


# ----------------------------------------------------------------------------------------------
# Compatibility and crash safety
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_old_layout_index_without_extras_still_opens(kind, tmp_path):
    """A version-1 index (manifest without "extras", as xmr wrote before side arrays) opens and updates."""
    x, _ = _data(80)
    index = create_index(DIM, "m", kind=kind)
    index.add(x[:60], _paths(range(60)))
    folder = index.save(tmp_path / "idx")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["extras"]
    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    for mmap in (False, True):
        old = open_index(tmp_path / "idx", mmap=mmap)
        assert old.manifest.version == 1 and old.extra_names == () and len(old) == 60
        np.testing.assert_array_equal(old.vectors([0, 59]), x[[0, 59]])
        np.testing.assert_array_equal(old.search(x[:3], 1)[1][:, 0], [0, 1, 2])
    with pytest.raises(IndexStoreError, match="'regions' is not a side array of this index"):
        old.add(x[60:], _paths(range(60, 80)), {"regions": np.zeros((20, 2), np.float32)})
    old.add(x[60:], _paths(range(60, 80)))
    old.save()
    assert read_manifest(tmp_path / "idx").version == FORMAT_VERSION and len(open_index(tmp_path / "idx")) == 80


@pytest.mark.parametrize("stage", ["file:extra.regions.npy", "file:extra.flag.npy", "manifest", "current-tmp"])
def test_failure_while_writing_side_arrays_keeps_previous_version(stage, tmp_path, monkeypatch):
    x, extras = _data(100)
    index = create_index(DIM, "m")
    index.add(x[:60], _paths(range(60)), _rows(extras, slice(0, 60)))
    index.save(tmp_path / "idx")
    index.remove([0, 1])
    index.add(x[60:], _paths(range(60, 100)), _rows(extras, slice(60, 100)))

    def boom(name):
        if name == stage:
            raise RuntimeError(f"simulated crash at {name}")

    monkeypatch.setattr(storage, "crash_hook", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        index.save()
    monkeypatch.setattr(storage, "crash_hook", None)
    before = open_index(tmp_path / "idx")
    assert len(before) == 60
    _check_rows(before, np.arange(60), x, extras)
    index.save()  # the in-memory index is intact
    _check_rows(open_index(tmp_path / "idx", mmap=True), np.arange(2, 100), x, extras)


def test_killed_while_writing_side_arrays_leaves_the_old_version(tmp_path):
    x, extras = _data(50)
    index = create_index(DIM, "m")
    index.add(x[:30], _paths(range(30)), _rows(extras, slice(0, 30)))
    index.save(tmp_path / "idx")
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from xmr.index import open_index
        index = open_index(sys.argv[1], mmap=True)
        index.add(np.eye(1, 16, dtype=np.float32), ["new.jpg"],
                  {"regions": np.ones((1, 4, 3), np.float32), "flag": np.ones((1, 1), bool)})
        index.save()
        print("survived")
    """)
    env = {**os.environ, storage.CRASH_ENV: "file:extra.flag.npy", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "idx")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr
    reopened = open_index(tmp_path / "idx")
    assert len(reopened) == 30
    _check_rows(reopened, np.arange(30), x, extras)


# ----------------------------------------------------------------------------------------------
# Milvus Lite
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory) -> str:
    pytest.importorskip("pymilvus", reason="the milvus backend tests need pymilvus")
    pytest.importorskip("milvus_lite", reason="the milvus backend tests need milvus-lite (pip install milvus-lite)")
    return str(tmp_path_factory.mktemp("milvus") / "extras.db")


@pytest.mark.parametrize("kind", ["FLAT", "HNSW"])
def test_milvus_keeps_side_arrays_locally_and_reads_vectors_by_id(kind, milvus_uri, tmp_path):
    x, extras = _data(300)
    index = create_index(DIM, "m", backend="milvus", kind=kind,
                         params={"uri": milvus_uri, "collection": f"extras_{kind.lower()}"})
    index.add(x[:200], _paths(range(200)), _rows(extras, slice(0, 200)))
    index.add(x[200:250], _paths(range(200, 250)), _rows(extras, slice(200, 250)))
    index.remove([3, 210])
    live = np.setdiff1d(np.arange(250), [3, 210])
    _check_rows(index, live, x, extras)
    with pytest.raises(KeyError, match="id 3"):
        index.vectors([3])
    with pytest.raises(IndexStoreError, match="is missing"):
        index.add(x[250:], _paths(range(250, 300)))
    folder = index.save(tmp_path / "idx")
    assert np.load(folder / "extra.regions.npy").shape == (len(live), 4, 3)
    for mmap in (False, True):
        reopened = open_index(tmp_path / "idx", mmap=mmap)
        assert isinstance(reopened._extras["regions"].parts[0], np.memmap) == mmap
        _check_rows(reopened, live, x, extras)
        np.testing.assert_array_equal(reopened.vectors(np.array([[5, 6], [249, 5]])), x[[[5, 6], [249, 5]]])
    reopened.add(x[250:], _paths(range(250, 300)), _rows(extras, slice(250, 300)))
    reopened.remove([0])
    reopened.save()
    _check_rows(open_index(tmp_path / "idx", mmap=True), np.setdiff1d(np.arange(300), [0, 3, 210]), x, extras)


# ----------------------------------------------------------------------------------------------
# Module structure
# ----------------------------------------------------------------------------------------------
def _xmr_imports(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("xmr.")}


def test_index_modules_import_one_way():
    src = REPO / "src" / "xmr" / "index"
    assert _xmr_imports(src / "base.py") == {"xmr.errors", "xmr.index.rows", "xmr.registry"}
    assert _xmr_imports(src / "rows.py") == set()
    assert _xmr_imports(src / "storage.py") == {"xmr.atomic", "xmr.index.base"}
    for backend in ("faiss_index.py", "milvus_index.py"):
        assert "xmr.index.factory" not in _xmr_imports(src / backend)
    code = textwrap.dedent("""
        import sys
        import xmr.index
        loaded = [m for m in ("xmr.index.faiss_index", "xmr.index.milvus_index") if m in sys.modules]
        assert not loaded, loaded  # backends load on first use, through the registry
        from xmr.index import create_index, open_index, read_manifest
        from xmr.registry import INDEX_BACKENDS
        assert INDEX_BACKENDS.get("faiss") is type(create_index(8, "m"))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout.strip() == "ok", proc.stderr
