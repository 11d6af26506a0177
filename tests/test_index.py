"""Vector indexes (xmr.index): exactness, ANN recall, mutation, persistence, crash safety, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xmr.index import (
    FORMAT_VERSION,
    IndexStoreError,
    Manifest,
    create_index,
    open_index,
    read_manifest,
    storage,
)
from xmr.index.synthetic import clustered_vectors, exact_topk, recall_at_k, sample_queries

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("faiss", reason="the faiss backend tests need faiss-cpu")

KINDS = {
    "flat": {},
    "hnsw": {"efSearch": 256},
    "ivfpq": {"nlist": 16, "m": 8, "nbits": 5, "nprobe": 16, "train_min": 1250},  # trains once 1250 are in
}
DIM = 32


def _data(n: int = 1500, dim: int = DIM, nq: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    kw = {"dim": dim, "clusters": 30, "seed": seed}
    return clustered_vectors(n, **kw), sample_queries(nq, **kw)


def _paths(ids) -> list[str]:
    return [f"img/{i:05d}.jpg" for i in ids]


def _build(kind: str, x: np.ndarray, **params) -> object:
    index = create_index(x.shape[1], "model-a", kind=kind, params={**KINDS[kind], **params},
                         extra={"images_root": "/data/imgs"})
    index.add(x, _paths(range(len(x))))
    return index


def _exact_ids(base: np.ndarray, base_ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, rows = exact_topk(base, queries, k)
    return scores, base_ids[rows]


def _snapshot(index) -> tuple:
    return dict(index.items()), index.ids().tolist(), len(index), index.manifest.count


@pytest.fixture(scope="module")
def clustered_20k() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kw = {"dim": 128, "clusters": 200}
    x, q = clustered_vectors(20_000, **kw), sample_queries(200, **kw)
    return x, q, exact_topk(x, q, 10)[1]


# ----------------------------------------------------------------------------------------------
# Search quality
# ----------------------------------------------------------------------------------------------
def test_flat_equals_brute_force():
    x, q = _data(3000, 64, nq=40)
    index = _build("flat", x[:2000])
    index.add(x[2000:], _paths(range(2000, 3000)))  # two adds: two parts searched and merged
    scores, ids = index.search(q, 15)
    ref_scores, ref_ids = _exact_ids(x, np.arange(3000), q, 15)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert np.all(np.diff(scores, axis=1) <= 0)
    one_s, one_i = index.search(q[3], 15)  # a 1-D query is one row
    np.testing.assert_array_equal(one_i, ref_ids[3:4])
    np.testing.assert_allclose(one_s, ref_scores[3:4], atol=1e-5)


def test_padding_when_fewer_items_than_k():
    x, q = _data(5)
    for kind, params in KINDS.items():
        index = create_index(DIM, "m", kind=kind, params=params)
        s, i = index.search(q[:2], 3)  # empty index
        assert (i == -1).all() and np.isneginf(s).all()
        index.add(x, _paths(range(5)))
        index.remove([1])
        s, i = index.search(q[:2], 7)
        assert i.shape == (2, 7) and (i[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all()
        assert sorted(i[0, :4].tolist()) == [0, 2, 3, 4]


def test_hnsw_recall_at_10(clustered_20k):
    x, q, truth = clustered_20k
    index = create_index(128, "m", kind="hnsw")  # defaults: M=32, efConstruction=80, efSearch=128
    index.add(x, _paths(range(len(x))))
    _, ids = index.search(q, 10)
    assert recall_at_k(ids, truth) >= 0.98


def test_ivfpq_recall_with_rerank(clustered_20k):
    x, q, truth = clustered_20k
    recalls = {}
    for rerank in (0, None):
        index = create_index(128, "m", kind="ivfpq", params={"nlist": 64, "m": 16, "rerank": rerank})
        index.add(x[:5000], _paths(range(5000)))  # below train_min (39 * 256): buffered, searched exactly
        _s, i = index.search(q[:20], 10)
        _ref_s, ref_i = exact_topk(x[:5000], q[:20], 10)
        np.testing.assert_array_equal(i, ref_i)
        index.add(x[5000:], _paths(range(5000, len(x))))  # reaches train_min: trains and indexes all
        _, ids = index.search(q, 10)
        recalls[rerank] = recall_at_k(ids, truth)
    assert recalls[None] >= 0.9  # exact re-ranking of 10*k PQ candidates
    assert 0.3 < recalls[0] < recalls[None]  # raw PQ scores are far coarser


def test_hnsw_removals_are_never_returned_and_results_stay_exact(tmp_path):
    x, q = _data(1500)
    index = _build("hnsw", x, efSearch=512)
    rng = np.random.default_rng(1)
    _, top = index.search(q, 3)
    removed = np.union1d(top.ravel(), rng.choice(1500, 400, replace=False))  # the best hits among them
    assert index.remove(removed.tolist() + [99_999]) == len(removed)  # unknown ids are ignored
    assert index.remove(removed[:5]) == 0  # already removed
    keep = np.setdiff1d(np.arange(1500), removed)
    ref_s, ref_i = _exact_ids(x[keep], keep, q, 10)

    def check(idx):
        s, i = idx.search(q, 10)
        assert not np.isin(i, removed).any()
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, atol=1e-5)

    check(index)
    with pytest.raises(KeyError):
        index.path(int(removed[0]))
    index.save(tmp_path / "idx")
    check(index)
    reopened = open_index(tmp_path / "idx")
    check(reopened)
    assert reopened._index.ntotal == len(keep)  # compacted: the removed vectors are gone from the graph
    assert len(np.load(storage.current_version(tmp_path / "idx") / "vectors.npy")) == len(keep)


# ----------------------------------------------------------------------------------------------
# Mutation and persistence
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_add_remove_search_round_trip(kind, tmp_path):
    x, _q = _data(1600)
    index = _build(kind, x[:1200])
    assert index.ids().tolist() == list(range(1200)) and len(index) == 1200
    assert index.remove([3, 5, 5, 7, -1, 5000]) == 3
    new = index.add(x[1200:1400], _paths(range(1200, 1400)))
    assert new.tolist() == list(range(1200, 1400)) and len(index) == 1397
    assert index.path(1300) == "img/01300.jpg"
    assert 5 not in dict(index.items()) and index.ids()[:5].tolist() == [0, 1, 2, 4, 6]
    _, ids = index.search(x[5], 1)
    assert ids[0, 0] != 5
    _, ids = index.search(x[1300], 1)
    assert ids[0, 0] == 1300  # a vector finds itself
    index.save(tmp_path / "idx")
    reopened = open_index(tmp_path / "idx")
    more = reopened.add(x[1400:], _paths(range(1400, 1600)))
    assert more[0] == 1400  # ids continue after reload: never reused even though 3, 5, 7 were removed
    reopened.remove(range(1400, 1600))
    assert reopened.add(x[:1], ["again.jpg"]).tolist() == [1600]


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip(kind, tmp_path):
    x, q = _data()
    index = _build(kind, x)
    index.remove([10, 20])
    before = index.search(q, 10)
    folder = index.save(tmp_path / "idx")
    assert folder.name == "v000001" and (tmp_path / "idx" / "CURRENT").read_text().strip() == "v000001"
    for mmap in (False, True):
        reopened = open_index(tmp_path / "idx", mmap=mmap)
        m = reopened.manifest
        assert (m.model_id, m.dim, m.kind, m.backend, m.count, m.next_id) == ("model-a", DIM, kind, "faiss", 1498, 1500)
        assert m.extra == {"images_root": "/data/imgs"} and m.version == FORMAT_VERSION
        assert {k: m.params[k] for k in KINDS[kind]} == KINDS[kind]
        assert _snapshot(reopened) == _snapshot(index)
        after = reopened.search(q, 10)
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    index.add(x[:3], ["a", "b", "c"])
    assert index.save().name == "v000002"  # saves where it was saved before
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["CURRENT", "v000002"]  # old version gone
    assert read_manifest(tmp_path / "idx").count == 1501


def test_mmap_flat_searches_in_bounded_blocks(tmp_path, monkeypatch):
    from xmr.index import faiss_index

    x, q = _data(3000)
    _build("flat", x).save(tmp_path / "idx")
    ref = open_index(tmp_path / "idx").search(q, 10)
    monkeypatch.setattr(faiss_index, "MMAP_BLOCK_ROWS", 256)  # many blocks: exercises the merge
    mapped = open_index(tmp_path / "idx", mmap=True)
    assert all(isinstance(p, np.memmap) for p in mapped._vectors.parts)
    got = mapped.search(q, 10)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
    # mutations on a mapped index: removals span blocks, additions live in memory, save re-maps
    mapped.remove(ref[1][:, 0])
    mapped.add(q[:2], ["q0", "q1"])
    s, i = mapped.search(q[:2], 1)
    assert i[:, 0].tolist() == [3000, 3001] and np.allclose(s[:, 0], 1, atol=1e-5)
    mapped.save()
    again = open_index(tmp_path / "idx", mmap=True)
    np.testing.assert_array_equal(again.search(q, 10)[1], mapped.search(q, 10)[1])


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_mmap_opens_the_faiss_structure_mapped_and_answers_the_same(kind, tmp_path):
    x, q = _data(1600)
    index = _build(kind, x[:1400])
    index.remove([4, 9])
    index.save(tmp_path / "idx")
    plain, mapped = open_index(tmp_path / "idx"), open_index(tmp_path / "idx", mmap=True)
    assert mapped._faiss_file is not None and plain._faiss_file is None  # mapped from the version folder
    assert all(isinstance(p, np.memmap) for p in mapped._vectors.parts)

    def same(a, b):
        (sa, ia), (sb, ib) = a.search(q, 10), b.search(q, 10)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, atol=1e-6)

    same(plain, mapped)
    for one in q[:3]:  # single queries too
        np.testing.assert_array_equal(mapped.search(one, 10)[1], plain.search(one, 10)[1])
    # an unchanged mapped index saves by copying its file; the copy reopens identically
    mapped.save(tmp_path / "copy")
    same(plain, open_index(tmp_path / "copy"))
    # mutations: a mapped FAISS structure is read-only, so the first one reads it into memory
    top = plain.search(q, 1)[1][:, 0]
    for idx in (plain, mapped):
        assert idx.remove(top) == len(np.unique(top))
        idx.add(x[1400:], _paths(range(1400, 1600)))
    assert mapped._faiss_file is None
    same(plain, mapped)
    assert not np.isin(mapped.search(q, 10)[1], np.r_[top, 4, 9]).any()  # removed stay removed
    assert mapped.save().parent == tmp_path / "copy"  # where it was saved last
    same(mapped, open_index(tmp_path / "copy", mmap=True))


def test_ivfpq_auto_trains_at_save_with_parameters_by_size(tmp_path):
    from xmr.index.faiss_index import auto_ivf_min, auto_ivf_params

    kw = {"dim": 32, "clusters": 60}
    x, q = clustered_vectors(3000, **kw), sample_queries(50, **kw)
    index = create_index(32, "m", kind="ivfpq", params={"m": 8, "nbits": 6})  # nlist, nprobe: by size
    assert index.manifest.params["nlist"] is None and index.manifest.params["nprobe"] is None
    index.add(x, _paths(range(len(x))))
    _, exact_i = exact_topk(x, q, 10)
    _, i = index.search(q, 10)  # not trained yet: exact
    np.testing.assert_array_equal(i, exact_i)
    assert auto_ivf_min(6) == 39 * 64 <= len(x)
    index.save(tmp_path / "idx")
    p = read_manifest(tmp_path / "idx").params
    assert (p["nlist"], p["nprobe"]) == (64, 16) == tuple(auto_ivf_params(3000, 6).values())
    assert index._ivf_trained() and index._index.nlist == 64
    _, i = index.search(q, 10)
    assert recall_at_k(i, exact_i) >= 0.9
    reopened = open_index(tmp_path / "idx")
    np.testing.assert_array_equal(reopened.search(q, 10)[1], i)
    # too few vectors to train: saved and reopened as an exact buffer
    small = create_index(32, "m", kind="ivfpq", params={"m": 8, "nbits": 6})
    small.add(x[:500], _paths(range(500)))
    small.save(tmp_path / "small")
    again = open_index(tmp_path / "small")
    assert again._index is None and again.manifest.params["nlist"] is None
    np.testing.assert_array_equal(again.search(q, 5)[1], exact_topk(x[:500], q, 5)[1])


@pytest.mark.parametrize("n,nlist,nprobe", [(1_000_000, 2048, 16), (100_000, 512, 16), (12_000, 256, 16),
                                            (3000, 64, 16), (100, 2, 2)])
def test_auto_ivf_params_rule(n, nlist, nprobe):
    from xmr.index.faiss_index import auto_ivf_params

    assert auto_ivf_params(n) == {"nlist": nlist, "nprobe": nprobe}


@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_search_equals_single_queries(kind):
    x, q = _data(1500, nq=30)
    index = _build(kind, x)
    scores, ids = index.search(q, 10)
    assert ids.shape == (30, 10)
    for n in (0, 7, 29):
        s1, i1 = index.search(q[n], 10)
        np.testing.assert_array_equal(i1[0], ids[n])
        np.testing.assert_allclose(s1[0], scores[n], atol=1e-5)


def test_unsaved_index_needs_a_directory():
    index = create_index(DIM, "m")
    with pytest.raises(IndexStoreError, match="pass the directory"):
        index.save()


# ----------------------------------------------------------------------------------------------
# Crash safety
# ----------------------------------------------------------------------------------------------
STAGES = ["begin", "file:ids.npy", "file:vectors.npy", "manifest", "renamed", "current-tmp"]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_failure_during_save_keeps_previous_version(kind, tmp_path, monkeypatch):
    x, q = _data(600)
    index = _build(kind, x[:400])
    index.save(tmp_path / "idx")
    before = open_index(tmp_path / "idx")
    expected, expected_search = _snapshot(before), before.search(q, 5)
    index.remove([0, 1, 2])
    index.add(x[400:], _paths(range(400, 600)))
    for stage in STAGES:
        def boom(name, stage=stage):
            if name == stage:
                raise RuntimeError(f"simulated crash at {name}")

        monkeypatch.setattr(storage, "crash_hook", boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            index.save()
        monkeypatch.setattr(storage, "crash_hook", None)
        reopened = open_index(tmp_path / "idx")
        assert _snapshot(reopened) == expected, stage
        np.testing.assert_array_equal(reopened.search(q, 5)[1], expected_search[1])
        assert not [p for p in (tmp_path / "idx").iterdir() if p.name.startswith(".tmp-")]  # cleaned up
    index.save()  # the in-memory index is intact and saves fine afterwards
    assert len(open_index(tmp_path / "idx")) == 597


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from xmr.index import open_index
    index = open_index(sys.argv[1])
    index.remove([0, 1])
    index.add(np.eye(1, {dim}, dtype=np.float32), ["new.jpg"])
    index.save()
    print("survived")
""")


@pytest.mark.parametrize("stage,survives_as", [("file:vectors.npy", "old"), ("renamed", "old"),
                                               ("current-tmp", "old"), ("current", "new")])
def test_killed_during_save_leaves_a_loadable_index(stage, survives_as, tmp_path):
    x, q = _data(300)
    index = _build("hnsw", x)
    index.save(tmp_path / "idx")
    old = _snapshot(open_index(tmp_path / "idx"))
    env = {**os.environ, storage.CRASH_ENV: stage, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT.format(dim=DIM), str(tmp_path / "idx")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr  # SIGKILLed mid-save
    reopened = open_index(tmp_path / "idx")
    if survives_as == "old":
        assert _snapshot(reopened) == old
    else:
        assert len(reopened) == 299 and reopened.path(300) == "new.jpg" and 0 not in dict(reopened.items())
    np.testing.assert_array_equal(reopened.search(q, 3)[1], exact_topk_ids(reopened, q, 3))
    assert not [p for p in (tmp_path / "idx").iterdir() if p.name.startswith(".tmp-")]  # dead writer's temp cleaned
    reopened.add(x[:1], ["later.jpg"])
    reopened.save()  # and it saves normally over the debris
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("v")] == [
        storage.current_version(tmp_path / "idx").name]


def exact_topk_ids(index, q: np.ndarray, k: int) -> np.ndarray:
    ids = index.ids()
    vectors = np.concatenate(list(index._vectors.live_chunks(index._table.live_mask())))
    return _exact_ids(vectors, ids, q, k)[1]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_invalid_arguments_raise_index_store_error():
    x, q = _data(50)
    index = _build("flat", x)
    bad_adds = {
        "shape (n, 32)": (x[:, :16].copy(), _paths(range(50))),
        "float32": (x.astype(np.float64), _paths(range(50))),
        "NaN": (np.where(np.arange(50)[:, None] == 7, np.nan, x).astype(np.float32), _paths(range(50))),
        "one per vector": (x, _paths(range(49))),
        "numpy array": (x.tolist(), _paths(range(50))),
    }
    for message, (vectors, paths) in bad_adds.items():
        with pytest.raises(IndexStoreError, match="add\\((vectors|paths)\\).*" + message.split()[0]):
            index.add(vectors, paths)
    assert len(index) == 50  # nothing was added by the failed calls
    with pytest.raises(IndexStoreError, match="row 7"):
        index.add(np.where(np.arange(50)[:, None] == 7, np.inf, x).astype(np.float32), _paths(range(50)))
    for k in (0, -1, 2.5, True):
        with pytest.raises(IndexStoreError, match="search\\(k\\)"):
            index.search(q, k)
    for queries in (q[:, :5], q[None], q.astype(np.int32), np.full((1, DIM), np.nan, np.float32)):
        with pytest.raises(IndexStoreError, match="search\\(queries\\)"):
            index.search(queries, 3)
    with pytest.raises(IndexStoreError, match="unknown key"):
        create_index(DIM, "m", kind="hnsw", params={"ef": 10})
    with pytest.raises(IndexStoreError, match="must divide"):
        create_index(30, "m", kind="ivfpq", params={"m": 8})
    with pytest.raises(IndexStoreError, match="faiss backend offers"):
        create_index(DIM, "m", kind="lsh")
    with pytest.raises(IndexStoreError, match="backend"):
        create_index(DIM, "m", backend="annoy")


def _saved(tmp_path: Path) -> Path:
    x, _ = _data(40)
    _build("flat", x).save(tmp_path / "idx")
    return tmp_path / "idx"


def test_opening_something_else_fails_clearly(tmp_path):
    with pytest.raises(IndexStoreError, match="no such index directory"):
        open_index(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(IndexStoreError, match=r"plain is not an xmr index \(no CURRENT file\)"):
        open_index(tmp_path / "plain")
    with pytest.raises(IndexStoreError, match="not an index directory"):
        open_index(tmp_path / "plain" / "photo.jpg")


@pytest.mark.parametrize("damage,message", [
    ("manifest-json", r"manifest\.json: unreadable or not valid JSON"),
    ("future-version", r"manifest\.json: index format version 99 was written by a newer xmr"),
    ("missing-field", r"manifest\.json: required field 'dim' is missing"),
    ("bad-field", r"manifest\.json: field 'dim' must be a positive integer"),
    ("current", r"CURRENT names v000007, but .*v000007.manifest\.json is missing"),
    ("current-garbage", r"CURRENT: expected a version folder name"),
    ("vectors", r"vectors\.npy: unreadable or truncated"),
    ("ids", r"ids\.npy: missing from the index"),
    ("paths", r"paths\.json: expected a JSON list of 40"),
    ("count", r"manifest\.json: count=41 but ids\.npy holds 40"),
])
def test_corrupt_index_errors_name_the_file(damage, message, tmp_path):
    root = _saved(tmp_path)
    folder = storage.current_version(root)
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "manifest-json":
        (folder / "manifest.json").write_text('{"model_id": ')
    elif damage == "future-version":
        (folder / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    elif damage == "missing-field":
        (folder / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "dim"}))
    elif damage == "bad-field":
        (folder / "manifest.json").write_text(json.dumps({**manifest, "dim": "512"}))
    elif damage == "current":
        (root / "CURRENT").write_text("v000007\n")
    elif damage == "current-garbage":
        (root / "CURRENT").write_text("../../etc\n")
    elif damage == "vectors":
        (folder / "vectors.npy").write_bytes((folder / "vectors.npy").read_bytes()[:200])
    elif damage == "ids":
        (folder / "ids.npy").unlink()
    elif damage == "paths":
        (folder / "paths.json").write_text('["a"]')
    elif damage == "count":
        (folder / "manifest.json").write_text(json.dumps({**manifest, "count": 41}))
    with pytest.raises(IndexStoreError, match=message):
        open_index(root)


def test_manifest_validation():
    m = Manifest(model_id="abc", dim=8, params={"M": 4}, extra={"images_root": "/x"})
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict())), "m.json") == m
    with pytest.raises(IndexStoreError, match="m.json: expected a JSON object"):
        Manifest.from_dict([1], "m.json")
    with pytest.raises(IndexStoreError, match="m.json: field 'metric'"):
        Manifest.from_dict({**m.to_dict(), "metric": "l2"}, "m.json")
    with pytest.raises(IndexStoreError, match="m.json: field 'backend'"):
        Manifest.from_dict({**m.to_dict(), "backend": "annoy"}, "m.json")
    assert Manifest.from_dict({**m.to_dict(), "added_later": 1}, "m.json") == m  # unknown keys: ignored


def test_import_is_lazy_and_missing_backends_say_what_to_install():
    code = textwrap.dedent("""
        import sys
        import xmr.index
        assert "faiss" not in sys.modules and "pymilvus" not in sys.modules, "imported eagerly"
        sys.modules["faiss"] = None  # as if not installed
        sys.modules["pymilvus"] = None
        from xmr.index import IndexStoreError, create_index
        for backend, hint in (("faiss", "pip install faiss-cpu"), ("milvus", "pip install pymilvus milvus-lite")):
            try:
                create_index(8, "m", backend=backend, params={"uri": "/tmp/none.db"} if backend == "milvus" else None)
            except IndexStoreError as e:
                assert hint in str(e), e
            else:
                raise AssertionError(backend)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_synthetic_vectors_are_seeded_unit_and_clustered():
    a = clustered_vectors(500, 64, clusters=10, seed=3)
    np.testing.assert_array_equal(a, clustered_vectors(500, 64, clusters=10, seed=3))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    q = sample_queries(50, 64, clusters=10, seed=3)
    assert not np.allclose(q, a[:50])
    top, _ = exact_topk(a, q, 1)
    assert top.mean() > 0.6 > float(np.abs(q @ clustered_vectors(500, 64, clusters=10, seed=4).T).mean())


# ----------------------------------------------------------------------------------------------
# Milvus (Milvus Lite in a temporary folder)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory) -> str:
    pytest.importorskip("pymilvus", reason="the milvus backend tests need pymilvus")
    pytest.importorskip("milvus_lite", reason="the milvus backend tests need milvus-lite (pip install milvus-lite)")
    return str(tmp_path_factory.mktemp("milvus") / "shared.db")  # one Milvus Lite server for the module


@pytest.mark.parametrize("kind", ["FLAT", "HNSW"])
def test_milvus_round_trip(kind, milvus_uri, tmp_path):
    x, q = _data(800)
    index = create_index(DIM, "model-a", backend="milvus", kind=kind,
                         params={"uri": milvus_uri, "collection": f"rt_{kind.lower()}"})
    assert index.add(x, _paths(range(800))).tolist() == list(range(800))
    ref_s, ref_i = _exact_ids(x, np.arange(800), q, 10)
    s, i = index.search(q, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    removed = np.unique(i[:, :2])
    assert index.remove(removed) == len(removed) and index.remove(removed) == 0
    keep = np.setdiff1d(np.arange(800), removed)
    ref_s, ref_i = _exact_ids(x[keep], keep, q, 10)
    np.testing.assert_array_equal(index.search(q, 10)[1], ref_i)  # tombstones filtered before save
    index.save(tmp_path / "idx")
    reopened = open_index(tmp_path / "idx")
    assert _snapshot(reopened) == _snapshot(index) and reopened.manifest.kind == kind
    s, i = reopened.search(q, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    client = reopened._conn
    assert client.get_collection_stats(f"rt_{kind.lower()}")["row_count"] == len(keep)  # deleted after save
    assert reopened.add(x[:1], ["new.jpg"]).tolist() == [800]


def test_milvus_default_uri_lives_in_the_index_dir_and_strays_are_ignored(milvus_uri, tmp_path):
    x, _q = _data(300)
    index = create_index(DIM, "m", backend="milvus")  # default: INDEX/milvus.db, relative in the manifest
    with pytest.raises(IndexStoreError, match="save\\(directory\\) it first"):
        index.add(x, _paths(range(300)))
    index.save(tmp_path / "idx")
    index.add(x[:200], _paths(range(200)))
    index.save()
    assert (tmp_path / "idx" / "milvus.db").exists() and read_manifest(tmp_path / "idx").params["uri"] == "milvus.db"
    # a writer that adds but dies before saving leaves strays in Milvus: they must not surface
    index.add(x[200:], _paths(range(200, 300)))
    reopened = open_index(tmp_path / "idx")
    assert len(reopened) == 200
    _, ids = reopened.search(x[250], 5)
    assert ids.max() < 200 and ids.min() >= 0
    assert reopened.add(x[250:251], ["late.jpg"]).tolist() == [200]  # overwrites the stray with that id
    _, ids = reopened.search(x[250], 1)
    assert ids.tolist() == [[200]]


def test_milvus_errors_are_clear(milvus_uri, tmp_path):
    with pytest.raises(IndexStoreError, match="must end in .db"):
        create_index(DIM, "m", backend="milvus", params={"uri": str(tmp_path / "x.sqlite")})
    create_index(DIM, "m", backend="milvus", params={"uri": milvus_uri, "collection": "taken"})
    with pytest.raises(IndexStoreError, match="collection 'taken' already exists"):
        create_index(DIM, "m", backend="milvus", params={"uri": milvus_uri, "collection": "taken"})
    with pytest.raises(IndexStoreError, match="not a milvus kind"):
        create_index(DIM, "m", backend="milvus", kind="ivfpq")
