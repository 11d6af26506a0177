"""`xmr embed`: batched, resumable (exactly once after a kill), skips unreadable files, records the model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from xmr.errors import XmrError
from xmr.search.embed import EmbeddingStore, embed_images, list_images, model_fingerprint, parse_shard


@pytest.fixture(scope="module")
def gallery(tiny_pedes, tmp_path_factory) -> Path:
    """A folder of 48 images (nested) plus one corrupt file and one non-image file."""
    root = tmp_path_factory.mktemp("gallery")
    for i, src in enumerate(sorted((tiny_pedes / "imgs").rglob("*.jpg"))):
        dst = root / f"part{i % 3}" / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
    (root / "part0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def store_paths(directory: Path) -> list[str]:
    return EmbeddingStore.open(directory).load_all()[1]


def test_embeddings_equal_direct_encoding_and_skip_bad_files(search_model, gallery, tmp_path):
    from xmr.data.images import load_image
    from xmr.data.transforms import build_transform
    from xmr.methods.loading import load_checkpoint

    result = embed_images(gallery, search_model, tmp_path / "emb", batch_size=7, num_workers=0,
                          precision="fp32", chunk_size=10, progress=False)
    root, listed = list_images(gallery)
    assert result.total == len(listed) == 49 and result.embedded == 48
    assert [f["path"] for f in result.failed] == ["part0/broken.jpg"] and "broken.jpg" in result.failed[0]["error"]
    store = EmbeddingStore.open(tmp_path / "emb")
    vectors, paths = store.load_all()
    assert sorted(paths) == sorted(p for p in listed if p != "part0/broken.jpg")
    assert store.model_id == model_fingerprint(search_model) and store.images_root == root
    model = load_checkpoint(search_model)
    transform = build_transform(False, model.image_size)
    with torch.no_grad():
        direct = F.normalize(model.method.encode_image(
            torch.stack([transform(load_image(root / p)) for p in paths[:5]])), dim=-1)
    np.testing.assert_allclose(vectors[:5], direct.numpy(), atol=1e-5)
    # Nothing left to do on a rerun, and the failure is not retried.
    again = embed_images(gallery, search_model, tmp_path / "emb", num_workers=0, progress=False)
    assert again.embedded == 0 and again.already_done == 49


def test_refuses_another_model_or_root(search_model, gallery, tiny_pedes, tmp_path):
    embed_images(gallery / "part1", search_model, tmp_path / "emb", num_workers=0, progress=False)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    manifest["model_id"] = "0123456789abcdef"
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(XmrError, match="holds embeddings of model 0123456789abcdef"):
        embed_images(gallery / "part1", search_model, tmp_path / "emb", num_workers=0, progress=False)
    with pytest.raises(XmrError, match="no such folder"):
        embed_images(tmp_path / "missing", search_model, tmp_path / "emb2", progress=False)


def test_shards_partition_the_listing(search_model, gallery, tmp_path):
    for i in range(3):
        embed_images(gallery, search_model, tmp_path / f"s{i}", shard=(i, 3), num_workers=0, progress=False)
    parts = [set(store_paths(tmp_path / f"s{i}")) for i in range(3)]
    assert sum(map(len, parts)) == 48 and len(set().union(*parts)) == 48
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(XmrError):
            parse_shard(bad)


def test_killed_embed_resumes_exactly_once(search_model, gallery, tmp_path):
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "xmr.cli", "embed", str(gallery), "--checkpoint", str(search_model),
           "--out", str(out), "--batch-size", "2", "--chunk-size", "4", "--workers", "0", "--precision", "fp32"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "XMR_TEST_EMBED_DELAY": "0.3"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("chunk-*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(out.glob("chunk-*.json"))
    assert partial, "the run was killed before writing any chunk"
    assert len(store_paths(out)) < 48, "the run finished before it could be killed"
    env.pop("XMR_TEST_EMBED_DELAY")
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=False, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    paths = store_paths(out)
    assert len(paths) == len(set(paths)) == 48
    assert "already done" in rerun.stdout


def test_parallel_processes_embed_each_image_once_and_merge(search_model, gallery, tmp_path):
    from xmr.search.embed_parallel import embed_images_parallel, sub_shards
    from xmr.search.indexing import build_index

    # Machine shards and their processes' parts tile the listing exactly.
    listing = list(range(50))
    parts = [p for machine in range(3) for p in sub_shards((machine, 3), 2)]
    covered = [x for index, count in parts for x in listing[index::count]]
    assert sorted(covered) == listing

    result = embed_images_parallel(gallery, search_model, tmp_path / "par", processes=2, batch_size=5,
                                   precision="fp32", chunk_size=8, progress=False)
    assert result.total == 49 and result.embedded == 48 and len(result.failed) == 1
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == ["shard-000", "shard-001"]
    single = embed_images(gallery, search_model, tmp_path / "one", num_workers=0, precision="fp32",
                          progress=False)
    assert single.embedded == 48
    ref_vecs, ref_paths = EmbeddingStore.open(tmp_path / "one").load_all()
    by_path = dict(zip(ref_paths, ref_vecs, strict=True))
    seen = []
    for shard_dir in sorted((tmp_path / "par").iterdir()):
        vecs, paths = EmbeddingStore.open(shard_dir).load_all()
        seen += paths
        np.testing.assert_allclose(vecs, np.stack([by_path[p] for p in paths]), atol=1e-5)
    assert sorted(seen) == sorted(ref_paths)
    update = build_index([tmp_path / "par"], tmp_path / "idx")
    assert update.count == 48 and update.skipped == 0
    again = embed_images_parallel(gallery, search_model, tmp_path / "par", processes=2, progress=False)
    assert again.embedded == 0 and again.already_done == 49
