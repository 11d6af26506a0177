"""Seeded embedding-like vectors for index tests and benchmarks.

Uniform random unit vectors in 512-d are a poor stand-in for real embeddings: every point is nearly
orthogonal to every other, so "nearest neighbours" are noise and ANN recall is meaningless. Real
image/text embeddings are clustered (identities, scenes), vary locally along few directions (pose,
lighting) and share some dominant directions across the whole set (anisotropy). The mixture here
mimics that: a point is its cluster centre (a random unit vector) plus
* local noise in a low-rank subspace of its own cluster (`rank` dims, norm `spread`),
* global noise in one low-rank subspace shared by all clusters (norm `shared`),
* a little isotropic noise in all dimensions (norm `isotropic`),
renormalised onto the unit sphere; both low-rank parts have a decaying (power-law) spectrum.

The mixture (centres, subspaces) is fixed by ``seed``; ``stream`` picks an independent sample of
the same mixture, so ``sample_queries`` draws queries from the gallery distribution without
reusing gallery points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Mixture", "clustered_vectors", "exact_topk", "recall_at_k", "sample_queries"]

_CHUNK = 65_536  # rows generated at once: bounds temporaries to ~chunk x dim floats


@dataclass(frozen=True)
class Mixture:
    """Shape of the synthetic embedding distribution (see the module docstring)."""

    dim: int = 512
    clusters: int = 1000
    spread: float = 0.7     # norm of the per-cluster low-rank noise relative to the (unit) centre
    rank: int = 16          # dimension of each low-rank subspace (the data's local intrinsic dimension)
    shared: float = 0.4     # norm of the low-rank noise shared by all clusters (global anisotropy)
    isotropic: float = 0.1  # norm of the full-dimensional noise
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.clusters < 1 or self.rank < 1:
            raise ValueError(f"dim, clusters and rank must be >= 1, got {self.dim}, {self.clusters}, {self.rank}")
        if min(self.spread, self.shared, self.isotropic) < 0:
            raise ValueError("spread, shared and isotropic must be >= 0")

    def parameters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """centres (clusters, dim), local bases (clusters, rank, dim) and shared basis (rank, dim).

        Bases are scaled so that z @ basis with z ~ N(0, I) has expected squared norm 1.
        """
        rng = np.random.default_rng([self.seed, 0])
        centres = _unit(rng.standard_normal((self.clusters, self.dim), dtype=np.float32))
        rank = min(self.rank, self.dim)
        spectrum = 1.0 / np.sqrt(np.arange(1, rank + 1))  # power-law decay like real embeddings
        spectrum = (spectrum / np.linalg.norm(spectrum)).astype(np.float32)
        # random Gaussian rows in high dimension are nearly orthonormal after dividing by sqrt(dim)
        local = rng.standard_normal((self.clusters, rank, self.dim), dtype=np.float32) / np.float32(np.sqrt(self.dim))
        local *= spectrum[None, :, None]
        shared, _ = np.linalg.qr(rng.standard_normal((self.dim, rank)))
        return centres, local, (shared.T * spectrum[:, None]).astype(np.float32)

    def sample(self, n: int, *, stream: int = 0, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """n points of the mixture; equal arguments give equal arrays."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        centres, local, shared = self.parameters()
        rng = np.random.default_rng([self.seed, 1, stream])
        out = np.empty((n, self.dim), dtype=dtype)
        iso = np.float32(self.isotropic / np.sqrt(self.dim))
        for start in range(0, n, _CHUNK):
            m = min(_CHUNK, n - start)
            labels = rng.integers(0, self.clusters, m)
            x = centres[labels]
            x += self.spread * _local_noise(rng, labels, local)
            x += self.shared * (rng.standard_normal((m, shared.shape[0]), dtype=np.float32) @ shared)
            x += iso * rng.standard_normal((m, self.dim), dtype=np.float32)
            out[start : start + m] = _unit(x)
        return out


def _local_noise(rng: np.random.Generator, labels: np.ndarray, local: np.ndarray) -> np.ndarray:
    """z @ local[label] per row, one matmul per cluster (gathering a basis per row would need GBs)."""
    z = rng.standard_normal((len(labels), local.shape[1]), dtype=np.float32)
    out = np.empty((len(labels), local.shape[2]), dtype=np.float32)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for group in np.split(order, bounds):
        if len(group):
            out[group] = z[group] @ local[labels[group[0]]]
    return out


def clustered_vectors(n: int, dim: int = 512, *, clusters: int = 1000, spread: float = 0.7, rank: int = 16,
                      shared: float = 0.4, isotropic: float = 0.1, seed: int = 0, stream: int = 0,
                      dtype: np.dtype | type = np.float32) -> np.ndarray:
    """n L2-normalised embedding-like vectors (n, dim): a seeded Gaussian mixture on the unit sphere."""
    mixture = Mixture(dim=dim, clusters=clusters, spread=spread, rank=rank, shared=shared, isotropic=isotropic,
                      seed=seed)
    return mixture.sample(n, stream=stream, dtype=dtype)


def sample_queries(n: int, dim: int = 512, *, stream: int = 1, **mixture: object) -> np.ndarray:
    """Queries from the same mixture as `clustered_vectors(**mixture)` but an independent sample."""
    if stream == 0:
        raise ValueError("stream 0 is the gallery sample; queries need another stream")
    return clustered_vectors(n, dim, stream=stream, **mixture)  # type: ignore[arg-type]


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (scores desc, row indices) with numpy: the ground truth."""
    queries = np.atleast_2d(queries)
    k = min(k, len(base))
    chunk = max(1, min(1024, 2**26 // max(len(base), 1)))  # query block: score matrix <= 256 MiB
    scores = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        sim = queries[start : start + chunk] @ base.T
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sim, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        rows[start : start + chunk] = np.take_along_axis(part, order, axis=1)
        scores[start : start + chunk] = np.take_along_axis(part_scores, order, axis=1)
    return scores, rows


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of each row's true top-k ids that `found`'s top-k contains."""
    k = k or truth.shape[1]
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
