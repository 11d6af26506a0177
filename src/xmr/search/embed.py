"""Embed an image collection into a resumable on-disk store (`xmr embed`).

Layout of an embedding directory::

    EMB/manifest.json                model id (checkpoint digest), dim, images root, shard, format version,
                                     "extras": the side arrays [{name, shape, dtype}] (null until the
                                     first chunk fixes them)
    EMB/chunk-000000.NAME.npy        one per side array: (n, *shape), float16 for floating arrays
    EMB/chunk-000000.npy             float32 (n, dim), L2-normalised
    EMB/chunk-000000.json            the n image paths of that chunk (relative to the images root)
    EMB/failed.jsonl                 unreadable files: {"path", "error"}, one per line

A chunk counts only once its `.json` exists: its side arrays are renamed into place first, then its
vectors, and the path list last, each with write-then-rename, so a process killed at any moment leaves
whole chunks and at most one orphan chunk without a path list, whose files the next run deletes. A
rerun lists the images again and embeds only those in no complete chunk and not recorded as failed:
every image ends up embedded exactly once. The side arrays' names and shapes are written into the
manifest (atomically) before the first chunk's files, and every later chunk must bring the same ones.
Readers memory-map the chunk files.

The vectors and side arrays come from the method-neutral encoder: `encoder.encode_gallery(images)`
returns an `xmr.outputs.Embedded`; its vectors are L2-normalised here and each of its extras is
stored as a side array (what a second scoring stage reads back from the index).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from xmr.atomic import atomic_write_bytes
from xmr.data.images import load_image
from xmr.errors import DataError, XmrError
from xmr.evaluation.evaluator import file_digest
from xmr.index.base import ExtraSpec, IndexStoreError, check_extras
from xmr.methods.loading import LoadedModel

log = logging.getLogger(__name__)

FORMAT = "xmr-embeddings"
FORMAT_VERSION = 2  # 2: side arrays (manifest "extras", chunk-N.NAME.npy); version 1 stores read as before
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
MANIFEST = "manifest.json"
_TEST_DELAY = float(os.environ.get("XMR_TEST_EMBED_DELAY", "0") or 0)
FAILED = "failed.jsonl"
_CHUNK_RE = re.compile(r"^(chunk-\d{6,})\.npy$")
_CHUNK_FILE_RE = re.compile(r"^(chunk-\d{6,})\.(?:[A-Za-z][A-Za-z0-9_]*\.)?(?:npy|json)$")


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


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class EmbeddingChunk:
    """One complete chunk: memory-mapped vectors (n, dim) float32, its n paths and side arrays (n, ...)."""

    name: str
    vectors: np.ndarray
    paths: list[str]
    extras: dict[str, np.ndarray] = field(default_factory=dict)


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

    @property
    def extra_specs(self) -> tuple[ExtraSpec, ...] | None:
        """The side arrays every chunk holds; None while no chunk has fixed them (a version-1 store: none)."""
        specs = self.manifest.get("extras", [] if int(self.manifest["version"]) < 2 else None)
        if specs is None:
            return None
        try:
            return tuple(ExtraSpec.from_dict(d, str(self.directory / MANIFEST)) for d in specs)
        except (IndexStoreError, TypeError) as e:
            raise EmbeddingStoreError(str(e)) from None

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.extra_specs or ())

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
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or missing:
            raise EmbeddingStoreError(f"{path}: not an xmr embedding manifest (missing {missing or 'format'})")
        if int(manifest["version"]) > FORMAT_VERSION:
            raise EmbeddingStoreError(f"{path}: format version {manifest['version']} is newer than this xmr "
                                      f"supports ({FORMAT_VERSION}); upgrade xmr")
        store = cls(directory, manifest)
        _ = store.extra_specs  # validated now: a bad manifest fails at open, naming the file
        return store

    @classmethod
    def create(cls, directory: str | Path, manifest: dict[str, Any]) -> EmbeddingStore:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
        return cls(directory, manifest)

    def chunk_names(self) -> list[str]:
        """Complete chunks (those whose path list exists), in order. Lists only: see `remove_orphans`."""
        names = (m.group(1) for m in map(_CHUNK_RE.match, os.listdir(self.directory)) if m)
        return sorted(n for n in names if (self.directory / f"{n}.json").is_file())

    def remove_orphans(self) -> None:
        """Delete the files of chunks killed before their path list landed, and stray temporaries.

        Only the writer calls this (before appending): a reader must not delete a chunk in flight.
        """
        complete = set(self.chunk_names())
        for entry in os.listdir(self.directory):
            m = _CHUNK_FILE_RE.match(entry)
            if (m and m.group(1) not in complete) or (entry.startswith(".") and ".tmp-" in entry):
                (self.directory / entry).unlink(missing_ok=True)

    def chunks(self) -> Iterator[EmbeddingChunk]:
        """Complete chunks in order, their vectors and side arrays memory-mapped (read-only)."""
        specs = self.extra_specs or ()
        dim = int(self.manifest["dim"])
        for name in self.chunk_names():
            stem = self.directory / name
            try:
                paths = json.loads(stem.with_suffix(".json").read_text())
                vectors = np.load(stem.with_suffix(".npy"), mmap_mode="r", allow_pickle=False)
                extras = {s.name: np.load(self.directory / f"{name}.{s.name}.npy", mmap_mode="r", allow_pickle=False)
                          for s in specs}
            except (OSError, ValueError) as e:
                raise EmbeddingStoreError(f"{stem}: unreadable chunk: {e}") from None
            if vectors.ndim != 2 or vectors.shape != (len(paths), dim):
                raise EmbeddingStoreError(f"{stem}.npy: shape {vectors.shape} does not match "
                                          f"{len(paths)} paths x dim {dim}")
            for s in specs:
                got = extras[s.name]
                if got.shape != (len(paths), *s.shape) or got.dtype != np.dtype(s.dtype):
                    raise EmbeddingStoreError(f"{stem}.{s.name}.npy: {got.dtype} {got.shape}, but the manifest "
                                              f"lists side array {s.describe()} for {len(paths)} paths")
            yield EmbeddingChunk(name, vectors.astype(np.float32, copy=False), paths, extras)

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        """(vectors, paths) of each complete chunk (see `chunks` for the side arrays too)."""
        for chunk in self.chunks():
            yield chunk.vectors, chunk.paths

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

    def append(self, vectors: np.ndarray, paths: Sequence[str], failed: Sequence[dict[str, str]] = (),
               extras: Mapping[str, np.ndarray] | None = None) -> None:
        """Add one chunk: side arrays, then vectors, then the path list, which marks the chunk complete.

        `extras` maps names to (n, ...) arrays (floating ones stored as float16); the first chunk fixes
        the names and per-row shapes (recorded in the manifest first), later chunks must match them.
        """
        self.remove_orphans()
        names = self.chunk_names()
        number = int(names[-1].split("-")[1]) + 1 if names else 0
        if len(paths):
            arrays = self._check_extras(extras, len(paths), fixed=bool(names))
            stem = self.directory / f"chunk-{number:06d}"
            for name, array in arrays.items():
                atomic_write_bytes(self.directory / f"{stem.name}.{name}.npy", _npy_bytes(array))
            atomic_write_bytes(stem.with_suffix(".npy"), _npy_bytes(np.ascontiguousarray(vectors, dtype=np.float32)))
            atomic_write_bytes(stem.with_suffix(".json"), json.dumps(list(paths)).encode())
        if failed:
            old = self.failures()
            lines = "".join(json.dumps(f) + "\n" for f in [*old, *failed])
            atomic_write_bytes(self.directory / FAILED, lines.encode())

    def _check_extras(self, extras: Mapping[str, np.ndarray] | None, n: int, fixed: bool) -> dict[str, np.ndarray]:
        """A chunk's side arrays checked against the store's (or, for the first chunk, recorded as them)."""
        try:
            arrays, specs = check_extras(extras, n, self.extra_specs if fixed else None,
                                         where=f"{self.directory}: append(extras)", holder="this embedding directory")
        except IndexStoreError as e:
            raise EmbeddingStoreError(str(e)) from None
        listed = [spec.to_dict() for spec in specs]
        if not fixed and self.manifest.get("extras") != listed:
            self.manifest = {**self.manifest, "extras": listed}
            atomic_write_bytes(self.directory / MANIFEST, json.dumps(self.manifest, indent=2).encode())
        return arrays

    def load_all(self) -> tuple[np.ndarray, list[str]]:
        """All vectors (n, dim) and their paths."""
        vectors, paths = [], []
        for chunk, chunk_paths in self.iter_chunks():
            vectors.append(chunk)
            paths += chunk_paths
        dim = int(self.manifest["dim"])
        return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), paths

    def load_extras(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All rows of the side arrays (all of them when names is None), aligned with `load_all()`."""
        specs = {s.name: s for s in self.extra_specs or ()}
        names = list(specs) if names is None else list(names)
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise EmbeddingStoreError(f"{self.directory}: no side array {unknown[0]!r} (it holds "
                                      f"{', '.join(map(repr, specs)) or 'none'})")
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for chunk in self.chunks():
            for n in names:
                parts[n].append(chunk.extras[n])
        return {n: np.concatenate(parts[n]) if parts[n] else np.zeros((0, *specs[n].shape), specs[n].dtype)
                for n in names}

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

    def __init__(self, root: Path, paths: Sequence[str], transform: Any, image_size: Sequence[int]) -> None:
        self.root, self.paths, self.transform = root, list(paths), transform
        self.image_size = tuple(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.root / self.paths[index]
        try:
            image = self.transform(load_image(path))
            error = ""
        except DataError as e:
            image = torch.zeros(3, *self.image_size)
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


def gallery_transform(model: LoadedModel) -> Callable[[Any], torch.Tensor]:
    """The gallery-side image transform of a loaded model (PIL image -> (3, H, W) tensor)."""
    return model.gallery_transform


def encode_batch(encoder: Any, images: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One batch through `encoder.encode_gallery`: L2-normalised float32 vectors (B, D) and the extras as
    numpy arrays (floating ones as float16, the dtype they are stored in)."""
    embedded = encoder.encode_gallery(images)
    vectors = F.normalize(embedded.vectors.float(), dim=-1).cpu().numpy()
    extras = {}
    for name, value in embedded.extras.items():
        value = value.detach().cpu()
        extras[name] = (value.to(torch.float16) if value.is_floating_point() else value).numpy()
    return vectors, extras


class _Pending:
    """Embedded rows not yet written: vectors, paths, side arrays and failures, flushed as one chunk."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.vectors: list[np.ndarray] = []
        self.paths: list[str] = []
        self.extras: dict[str, list[np.ndarray]] = {}
        self.failed: list[dict[str, str]] = []

    def add(self, vectors: np.ndarray, paths: list[str], extras: dict[str, np.ndarray]) -> None:
        self.vectors.append(vectors)
        self.paths += paths
        for name, value in extras.items():
            self.extras.setdefault(name, []).append(value)

    def flush(self, store: EmbeddingStore, result: EmbedResult) -> None:
        if not self.paths and not self.failed:
            return
        vectors = np.concatenate(self.vectors) if self.vectors else np.zeros((0, 0), np.float32)
        extras = {name: np.concatenate(parts) for name, parts in self.extras.items()}
        store.append(vectors, self.paths, self.failed, extras)
        result.embedded += len(self.paths)
        result.failed += self.failed
        self._reset()


def embed_images(source: str | Path, checkpoint: str | Path, out: str | Path, *, batch_size: int = 64,
                 num_workers: int = 2, precision: str = "bf16", device: str = "cpu", shard: tuple[int, int] = (0, 1),
                 chunk_size: int = 1024, progress: bool = True, model: LoadedModel | None = None,
                 on_progress: Callable[[int], None] | None = None, compile: bool = False,
                 encoder: Any = None) -> EmbedResult:
    """Embed every image under `source` (folder or list file) with `checkpoint` into `out` (resumable).

    `on_progress(n)` is called after each batch with the number of images it handled (used by
    `xmr.search.embed_parallel` to drive one progress bar for several processes). `compile` runs the image
    tower through torch.compile (see `xmr.methods.inference`; worth it for large galleries only).
    `model` (a loaded checkpoint) and `encoder` (anything with `encode_gallery(images) -> Embedded`)
    replace the ones built from `checkpoint`, whose weights still identify the store.
    """
    from xmr.methods.loading import load_checkpoint

    start = time.perf_counter()
    root, paths = list_images(source)
    index, count = shard
    paths = paths[index::count]
    model_id = model_fingerprint(checkpoint)
    out = Path(out)
    if model is None and not (out / MANIFEST).is_file():
        model = load_checkpoint(checkpoint, device=device)
    store = _open_or_create(out, model_id, root, shard, checkpoint, model)
    store.remove_orphans()
    done = store.done_paths()
    todo = [p for p in paths if p not in done]
    result = EmbedResult(store.directory, len(paths), 0, len(paths) - len(todo))
    if todo:
        model = model or load_checkpoint(checkpoint, device=device)
        if encoder is None:
            from xmr.methods.inference import prepare_encoder

            encoder = prepare_encoder(model.method, precision, compile=compile, device=torch.device(device))
        loader = torch.utils.data.DataLoader(
            _GalleryImages(root, todo, gallery_transform(model), model.image_size), batch_size=batch_size,
            shuffle=False, num_workers=num_workers)
        _embed_all(loader, todo, encoder, store, result, torch.device(device), chunk_size, progress, on_progress)
    for failure in result.failed:
        log.warning("skipped unreadable image: %s", failure["error"])
    result.seconds = time.perf_counter() - start
    return result


def _embed_all(loader: Any, todo: list[str], encoder: Any, store: EmbeddingStore, result: EmbedResult,
               device: torch.device, chunk_size: int, progress: bool,
               on_progress: Callable[[int], None] | None) -> None:
    """Encode the loader's batches, writing a chunk whenever `chunk_size` images are pending."""
    from tqdm.auto import tqdm

    pending = _Pending()
    bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        for batch in loader:
            ok = [i for i, e in enumerate(batch["error"]) if not e]
            pending.failed += [{"path": todo[int(batch["index"][i])], "error": e}
                               for i, e in enumerate(batch["error"]) if e]
            if ok:
                vectors, extras = encode_batch(encoder, batch["images"][ok].to(device))
                pending.add(vectors, [todo[int(batch["index"][i])] for i in ok], extras)
            bar.update(len(batch["error"]))
            if on_progress is not None:
                on_progress(len(batch["error"]))
            if len(pending.paths) >= chunk_size:
                pending.flush(store, result)
                if _TEST_DELAY:  # lets the crash test kill a run mid-way on fast machines
                    time.sleep(_TEST_DELAY)
    bar.close()
    pending.flush(store, result)


def embedding_dim(model: LoadedModel) -> int:
    """Output dimension of a loaded model's encoders."""
    return int(model.method.embed_dim)


def _open_or_create(out: Path, model_id: str, root: Path, shard: tuple[int, int], checkpoint: str | Path,
                    model: LoadedModel) -> EmbeddingStore:
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extras": None,
    })
