"""Search your own images end to end: embed -> index -> search (Python API and CLI), updates, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

import xmr
from xmr.errors import XmrError
from xmr.search.embed import embed_images
from xmr.search.indexing import add_to_index, build_index, remove_from_index
from xmr.search.retriever import ModelMismatch, UnsupportedQuery

pytest.importorskip("faiss")


def test_text_query_finds_the_right_identity(index_dir, train_gallery):
    _, pid_of, records = train_gallery
    retriever = xmr.load(index_dir, precision="fp32")
    assert len(retriever) == len(pid_of)
    found = 0
    for record in records[::2]:
        hits = retriever.search_text(record.caption, k=5)
        assert len(hits) == 5 and hits[0].score >= hits[-1].score
        found += any(pid_of[h.path] == record.pid for h in hits)
    assert found / len(records[::2]) >= 0.8


def test_image_query_finds_itself_first(index_dir, train_gallery):
    root, pid_of, _ = train_gallery
    retriever = xmr.load(index_dir, precision="fp32")
    name = sorted(pid_of)[3]
    hits = retriever.search_image(Image.open(root / name), k=3)
    assert hits[0].path == name and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert retriever.image_path(hits[0].id) == (root / name).resolve()


def test_composed_queries_refused_unless_the_baseline_is_chosen(index_dir, train_gallery):
    root, pid_of, _ = train_gallery
    image = Image.open(root / min(pid_of))
    plain = xmr.load(index_dir)
    assert not plain.supports_composed
    with pytest.raises(UnsupportedQuery, match="cannot compose"):
        plain.search_composed(image, "with a red shirt instead")
    fused = xmr.load(index_dir, compose="sum", precision="fp32")
    assert fused.supports_composed
    query = fused.encode_images([image]) + fused.encode_texts(["with a red shirt instead"])
    query /= np.linalg.norm(query)
    expected = fused.search_vectors(query, 4)[0]
    got = fused.search_composed(image, "with a red shirt instead", k=4)
    # the same query up to float32 rounding of the normalisation
    assert [h.id for h in got] == [h.id for h in expected]
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-6)


def test_index_refuses_queries_from_another_model(index_dir, tiny_pedes, tmp_path):
    from conftest import tiny_overrides

    from xmr.config import load_config
    from xmr.jobs.train import run_training

    run_training(load_config(REPO / "configs/demo.yaml", tiny_overrides(tiny_pedes, tmp_path / "other",
                                                                         **{"optim.epochs": 1})))
    with pytest.raises(ModelMismatch, match="embed the images again"):
        xmr.load(index_dir, tmp_path / "other" / "last")


def test_add_and_remove_without_rebuild(search_model, train_gallery, tmp_path):
    root, pid_of, _ = train_gallery
    names = sorted(pid_of)
    first, rest = tmp_path / "first", tmp_path / "rest"
    first.mkdir(), rest.mkdir()
    for i, name in enumerate(names):
        shutil.copy(root / name, (first if i < 10 else rest) / name)
    embed_images(first, search_model, tmp_path / "e1", num_workers=0, progress=False)
    update = build_index([tmp_path / "e1"], tmp_path / "idx")
    assert update.count == 10
    # Same names, different folder: refused (one index, one images root).
    embed_images(rest, search_model, tmp_path / "e2", num_workers=0, progress=False)
    with pytest.raises(XmrError, match="one index serves one images root"):
        add_to_index(tmp_path / "idx", [tmp_path / "e2"])
    for name in names[10:]:
        shutil.move(rest / name, first / name)
    embed_images(first, search_model, tmp_path / "e1", num_workers=0, progress=False)  # resumes: only new ones
    update = add_to_index(tmp_path / "idx", [tmp_path / "e1"])
    assert (update.added, update.skipped, update.count) == (len(names) - 10, 10, len(names))
    update = remove_from_index(tmp_path / "idx", [names[0], names[1]])
    assert update.removed == 2 and update.count == len(names) - 2
    retriever = xmr.load(tmp_path / "idx", precision="fp32")
    hits = retriever.search_image(Image.open(first / names[0]), k=len(names))
    assert names[0] not in {h.path for h in hits} and len(hits) == len(names) - 2
    with pytest.raises(XmrError, match="not in the index: nope.jpg"):
        remove_from_index(tmp_path / "idx", ["nope.jpg"])


def test_http_text_and_image_queries_find_the_right_identity(index_dir, train_gallery):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from xmr.serve import ServeSettings, create_app

    root, pid_of, records = train_gallery
    client = TestClient(create_app(xmr.load(index_dir, precision="fp32"), ServeSettings(api_key="k")))
    found = 0
    for record in records[::4]:
        reply = client.post("/api/search/text", json={"text": record.caption, "k": 5}, headers={"X-API-Key": "k"})
        assert reply.status_code == 200, reply.text
        found += any(pid_of[r["path"]] == record.pid for r in reply.json()["results"])
    assert found / len(records[::4]) >= 0.8
    name = sorted(pid_of)[5]
    reply = client.post("/api/search/image", files={"file": (name, (root / name).read_bytes(), "image/jpeg")},
                        data={"k": "3"}, headers={"X-API-Key": "k"})
    top = reply.json()["results"][0]
    assert top["path"] == name
    image = client.get(top["image_url"], headers={"X-API-Key": "k"})
    assert image.status_code == 200 and image.content == (root / name).read_bytes()
    assert client.post("/api/search/text", json={"text": "a man", "k": 5}).status_code == 401


def xmr_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xmr.cli", *args], capture_output=True, check=False, text=True, timeout=300,
                          cwd=REPO)


def test_cli_embed_index_search(search_model, train_gallery, tmp_path):
    root, pid_of, records = train_gallery
    proc = xmr_cli("embed", str(root), "--checkpoint", str(search_model), "--out", str(tmp_path / "emb"),
                   "--workers", "0", "--shard", "0/2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = xmr_cli("embed", str(root), "--checkpoint", str(search_model), "--out", str(tmp_path / "emb1"),
                   "--workers", "0", "--shard", "1/2")
    assert proc.returncode == 0 and "embedded" in proc.stdout
    proc = xmr_cli("index", "build", str(tmp_path / "emb"), str(tmp_path / "emb1"), "--out", str(tmp_path / "idx"),
                   "--kind", "hnsw", "--param", "M=16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{len(pid_of)} items" in proc.stdout
    info = xmr_cli("index", "info", str(tmp_path / "idx"))
    assert json.loads(info.stdout)["kind"] == "hnsw" and json.loads(info.stdout)["params"]["M"] == 16
    grid = tmp_path / "grid.png"
    proc = xmr_cli("search", str(tmp_path / "idx"), records[0].caption, "-k", "4", "--grid", str(grid))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank" in proc.stdout and len(proc.stdout.strip().splitlines()) == 7 and grid.is_file()
    proc = xmr_cli("search", str(tmp_path / "idx"), "--json", "--image", str(root / min(pid_of)))
    assert json.loads(proc.stdout)["results"][0]["path"] == min(pid_of)
    proc = xmr_cli("search", str(tmp_path / "idx"), "with a hat", "--image", str(root / min(pid_of)))
    assert proc.returncode == 2 and "cannot compose" in proc.stderr and "Traceback" not in proc.stderr
    proc = xmr_cli("search", str(tmp_path / "missing"), "a man")
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr
