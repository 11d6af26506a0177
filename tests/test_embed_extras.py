"""`xmr embed` side arrays: a gallery encoder's `Embedded.extras` go into the embedding store and on into the
index (build, add, remove, shard merging), with the crash-safety rules of chunks. Uses a small fake encoder
(no training), so these tests run in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from xmr.data.images import load_image
from xmr.errors import XmrError
from xmr.index import open_index
from xmr.outputs import Embedded
from xmr.search.embed import EmbeddingStore, EmbeddingStoreError, embed_images, encode_batch
from xmr.search.indexing import add_to_index, build_index, remove_from_index

pytest.importorskip("faiss", reason="building an index needs faiss-cpu")

SIZE = (16, 8)  # (H, W) after the fake gallery transform
DIM = 8
SPECS = [{"name": "regions", "shape": [4, 6], "dtype": "float16"}, {"name": "mask", "shape": [4], "dtype": "bool"}]


def gallery_transform(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, 16, 8) float tensor in [0, 1]."""
    array = np.asarray(image.resize((SIZE[1], SIZE[0])), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class FakeGalleryEncoder:
    """`encode_gallery` like xmr.methods.inference.InferenceEncoder's: vectors (B, 8), not normalised, and
    two side features per image, region features (B, 4, 6) float32 and a mask (B, 4) bool."""

    def __init__(self, extras: bool = True, extra_dtype: torch.dtype = torch.float32) -> None:
        self.proj = torch.randn(3 * SIZE[0] * SIZE[1], DIM, generator=torch.Generator().manual_seed(0))
        self.extras, self.extra_dtype = extras, extra_dtype
        self.calls = 0

    def encode_gallery(self, images: torch.Tensor) -> Embedded:
        self.calls += 1
        flat = images.flatten(1)
        vectors = flat @ self.proj + 0.5
        if not self.extras:
            return Embedded(vectors)
        regions = (flat[:, :24] * 3 - 1).reshape(-1, 4, 6).to(self.extra_dtype)
        return Embedded(vectors, {"regions": regions, "mask": flat[:, 24:28] > 0.5})


def fake_model() -> SimpleNamespace:
    return SimpleNamespace(method=SimpleNamespace(embed_dim=DIM), image_size=SIZE, gallery_transform=gallery_transform)


def write_images(root: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)).save(root / name)


@pytest.fixture
def gallery(tmp_path) -> Path:
    """14 PNG images in nested folders plus one corrupt file."""
    root = tmp_path / "gallery"
    write_images(root, [f"part{i % 3}/img{i:02d}.png" for i in range(14)])
    (root / "part0" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A stand-in checkpoint directory: only its weights file's digest matters (the store's model id)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"fake weights")
    return ckpt


def expected(root: Path, paths: list[str], encoder: FakeGalleryEncoder) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What the store must hold for `paths`: normalised vectors and float16 / bool side arrays."""
    images = torch.stack([gallery_transform(load_image(root / p)) for p in paths])
    out = encoder.encode_gallery(images)
    vectors = torch.nn.functional.normalize(out.vectors, dim=-1).numpy()
    return vectors, {"regions": out.extras["regions"].float().numpy().astype(np.float16),
                     "mask": out.extras["mask"].numpy()}


def embed(root: Path, checkpoint: Path, out: Path, encoder: FakeGalleryEncoder | None = None, **kw):
    kw = {"batch_size": 3, "chunk_size": 4, "num_workers": 0, "progress": False, **kw}
    return embed_images(root, checkpoint, out, model=fake_model(), encoder=encoder or FakeGalleryEncoder(), **kw)


def check_index(index, root: Path, encoder: FakeGalleryEncoder) -> None:
    ids = index.ids()
    paths = [index.path(i) for i in ids]
    vectors, extras = expected(root, paths, encoder)
    np.testing.assert_allclose(index.vectors(ids), vectors, atol=1e-6)
    got = index.extras(ids)
    np.testing.assert_allclose(got["regions"].astype(np.float32), extras["regions"].astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(got["mask"], extras["mask"])


def test_embed_stores_the_encoders_extras_and_the_index_serves_them(gallery, checkpoint, tmp_path):
    encoder = FakeGalleryEncoder()
    result = embed(gallery, checkpoint, tmp_path / "emb", encoder)
    assert (result.total, result.embedded, [f["path"] for f in result.failed]) == (15, 14, ["part0/broken.png"])
    store = EmbeddingStore.open(tmp_path / "emb")
    assert store.manifest["version"] == 2 and store.manifest["extras"] == SPECS
    assert store.extra_names == ("regions", "mask")
    names = sorted(p.name for p in (tmp_path / "emb").glob("chunk-000000*"))
    assert names == ["chunk-000000.json", "chunk-000000.mask.npy", "chunk-000000.npy", "chunk-000000.regions.npy"]
    chunks = list(store.chunks())
    # batches of 3 (the first holds the unreadable file); a chunk is written once >= 4 images are pending
    assert [len(c.paths) for c in chunks] == [5, 6, 3]
    assert all(isinstance(c.vectors, np.memmap) and isinstance(c.extras["regions"], np.memmap) for c in chunks)
    vectors, paths = store.load_all()
    want_vectors, want_extras = expected(gallery, paths, encoder)
    np.testing.assert_allclose(vectors, want_vectors, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    stored = store.load_extras()
    assert stored["regions"].dtype == np.float16 and stored["regions"].shape == (14, 4, 6)
    np.testing.assert_allclose(stored["regions"].astype(np.float32), want_extras["regions"].astype(np.float32),
                               atol=2e-3)
    np.testing.assert_array_equal(stored["mask"], want_extras["mask"])
    # -> index: build, open (mapped and not), add new images, remove one
    build_index([tmp_path / "emb"], tmp_path / "idx")
    for mmap in (False, True):
        index = open_index(tmp_path / "idx", mmap=mmap)
        assert index.extra_names == ("regions", "mask") and len(index) == 14
        check_index(index, gallery, encoder)
    write_images(gallery, ["new/a.png", "new/b.png"], seed=1)
    again = embed(gallery, checkpoint, tmp_path / "emb", encoder)
    assert again.embedded == 2 and again.already_done == 15
    assert add_to_index(tmp_path / "idx", [tmp_path / "emb"]).added == 2
    assert remove_from_index(tmp_path / "idx", ["part1/img01.png"]).count == 15
    for mmap in (False, True):
        index = open_index(tmp_path / "idx", mmap=mmap)
        assert "part1/img01.png" not in dict(index.items()).values() and "new/b.png" in dict(index.items()).values()
        check_index(index, gallery, encoder)


def test_sharded_embedding_with_extras_merges_into_one_index(gallery, checkpoint, tmp_path):
    encoder = FakeGalleryEncoder()
    for part in range(2):  # what `xmr embed --processes 2` writes: OUT/shard-NNN
        embed(gallery, checkpoint, tmp_path / "par" / f"shard-{part:03d}", encoder, shard=(part, 2))
    embed(gallery, checkpoint, tmp_path / "dup", encoder)  # every image a second time
    update = build_index([tmp_path / "par", tmp_path / "dup"], tmp_path / "idx")
    assert (update.added, update.skipped, update.count) == (14, 14, 14)  # an image embedded twice: indexed once
    index = open_index(tmp_path / "idx", mmap=True)
    assert sorted(index.ids().tolist()) == list(range(14))
    check_index(index, gallery, encoder)


def test_killed_chunk_files_are_removed_and_rerun_embeds_each_image_once(gallery, checkpoint, tmp_path):
    encoder = FakeGalleryEncoder()
    out = tmp_path / "emb"
    embed(gallery, checkpoint, out, encoder)
    # a run killed between a chunk's vectors and its path list, and one killed after a side array only
    (out / "chunk-000002.json").unlink()
    np.save(out / "chunk-000003.regions.npy", np.zeros((2, 4, 6), np.float16))
    store = EmbeddingStore.open(out)
    assert store.chunk_names() == ["chunk-000000", "chunk-000001"]
    assert (out / "chunk-000002.npy").exists()  # listing does not delete: a reader never removes a chunk in flight
    calls_before = encoder.calls
    rerun = embed(gallery, checkpoint, out, encoder)
    assert rerun.embedded == 3 and encoder.calls == calls_before + 1  # only the lost chunk's three images
    assert not (out / "chunk-000003.regions.npy").exists()
    assert sorted(p.name for p in out.glob("chunk-000002*")) == [
        "chunk-000002.json", "chunk-000002.mask.npy", "chunk-000002.npy", "chunk-000002.regions.npy"]
    vectors, paths = store.load_all()
    assert len(paths) == len(set(paths)) == 14
    extras = store.load_extras()
    want_vectors, want_extras = expected(gallery, paths, encoder)
    np.testing.assert_allclose(vectors, want_vectors, atol=1e-6)
    np.testing.assert_array_equal(extras["mask"], want_extras["mask"])
    np.testing.assert_allclose(extras["regions"].astype(np.float32), want_extras["regions"].astype(np.float32),
                               atol=2e-3)


def test_stores_refuse_other_side_arrays(gallery, checkpoint, tmp_path):
    embed(gallery, checkpoint, tmp_path / "emb")
    store = EmbeddingStore.open(tmp_path / "emb")
    vectors = np.ones((2, DIM), np.float32) / np.sqrt(DIM)
    regions = np.zeros((2, 4, 6), np.float32)
    with pytest.raises(EmbeddingStoreError, match=r"side array 'mask' \(per-row shape \(4,\), bool\) is missing"):
        store.append(vectors, ["x.png", "y.png"], extras={"regions": regions})
    with pytest.raises(EmbeddingStoreError, match=r"\['regions'\]: expected a numpy array of shape \(2, 4, 6\)"):
        store.append(vectors, ["x.png", "y.png"], extras={"regions": regions[:, :3], "mask": np.ones((2, 4), bool)})
    assert len(store) == 14  # nothing written
    # an embedding directory without side arrays cannot be merged with one that has them
    embed(gallery, checkpoint, tmp_path / "plain", FakeGalleryEncoder(extras=False))
    assert EmbeddingStore.open(tmp_path / "plain").manifest["extras"] == []
    with pytest.raises(XmrError, match=r"plain holds side arrays none, but .*emb holds 'regions'"):
        build_index([tmp_path / "emb", tmp_path / "plain"], tmp_path / "idx")
    # ... nor added to an index that keeps them
    build_index([tmp_path / "emb"], tmp_path / "idx")
    write_images(gallery, ["new/a.png"], seed=2)
    embed(gallery, checkpoint, tmp_path / "plain", FakeGalleryEncoder(extras=False))
    with pytest.raises(XmrError, match="side array 'regions'.* is missing"):
        add_to_index(tmp_path / "idx", [tmp_path / "plain"])
    assert len(open_index(tmp_path / "idx")) == 14


def test_version1_store_without_extras_still_reads_and_indexes(tmp_path):
    """An embedding directory written before side arrays existed (format version 1)."""
    out = tmp_path / "old"
    out.mkdir()
    manifest = {"format": "xmr-embeddings", "version": 1, "model_id": "0123456789abcdef", "dim": 4,
                "images_root": str(tmp_path), "shard": [0, 1]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    vectors = np.eye(3, 4, dtype=np.float32)
    np.save(out / "chunk-000000.npy", vectors)
    (out / "chunk-000000.json").write_text(json.dumps(["a.jpg", "b.jpg", "c.jpg"]))
    store = EmbeddingStore.open(out)
    assert store.extra_specs == () and store.load_extras() == {}
    [chunk] = store.chunks()
    assert chunk.paths == ["a.jpg", "b.jpg", "c.jpg"] and chunk.extras == {}
    build_index([out], tmp_path / "idx")
    index = open_index(tmp_path / "idx")
    assert index.extra_names == () and len(index) == 3
    np.testing.assert_array_equal(index.vectors([0, 2]), vectors[[0, 2]])


def test_encode_batch_normalises_vectors_and_stores_floating_extras_as_float16():
    encoder = FakeGalleryEncoder(extra_dtype=torch.bfloat16)
    images = torch.rand(5, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    vectors, extras = encode_batch(encoder, images)
    raw = encoder.encode_gallery(images)
    np.testing.assert_allclose(vectors, torch.nn.functional.normalize(raw.vectors, dim=-1).numpy(), atol=1e-6)
    assert vectors.dtype == np.float32 and extras["regions"].dtype == np.float16 and extras["mask"].dtype == np.bool_
    np.testing.assert_array_equal(extras["regions"], raw.extras["regions"].to(torch.float16).numpy())
