"""The contract every retrieval method implements; the engine, evaluator, search and service rely only on it.

A method composes encoders, heads and losses and owns its hyper-parameters (a `Config` dataclass filled
from the YAML `method:` section). Optional capabilities are runtime-checkable protocols, tested with
`isinstance`, never with `hasattr` or class names:

- `Reranker`: a second scoring stage over stage 1's shortlist (AsCL's fused score, MMRef's refinement).
- `TrainHooks`: callbacks around the optimiser step with state saved in the resume checkpoint (GCKD's
  EMA teacher and memory banks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from xmr.data.records import ImageText
from xmr.outputs import Candidates, Embedded, LossOutput, QueryBatch

Transform = Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) float tensor
ItemFn = Callable[[ImageText, Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class MethodConfig:
    """Base of every method's config dataclass: `name` is the registry name (the YAML `method.name`)."""

    name: str = ""

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range (override per method)."""


@dataclass
class BuildContext:
    """What building a method needs beyond its own config: the shared backbone settings and the data.

    backbone: the experiment's `model` section (xmr.config.ModelConfig).
    num_classes: training identities or classes (0 when the data has none).
    vocab_size / eot_id / mask_id: the tokenizer's; context_length: token sequence length.
    """

    backbone: Any
    num_classes: int
    vocab_size: int
    eot_id: int
    mask_id: int
    special_ids: tuple[int, ...] = ()
    context_length: int = 77
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParamRule:
    """An optimiser rule for parameters whose name starts with `prefix`.

    lr_factor: multiplies the base lr (None: the experiment's `optim.new_module_lr_factor`, the usual
    choice for randomly initialised heads); weight_decay: overrides `optim.weight_decay` (None keeps it).
    """

    prefix: str
    lr_factor: float | None = None
    weight_decay: float | None = None


@runtime_checkable
class Method(Protocol):
    """A retrieval method: encoders + named, weighted losses.

    `forward(batch)` is the training step (so DDP wraps it unchanged) and returns a LossOutput whose `total`
    is backpropagated and whose `parts` are logged. `encode_query` / `encode_gallery` return `Embedded`
    whose vectors are compared by cosine similarity in stage 1.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    tasks: ClassVar[frozenset[str]]  # task kinds it can be evaluated on: "person", "image_text", "composed"
    query_kinds: ClassVar[frozenset[str]]  # "text", "image", "composed"

    @property
    def embed_dim(self) -> int: ...

    @classmethod
    def build(cls, cfg: Any, ctx: BuildContext) -> Method: ...

    @classmethod
    def from_exported(cls, exported: dict[str, Any]) -> Method: ...

    def export_config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network from a checkpoint (no weights); includes "method"."""
        ...

    def item_fn(self, tokenizer: Any) -> ItemFn:
        """Method-specific preparation of one training item: (record, base fields) -> extra fields."""
        ...

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput: ...

    def encode_query(self, query: QueryBatch) -> Embedded: ...

    def encode_gallery(self, images: torch.Tensor) -> Embedded: ...

    def query_transform(self) -> Transform:
        """Evaluation-time transform of query images (image and composed queries)."""
        ...

    def gallery_transform(self) -> Transform:
        """Evaluation-time transform of gallery images."""
        ...

    def param_rules(self) -> list[ParamRule]:
        """Optimiser rules by parameter-name prefix (heads with their own learning rate, no-decay tensors)."""
        ...

    # nn.Module's API, which every method has
    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Reranker(Protocol):
    """A second scoring stage: re-score stage 1's top `rerank_depth` gallery items of each query.

    `rerank(query, candidates)` gets the queries' normalised Embedded and the shortlist (ids, first-stage
    scores, stored vectors and extras) and returns (Q, K') final scores; the caller re-sorts by them.
    """

    rerank_depth: int

    def rerank(self, query: Embedded, candidates: Candidates) -> torch.Tensor: ...

    def gallery_extras(self) -> tuple[str, ...]:
        """Names of the `Embedded.extras` of gallery items that `rerank` reads (stored with the index)."""
        ...


@runtime_checkable
class ExplainedReranker(Reranker, Protocol):
    """A Reranker that also reports the parts of its score (e.g. MMRef's `initial_score` and
    `reference_score`, AsCL's `score_global` and `score_local`); search results carry them."""

    def rerank_explained(self, query: Embedded, candidates: Candidates) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Q, K') final scores (as `rerank`) and name -> (Q, K') parts."""
        ...


@runtime_checkable
class Refinable(Reranker, Protocol):
    """A Reranker whose second stage has settings a user tunes at query time (MMRef's k and lambda)."""

    def set_refinement(self, *, k: int | None = None, lam: float | None = None, profile: str | None = None) -> None:
        ...

    def refinement_settings(self) -> dict[str, Any]:
        """The current settings as a report records them (e.g. k, lam, profile, number of references)."""
        ...


@runtime_checkable
class FullScopeReranker(Reranker, Protocol):
    """A Reranker whose score over the whole gallery is an inner product of transformed vectors, so the
    exact second-stage ranking of every item can be computed (measures what the top-K' shortlist loses)."""

    def full_scope_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised vectors (queries or gallery) -> (N, D') whose inner products are final scores."""
        ...


@runtime_checkable
class PreparesGallery(Reranker, Protocol):
    """A Reranker whose per-item work can be done once per gallery instead of once per candidate.

    Evaluation scores every query's K' candidates against one in-memory gallery: it calls
    `prepare_gallery` once and hands the arrays to `rerank` in `candidates.extras` (gathered like stored
    side arrays). Search calls `rerank` without them, and the reranker computes the same values per
    candidate (equal up to float rounding of the batch shape)."""

    def prepare_gallery(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, D) normalised gallery vectors -> named (N, ...) arrays that `rerank` may find in extras."""
        ...


@runtime_checkable
class InitialisesFromData(Protocol):
    """A method that sets some parameters from the training data before the first step (MMRef's
    `ref_init: class_mean`); not called when a run resumes (the checkpoint holds them)."""

    def initialise_from_data(self, batches: Iterable[dict[str, torch.Tensor]]) -> None: ...


@runtime_checkable
class TrainHooks(Protocol):
    """Callbacks the trainer calls around optimisation; their state goes into the resume checkpoint."""

    def on_epoch_start(self, epoch: int) -> None: ...

    def after_step(self, step: int) -> None: ...

    def hook_state_dict(self) -> dict[str, Any]: ...

    def load_hook_state_dict(self, state: dict[str, Any]) -> None: ...


def supports_query(method: Method, kind: str) -> bool:
    """Whether `method` answers queries of `kind` ("text", "image", "composed") natively."""
    return kind in method.query_kinds
