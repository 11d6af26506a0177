"""Embed an image collection into a resumable on-disk store (`xmr embed`).

Layout of an embedding directory::

    EMB/manifest.json              model id (checkpoint digest), dim, images root, shard, format version
    EMB/chunk-000000.npy           float32 (n, dim), L2-normalised
    EMB/chunk-000000.json          the n image paths of that chunk (relative to the images root)
    EMB/failed.jsonl               unreadable files: {"path", "error"}, one per line

A chunk counts only once its `.json` exists: the `.npy` is renamed into place first and the path
list last, each with write-then-rename, so a process killed at any moment leaves whole chunks and at
most one orphan `.npy`, which the next run deletes. A rerun lists the images again and embeds only
those in no complete chunk and not recorded as failed: every image ends up embedded exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from xmr.data.images import load_image
from xmr.data.transforms import build_transform
from xmr.errors import DataError, XmrError
from xmr.evaluation.evaluator import file_digest

log = logging.getLogger(__name__)

FORMAT = "xmr-embeddings"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MANIFEST = "manifest.json"
_TEST_DELAY = float(os.environ.get("XMR_TEST_EMBED_DELAY", "0") or 0)
FAILED = "failed.jsonl"


class EmbeddingStoreError(XmrError):
    """An embedding directory is missing, corrupt or made by another model."""


def model_fingerprint(checkpoint: str | Path) -> str:
    """Identity of a checkpoint's weights: sha256 (16 hex) of its model.safetensors."""
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        raise EmbeddingStoreError(f"{checkpoint}: no model.safetensors (expected an xmr checkpoint directory)")
    return file_digest(weights)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise XmrError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise XmrError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def list_images(source: str | Path) -> tuple[Path, list[str]]:
    """(images root, sorted relative paths) of a folder walked recursively, or of a list file.

    A list file has one path per line (blank lines and '#' comments skipped), relative to the list
    file's folder or absolute.
    """
    source = Path(source)
    if source.is_dir():
        root = source.resolve()
        paths = [p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)]
        return root, sorted(paths)
    if source.is_file():
        root = source.parent.resolve()
        lines = source.read_text(encoding="utf-8").splitlines()
        paths = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        return root, sorted(dict.fromkeys(paths))
    raise DataError(f"{source}: no such folder or list file")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class EmbeddingStore:
    """An embedding directory: read the manifest, list complete chunks, append new ones."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def images_root(self) -> Path:
        return Path(self.manifest["images_root"])

    @classmethod
    def open(cls, directory: str | Path) -> EmbeddingStore:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise EmbeddingStoreError(f"{directory}: not an embedding directory (no {MANIFEST}); "
                                      "create it with `xmr embed`")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise EmbeddingStoreError(f"{path}: unreadable manifest: {e}") from None
        missing = [k for k in ("format", "version", "model_id", "dim", "images_root") if k not in manifest]
        if manifest.get("format") != FORMAT or missing:
            raise EmbeddingStoreError(f"{path}: not an xmr embedding manifest (missing {missing or 'format'})")
        if int(manifest["version"]) > FORMAT_VERSION:
            raise EmbeddingStoreError(f"{path}: format version {manifest['version']} is newer than this xmr "
                                      f"supports ({FORMAT_VERSION}); upgrade xmr")
        return cls(directory, manifest)

    @classmethod
    def create(cls, directory: str | Path, manifest: dict[str, Any]) -> EmbeddingStore:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
        return cls(directory, manifest)

    def chunk_names(self) -> list[str]:
        """Complete chunks in order; orphan vectors (killed before the path list landed) are removed."""
        complete = []
        for npy in sorted(self.directory.glob("chunk-*.npy")):
            if npy.with_suffix(".json").is_file():
                complete.append(npy.stem)
            else:
                npy.unlink(missing_ok=True)
        for stray in self.directory.glob(".*.tmp-*"):
            stray.unlink(missing_ok=True)
        return complete

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        for name in self.chunk_names():
            try:
                vectors = np.load(self.directory / f"{name}.npy", allow_pickle=False)
                paths = json.loads((self.directory / f"{name}.json").read_text())
            except (OSError, ValueError) as e:
                raise EmbeddingStoreError(f"{self.directory}/{name}: unreadable chunk: {e}") from None
            if vectors.ndim != 2 or vectors.shape != (len(paths), int(self.manifest["dim"])):
                raise EmbeddingStoreError(f"{self.directory}/{name}.npy: shape {vectors.shape} does not match "
                                          f"{len(paths)} paths x dim {self.manifest['dim']}")
            yield vectors.astype(np.float32, copy=False), paths

    def done_paths(self) -> set[str]:
        done: set[str] = set()
        for name in self.chunk_names():
            done.update(json.loads((self.directory / f"{name}.json").read_text()))
        return done | {f["path"] for f in self.failures()}

    def failures(self) -> list[dict[str, str]]:
        path = self.directory / FAILED
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append(self, vectors: np.ndarray, paths: Sequence[str], failed: Sequence[dict[str, str]] = ()) -> None:
        """Add one chunk (vectors land before their path list, which marks the chunk complete)."""
        names = self.chunk_names()
        number = int(names[-1].split("-")[1]) + 1 if names else 0
        if len(paths):
            stem = self.directory / f"chunk-{number:06d}"
            _atomic_write(stem.with_suffix(".npy"), _npy_bytes(np.ascontiguousarray(vectors, dtype=np.float32)))
            _atomic_write(stem.with_suffix(".json"), json.dumps(list(paths)).encode())
        if failed:
            old = self.failures()
            lines = "".join(json.dumps(f) + "\n" for f in [*old, *failed])
            _atomic_write(self.directory / FAILED, lines.encode())

    def load_all(self) -> tuple[np.ndarray, list[str]]:
        """All vectors (n, dim) and their paths."""
        vectors, paths = [], []
        for chunk, chunk_paths in self.iter_chunks():
            vectors.append(chunk)
            paths += chunk_paths
        dim = int(self.manifest["dim"])
        return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), paths

    def __len__(self) -> int:
        return sum(len(json.loads((self.directory / f"{n}.json").read_text())) for n in self.chunk_names())


def find_stores(paths: Sequence[str | Path]) -> list[EmbeddingStore]:
    """Embedding dirs given directly or as a parent of shard dirs (`shard-*` from torchrun/--shard runs)."""
    stores = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            stores.append(EmbeddingStore.open(path))
        elif path.is_dir() and any(path.glob(f"*/{MANIFEST}")):
            stores += [EmbeddingStore.open(p.parent) for p in sorted(path.glob(f"*/{MANIFEST}"))]
        else:
            raise EmbeddingStoreError(f"{path}: not an embedding directory (no {MANIFEST}, no shard dirs)")
    return stores


class _GalleryImages(Dataset):
    """Decoded, transformed images; an unreadable file yields a zero image and its error message."""

    def __init__(self, root: Path, paths: Sequence[str], transform: Any) -> None:
        self.root, self.paths, self.transform = root, list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.root / self.paths[index]
        try:
            image = self.transform(load_image(path))
            error = ""
        except DataError as e:
            image = torch.zeros(3, *self.transform.size)
            error = str(e)
        return {"images": image, "index": index, "error": error}


@dataclass
class EmbedResult:
    directory: Path
    total: int
    embedded: int
    already_done: int
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def embed_images(source: str | Path, checkpoint: str | Path, out: str | Path, *, batch_size: int = 64,
                 num_workers: int = 2, precision: str = "bf16", device: str = "cpu", shard: tuple[int, int] = (0, 1),
                 chunk_size: int = 1024, progress: bool = True, model: Any = None,
                 on_progress: Callable[[int], None] | None = None, compile: bool = False) -> EmbedResult:
    """Embed every image under `source` (folder or list file) with `checkpoint` into `out` (resumable).

    `on_progress(n)` is called after each batch with the number of images it handled (used by
    `xmr.search.embed_parallel` to drive one progress bar for several processes). `compile` runs the image
    tower through torch.compile (see `xmr.methods.inference`; worth it for large galleries only).
    """
    from tqdm.auto import tqdm

    from xmr.methods.inference import prepare_encoder
    from xmr.jobs.train import load_checkpoint

    start = time.perf_counter()
    root, paths = list_images(source)
    index, count = shard
    paths = paths[index::count]
    model_id = model_fingerprint(checkpoint)
    out = Path(out)
    if model is None and not (out / MANIFEST).is_file():
        model = load_checkpoint(checkpoint, device=device)
    store = _open_or_create(out, model_id, root, shard, checkpoint, model)
    done = store.done_paths()
    todo = [p for p in paths if p not in done]
    result = EmbedResult(store.directory, len(paths), 0, len(paths) - len(todo))
    if not todo:
        result.seconds = time.perf_counter() - start
        return result
    model = model or load_checkpoint(checkpoint, device=device)
    dev = torch.device(device)
    encoder = prepare_encoder(model.method, precision, compile=compile, device=dev)
    transform = build_transform(False, model.image_size)
    loader = torch.utils.data.DataLoader(_GalleryImages(root, todo, transform), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    pending_vecs: list[np.ndarray] = []
    pending_paths: list[str] = []
    pending_failed: list[dict[str, str]] = []
    bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for batch in loader:
            ok = [i for i, e in enumerate(batch["error"]) if not e]
            pending_failed += [{"path": todo[int(batch["index"][i])], "error": e}
                               for i, e in enumerate(batch["error"]) if e]
            if ok:
                feats = encoder.encode_image(batch["images"][ok].to(dev))
                pending_vecs.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
                pending_paths += [todo[int(batch["index"][i])] for i in ok]
            bar.update(len(batch["error"]))
            if on_progress is not None:
                on_progress(len(batch["error"]))
            if len(pending_paths) >= chunk_size:
                store.append(np.concatenate(pending_vecs), pending_paths, pending_failed)
                if _TEST_DELAY:  # lets the crash test kill a run mid-way on fast machines
                    time.sleep(_TEST_DELAY)
                result.embedded += len(pending_paths)
                result.failed += pending_failed
                pending_vecs, pending_paths, pending_failed = [], [], []
    bar.close()
    if pending_paths or pending_failed:
        store.append(np.concatenate(pending_vecs) if pending_vecs else np.zeros((0, 0), np.float32),
                     pending_paths, pending_failed)
        result.embedded += len(pending_paths)
        result.failed += pending_failed
    for failure in result.failed:
        log.warning("skipped unreadable image: %s", failure["error"])
    result.seconds = time.perf_counter() - start
    return result


def embedding_dim(model: Any) -> int:
    """Output dimension of a loaded model's encoders."""
    method = model.method
    return int(getattr(method, "embed_dim", None) or method.clip.config.embed_dim)


def _open_or_create(out: Path, model_id: str, root: Path, shard: tuple[int, int], checkpoint: str | Path,
                    model: Any) -> EmbeddingStore:
    if (out / MANIFEST).is_file():
        store = EmbeddingStore.open(out)
        if store.model_id != model_id:
            raise EmbeddingStoreError(f"{out} holds embeddings of model {store.model_id}, not of {checkpoint} "
                                      f"({model_id}); use another --out directory")
        if Path(store.manifest["images_root"]) != root:
            raise EmbeddingStoreError(f"{out} was made for images under {store.manifest['images_root']}, "
                                      f"not {root}; use another --out directory")
        return store
    dim = embedding_dim(model)
    return EmbeddingStore.create(out, {
        "format": FORMAT, "version": FORMAT_VERSION, "model_id": model_id, "checkpoint": str(Path(checkpoint).resolve()),
        "dim": dim, "images_root": str(root), "shard": list(shard),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
