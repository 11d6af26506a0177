"""On-disk layout of an index directory and its crash-safe save.

    INDEX/
      CURRENT            text: the name of the live version folder, e.g. "v000003"
      v000003/
        manifest.json    written last: a version folder without it is incomplete
        ids.npy          int64 (n,), ascending, live items only
        paths.json       JSON list of n paths, aligned with ids.npy
        vectors.npy      float32 (n, dim), aligned with ids.npy (FAISS backend; memory-mappable)
        faiss.index      serialised FAISS structure (hnsw, ivfpq)
        extra.NAME.npy   one per side array listed in the manifest's "extras" ({name, shape, dtype}):
                         (n, *shape) of dtype (float16 for floating arrays), aligned with ids.npy, for
                         both backends (Milvus keeps only the vectors; the side arrays, like the
                         id -> path map, live here); memory-mapped when opened with mmap=True
        deleted.npy      int64: ids whose Milvus delete may not have happened yet (Milvus backend)
      milvus.db          Milvus Lite file (Milvus backend with the default uri)
      .tmp-HOST-PID-XXXX a save in progress (or one killed mid-way: ignored, cleaned later)

Save writes a new version under a temporary name and fsyncs every file, renames it to vNNNNNN,
then atomically replaces CURRENT (temp file + os.replace + fsync of the directory) and only then
deletes older versions. A process killed at any point leaves CURRENT naming a complete version.
The side arrays are files of the version folder like the others: written and fsynced before the
manifest, renamed with the folder, so a version's rows, vectors and side arrays always agree.

Compatibility: format version 2 added the side arrays. A version-1 manifest (no "extras") reads as
an index without side arrays, and its next save writes version 2; a version-2 index is refused by
an xmr that reads only version 1 (it would drop the side arrays when saving).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xmr.atomic import fsync_dir, fsync_file, write_durable
from xmr.index.base import IndexStoreError, Manifest, RowTable

__all__ = [
    "CURRENT",
    "MANIFEST",
    "clean_stale",
    "current_version",
    "extra_file",
    "extra_writers",
    "load_extras",
    "load_npy",
    "load_table",
    "read_json",
    "save_version",
    "table_writers",
    "write_json",
    "write_npy",
]

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
_VERSION_RE = re.compile(r"^v(\d{6,})$")
CRASH_ENV = "XMR_INDEX_CRASH_AT"  # tests: SIGKILL this process at the named save stage

# Tests replace this to fail at a given stage (called with the stage name at each step of a save).
crash_hook: Callable[[str], None] | None = None


def _stage(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no flush of Python buffers
    if crash_hook is not None:
        crash_hook(name)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def current_version(directory: Path) -> Path:
    """The live version folder of an index directory, with clear errors for anything else."""
    directory = Path(directory)
    if not directory.exists():
        raise IndexStoreError(f"{directory}: no such index directory")
    if not directory.is_dir():
        raise IndexStoreError(f"{directory}: is a file, not an index directory")
    current = directory / CURRENT
    if not current.is_file():
        raise IndexStoreError(f"{directory} is not an xmr index (no {CURRENT} file); build one with "
                              "`xmr index build` or pass the index directory itself")
    name = current.read_text(encoding="utf-8", errors="replace").strip()
    if not _VERSION_RE.match(name):
        raise IndexStoreError(f"{current}: expected a version folder name like v000001, got {name[:40]!r}; the "
                              "index is corrupt, rebuild it with `xmr index build`")
    folder = directory / name
    if not (folder / MANIFEST).is_file():
        raise IndexStoreError(f"{current} names {name}, but {folder / MANIFEST} is missing; the index is corrupt, "
                              "rebuild it with `xmr index build`")
    return folder


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexStoreError(f"{path}: unreadable or not valid JSON ({e}); the index is corrupt, rebuild it "
                              "with `xmr index build`") from e


def load_npy(path: Path, *, mmap: bool = False, dtype: Any = None, ndim: int | None = None) -> np.ndarray:
    """np.load with errors that name the file; mmap=True maps it read-only instead of reading it."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise IndexStoreError(f"{path}: unreadable or truncated .npy file ({e}); the index is corrupt, rebuild "
                              "it with `xmr index build`") from e
    if dtype is not None and arr.dtype != dtype:
        raise IndexStoreError(f"{path}: expected dtype {np.dtype(dtype)}, found {arr.dtype}; the index is corrupt")
    if ndim is not None and arr.ndim != ndim:
        raise IndexStoreError(f"{path}: expected a {ndim}-D array, found shape {arr.shape}; the index is corrupt")
    return arr


def load_table(folder: Path, manifest: Manifest) -> RowTable:
    """ids.npy + paths.json of a version folder, checked against each other and the manifest."""
    ids_path, paths_path = folder / "ids.npy", folder / "paths.json"
    ids = load_npy(ids_path, dtype=np.int64, ndim=1)
    paths = read_json(paths_path)
    if not isinstance(paths, list) or len(paths) != len(ids) or not all(isinstance(p, str) for p in paths):
        raise IndexStoreError(f"{paths_path}: expected a JSON list of {len(ids)} path strings (one per id in "
                              f"{ids_path.name}); the index is corrupt, rebuild it")
    if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= manifest.next_id):
        raise IndexStoreError(f"{ids_path}: ids must be ascending, unique and below next_id={manifest.next_id}; "
                              "the index is corrupt, rebuild it")
    if manifest.count != len(ids):
        raise IndexStoreError(f"{folder / MANIFEST}: count={manifest.count} but {ids_path.name} holds "
                              f"{len(ids)} ids; the index is corrupt, rebuild it")
    return RowTable(ids, paths, manifest.next_id)


def extra_file(name: str) -> str:
    """File name of a side array in a version folder."""
    return f"extra.{name}.npy"


def load_extras(folder: Path, manifest: Manifest, rows: int, *, mmap: bool = False) -> dict[str, np.ndarray]:
    """The side arrays the manifest lists, each checked to be (rows, *shape) of its dtype; mapped with mmap."""
    source = str(folder / MANIFEST)
    out = {}
    for spec in manifest.extra_specs(source):
        path = folder / extra_file(spec.name)
        arr = load_npy(path, mmap=mmap, dtype=np.dtype(spec.dtype))
        if arr.shape != (rows, *spec.shape):
            raise IndexStoreError(f"{path}: shape {arr.shape} does not match the {rows} ids with per-row shape "
                                  f"{spec.shape} of side array {spec.name!r}; the index is corrupt, rebuild it")
        out[spec.name] = arr
    return out


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def write_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def table_writers(table: RowTable) -> dict[str, Callable[[Path], None]]:
    """Writers of ids.npy and paths.json for save_version."""
    return {"ids.npy": lambda p: write_npy(p, table.row_ids), "paths.json": lambda p: write_json(p, table.paths)}


def extra_writers(extras: Mapping[str, Any], mask: np.ndarray | None) -> dict[str, Callable[[Path], None]]:
    """Writers of extra.NAME.npy for save_version: the rows where mask is True (all when None) of each
    side array (an `xmr.index.rows.Rows`), streamed block by block."""
    return {extra_file(name): (lambda p, rows=rows: rows.write_npy(p, mask)) for name, rows in extras.items()}


def _tmp_name() -> str:
    return f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _versions(directory: Path) -> dict[int, Path]:
    out = {}
    for p in directory.iterdir():
        m = _VERSION_RE.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def save_version(directory: Path, manifest: dict[str, Any], writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write a new version (each writer writes its file at the given path) and make it the live one."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IndexStoreError(f"save({directory}): a file is in the way; choose another directory")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / _tmp_name()
    tmp.mkdir()
    try:
        _stage("begin")
        for name, write in writers.items():
            write(tmp / name)
            fsync_file(tmp / name)
            _stage(f"file:{name}")
        # last: a folder with a manifest is complete
        write_durable(tmp / MANIFEST, json.dumps(manifest, ensure_ascii=False).encode("utf-8"))
        fsync_dir(tmp)
        _stage("manifest")
        number = max(_versions(directory), default=0) + 1
        final = directory / f"v{number:06d}"
        os.rename(tmp, final)  # fails if a concurrent save took the number: nothing is overwritten
        fsync_dir(directory)
        _stage("renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _set_current(directory, final.name)
    _stage("current")
    _remove_old(directory, keep=final.name)
    return final


def _set_current(directory: Path, name: str) -> None:
    tmp = directory / (_tmp_name() + "." + CURRENT)
    try:
        write_durable(tmp, (name + "\n").encode("utf-8"))
        _stage("current-tmp")  # (atomic_write_text would do the same, without this crash-test stage)
        os.replace(tmp, directory / CURRENT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def _remove_old(directory: Path, keep: str) -> None:
    """Delete superseded versions and abandoned temporaries; failures only cost disk space."""
    for path in _versions(directory).values():
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
    clean_stale(directory)


def clean_stale(directory: Path) -> None:
    """Remove temporaries left by saves whose process is gone (this host only); best effort."""
    host = socket.gethostname()
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return
    for path in entries:
        if not path.name.startswith(TMP_PREFIX):
            continue
        owner = path.name[len(TMP_PREFIX):].removesuffix("." + CURRENT).rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _alive(int(owner[1])):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
