"""Reference-based similarity (MMRef's refinement) through an exact d x d factorisation.

An item x (a caption or an image feature) is described by its profile against the m training references
R (m x d): p(x) = R^ x^ in R^m (cosines to every reference), centred p~ = p - mean(p) (`profile="centered"`)
or not (`"raw"`). The reference similarity is S_ref(t, v) = cos(p~(t), p~(v)).

With C = I - 11^T/m (idempotent) and M = R^^T C R^ (raw: R^^T R^), <p~(t), p~(v)> = t^^T M v^. M is d x d and
positive semi-definite; factor it once, M = W^T W (eigendecomposition in float64, negative eigenvalues from
rounding clipped to 0), and z(x) = W x^ gives S_ref(t, v) = cos(z(t), z(v)) exactly. No m-dimensional
profile is ever built: O(m d^2) once, d^2 per item, whatever m is (11,003 for CUHK-PEDES).

The refined score (1 - lam) S_init + lam S_ref with S_init = cos(t, v) equals <u(t), u(v)> for the unit
vector u(x) = [sqrt(1 - lam) x^; sqrt(lam) z^(x)], so refining a whole gallery is a plain 2d-dim search.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xmr.outputs import Candidates, Embedded

PROFILES = ("centered", "raw")
CODES = "reference_codes"  # prepared per-item codes z^(v), (N, d), when evaluation provides them


def reference_projection(references: torch.Tensor, profile: str = "centered") -> torch.Tensor:
    """W (d x d, float32) with W^T W = R^^T C R^ for the rows of `references` (m x d) L2-normalised."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: use one of {', '.join(PROFILES)}")
    refs = F.normalize(references.detach().double(), dim=-1)
    gram = refs.t() @ refs
    if profile == "centered":
        mean = refs.mean(dim=0, keepdim=True)
        gram = gram - refs.shape[0] * (mean.t() @ mean)
    gram = (gram + gram.t()) / 2  # exact symmetry for eigh
    values, vectors = torch.linalg.eigh(gram)
    return (values.clamp(min=0).sqrt()[:, None] * vectors.t()).float()


def reference_codes(features: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """z^(x) = normalise(W x^) for (..., d) features; rows with ||W x^|| = 0 stay 0 (so S_ref = 0)."""
    z = F.linear(F.normalize(features.float(), dim=-1), projection)  # x W^T without a transposed copy
    return F.normalize(z, dim=-1)  # F.normalize leaves zero rows at zero (eps in the denominator)


def refined_scores(initial: torch.Tensor, reference: torch.Tensor, lam: float) -> torch.Tensor:
    """S = (1 - lam) S_init + lam S_ref."""
    return (1.0 - lam) * initial + lam * reference


def refined_vectors(features: torch.Tensor, projection: torch.Tensor, lam: float) -> torch.Tensor:
    """u(x) = [sqrt(1 - lam) x^; sqrt(lam) z^(x)] (..., 2d): <u(t), u(v)> is the refined score of (t, v)."""
    unit = F.normalize(features.float(), dim=-1)
    codes = reference_codes(features, projection)
    return torch.cat([(1.0 - lam) ** 0.5 * unit, lam**0.5 * codes], dim=-1)


class ReferenceRefiner:
    """MMRef's query-time refinement as a second scoring stage (it satisfies `methods.base.Reranker`).

    For the top `rerank_depth` (k) candidates of a query: S = (1 - lam) S_init + lam S_ref, S_init the
    first-stage cosine, S_ref the reference similarity above. The candidates' stored vectors are read;
    no side array is needed, so any existing index of the same encoders can be refined.
    The projection W is computed once from the references (float64 eigendecomposition).
    """

    def __init__(self, references: torch.Tensor, *, k: int = 100, lam: float = 0.3,
                 profile: str = "centered") -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"refinement lambda={lam} must be in [0, 1]")
        if k < 0:
            raise ValueError(f"refinement k={k} must be >= 0")
        self.rerank_depth, self.lam, self.profile = int(k), float(lam), profile
        self.projection = reference_projection(references, profile)

    def gallery_extras(self) -> tuple[str, ...]:
        return ()

    def prepare_gallery(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every gallery item's code once (evaluation), instead of once per shortlist it appears in."""
        return {CODES: reference_codes(vectors, self.projection)}

    def rerank_explained(self, query: Embedded, candidates: Candidates) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Q, K') refined scores and their parts: `initial_score` (S_init), `reference_score` (S_ref).
        The candidates' codes come from `candidates.extras` when prepared, else from their vectors."""
        z_query = reference_codes(query.vectors, self.projection)  # (Q, d)
        z_items = candidates.extras.get(CODES)
        if z_items is None:
            if candidates.vectors is None:
                raise ValueError("reference refinement needs the candidates' stored vectors")
            z_items = reference_codes(candidates.vectors, self.projection)  # (Q, K', d)
        reference = torch.einsum("qd,qkd->qk", z_query, z_items)
        initial = candidates.scores.float()
        return refined_scores(initial, reference, self.lam), {"initial_score": initial,
                                                              "reference_score": reference}

    def rerank(self, query: Embedded, candidates: Candidates) -> torch.Tensor:
        return self.rerank_explained(query, candidates)[0]

    def full_scope_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """u(x) for every item: exact refinement of the whole gallery is an inner-product search on these."""
        return refined_vectors(vectors, self.projection, self.lam)
