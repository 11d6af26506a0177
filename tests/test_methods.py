"""One test over every registered method (design.md): a forward pass on a tiny config has a finite loss, every
trainable parameter receives a gradient, save/load round-trips to identical outputs, the encoders' shapes and
dtypes, and for rerankers two-stage scoring at full depth equals brute-force scoring of every pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import toy_reranker

from xmr.config import ModelConfig
from xmr.data.datasets import ImageTextDataset, build_loader
from xmr.data.formats import load_dataset
from xmr.data.transforms import build_transform
from xmr.evaluation.metrics import topk_bounded
from xmr.evaluation.shortlist import (
    matrix_fetch,
    matrix_stage1,
    two_stage,
)
from xmr.methods import BuildContext, Method, Reranker, build_method, method_class
from xmr.methods.loading import TOKENIZER_FILE, load_checkpoint
from xmr.models.checkpoints import save_model_dir
from xmr.outputs import Embedded, QueryBatch
from xmr.registry import METHODS
from xmr.text.bpe_train import train_bpe
from xmr.text.tokenizer import ClipTokenizer

toy_reranker.register()
IMAGE_SIZE = (64, 32)
CONTEXT = 24


@pytest.fixture(scope="module")
def tiny_data(tiny_pedes):
    records = load_dataset("cuhk_pedes", tiny_pedes).train[:8]
    tokenizer = ClipTokenizer.from_merges(train_bpe([r.caption for r in records], 60))
    return records, tokenizer


def tiny_method(name: str, tokenizer: ClipTokenizer) -> Method:
    torch.manual_seed(0)
    cfg = method_class(name).Config()
    ctx = BuildContext(backbone=ModelConfig(clip="tiny", pretrained=None, image_size=IMAGE_SIZE),
                       num_classes=16, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
                       mask_id=tokenizer.mask_id, special_ids=tuple(tokenizer.special_ids), context_length=CONTEXT)
    return build_method(cfg, ctx)


def save_checkpoint(method: Method, tokenizer: ClipTokenizer, directory: Path) -> Path:
    tokenizer.save(directory.parent / "tok.gz")
    config = {"model": method.export_config(), "tokenizer": TOKENIZER_FILE, "context_length": CONTEXT,
              "image_size": list(IMAGE_SIZE)}
    return save_model_dir(directory, config, method.state_dict(),
                          extra_files={TOKENIZER_FILE: (directory.parent / "tok.gz").read_bytes()})


def train_batch(method: Method, records, tokenizer) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    dataset = ImageTextDataset(records, build_transform(True, IMAGE_SIZE),
                               lambda texts: tokenizer(texts, context_length=CONTEXT),
                               item_fn=method.item_fn(tokenizer))
    return next(iter(build_loader(dataset, len(records), shuffle=False)))


@pytest.mark.parametrize("name", METHODS.names())
def test_forward_gives_a_finite_loss_and_every_trainable_parameter_a_gradient(name, tiny_data):
    records, tokenizer = tiny_data
    method = tiny_method(name, tokenizer)
    assert isinstance(method, Method) and method.name == name
    out = method(train_batch(method, records, tokenizer))
    assert torch.isfinite(out.total) and out.parts
    torch.testing.assert_close(out.total, torch.stack(list(out.parts.values())).sum())  # sum(parts) == total
    out.total.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", METHODS.names())
def test_save_load_round_trip_and_encoder_contract(name, tiny_data, tmp_path: Path):
    _, tokenizer = tiny_data
    method = tiny_method(name, tokenizer).eval()
    loaded = load_checkpoint(save_checkpoint(method, tokenizer, tmp_path / "ckpt")).method
    assert type(loaded) is type(method)
    images = torch.rand(3, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    ids = tokenizer(["a man in a red coat", "a woman", "blue jeans and a bag"], context_length=CONTEXT)
    with torch.no_grad():
        for kind in sorted(method.query_kinds):
            query = QueryBatch(ids=ids if kind != "image" else None, images=images if kind != "text" else None)
            a, b = method.encode_query(query), loaded.encode_query(query)
            assert a.vectors.shape == (3, method.embed_dim) and a.vectors.dtype == torch.float32
            assert torch.equal(a.vectors, b.vectors)
        a, b = method.encode_gallery(images), loaded.encode_gallery(images)
        assert a.vectors.shape == (3, method.embed_dim) and a.vectors.dtype == torch.float32
        assert torch.equal(a.vectors, b.vectors)
        assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)
    if isinstance(method, Reranker):
        assert set(method.gallery_extras()) <= set(a.extras)


def _embedded(method: Method, tokenizer, n_gallery: int = 40, n_queries: int = 7) -> tuple[Embedded, Embedded]:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(n_gallery, 3, *IMAGE_SIZE, generator=g)
    texts = [f"person {i} in a {c} coat" for i, c in zip(range(n_queries), ["red", "blue", "green"] * 3)]
    with torch.no_grad():
        gallery = method.encode_gallery(images).normalized()
        queries = method.encode_query(QueryBatch(ids=tokenizer(texts, context_length=CONTEXT))).normalized()
    return queries, gallery


@pytest.mark.parametrize("name", METHODS.names())
def test_two_stages_at_full_depth_equal_brute_force(name, tiny_data):
    _, tokenizer = tiny_data
    method = tiny_method(name, tokenizer).eval()
    if not isinstance(method, Reranker):
        pytest.skip(f"{name} scores in one stage")
    queries, gallery = _embedded(method, tokenizer)
    n = len(gallery)
    ranked = two_stage(queries, n, matrix_stage1(gallery.vectors), reranker=method, depth=n,
                       fetch=matrix_fetch(gallery))
    # Brute force: the method's score for every (query, item) pair, sorted descending; ties by stage-1 order.
    every = torch.arange(n).expand(len(queries), -1)
    from xmr.outputs import Candidates

    stage1 = queries.vectors @ gallery.vectors.T
    cands = Candidates(every, stage1, gallery.vectors[every], {k: v[every] for k, v in gallery.extras.items()})
    with torch.no_grad():
        full = method.rerank(queries, cands).numpy()
    stage1_rank = np.argsort(np.argsort(-stage1.numpy(), axis=1, kind="stable"), axis=1)
    expected = np.lexsort((stage1_rank, -full), axis=1)
    np.testing.assert_array_equal(ranked.ids, expected)
    np.testing.assert_allclose(ranked.scores, np.take_along_axis(full, expected, 1), rtol=0, atol=1e-6)
    assert ranked.depth == n


def test_a_rerank_that_returns_the_first_stage_scores_equals_single_stage_bit_for_bit(tiny_data):
    _, tokenizer = tiny_data
    torch.manual_seed(0)
    method = tiny_method("toy_rerank", tokenizer).eval()
    identity = toy_reranker.IdentityReranker(method.clip, method.cfg, num_classes=method.num_classes,
                                             vocab_size=method.vocab_size).eval()
    identity.load_state_dict(method.state_dict())
    queries, gallery = _embedded(identity, tokenizer)
    for k, depth in [(5, 5), (5, 20), (10, 3), (40, 40)]:
        one = two_stage(queries, k, matrix_stage1(gallery.vectors))
        two = two_stage(queries, k, matrix_stage1(gallery.vectors), reranker=identity, depth=depth,
                        fetch=matrix_fetch(gallery))
        assert np.array_equal(one.ids, two.ids) and np.array_equal(one.scores, two.scores), (k, depth)
    _, reference_ids = topk_bounded(queries.vectors, gallery.vectors, 5)
    assert np.array_equal(one.ids[:, :5], reference_ids.numpy())


def test_reranking_changes_the_order_when_the_second_stage_disagrees(tiny_data):
    """Not a tautology: the toy's fused score reorders the shortlist (so the two tests above can fail)."""
    _, tokenizer = tiny_data
    method = tiny_method("toy_rerank", tokenizer).eval()
    queries, gallery = _embedded(method, tokenizer)
    one = two_stage(queries, 10, matrix_stage1(gallery.vectors))
    two = two_stage(queries, 10, matrix_stage1(gallery.vectors), reranker=method, depth=10,
                    fetch=matrix_fetch(gallery))
    assert not np.array_equal(one.ids, two.ids)
    assert np.array_equal(np.sort(one.ids, 1), np.sort(two.ids, 1))  # the same shortlist, re-ordered
    assert np.all(np.diff(two.scores, axis=1) <= 0)
    assert F.normalize(queries.vectors, dim=-1).shape == queries.vectors.shape


def test_two_stage_evaluation_equals_brute_force_metrics(tiny_data):
    """score_split with a reranker at full depth gives the metrics of ranking every pair by the method's score;
    at K' < G the positives beyond K' keep their first-stage ranks."""
    from xmr.data.records import EvalSplit
    from xmr.evaluation.scoring import score_split
    from xmr.evaluation.tasks import PersonTask

    _, tokenizer = tiny_data
    method = tiny_method("toy_rerank", tokenizer).eval()
    queries, gallery = _embedded(method, tokenizer)
    n = len(gallery)
    labels_g = [i % 9 for i in range(n)]
    labels_q = [q % 9 for q in range(len(queries))]
    split = EvalSplit(gallery_paths=[f"{i}.png" for i in range(n)],
                      positives=[[i for i in range(n) if labels_g[i] == lq] for lq in labels_q],
                      query_texts=["t"] * len(queries), query_labels=labels_q, gallery_labels=labels_g)
    every = torch.arange(n).expand(len(queries), -1)
    from xmr.outputs import Candidates

    stage1 = queries.vectors @ gallery.vectors.T
    with torch.no_grad():
        full = method.rerank(queries, Candidates(every, stage1, gallery.vectors[every],
                                                 {k: v[every] for k, v in gallery.extras.items()})).numpy()
    stage1_rank = np.argsort(np.argsort(-stage1.numpy(), axis=1, kind="stable"), axis=1)
    order = np.lexsort((stage1_rank, -full), axis=1)
    # Brute-force oracle: 1-based rank of each positive in the full fused ordering.
    position = np.argsort(order, axis=1) + 1
    ranks = np.zeros((len(queries), max(len(p) for p in split.positives)), dtype=np.int64)
    for q, items in enumerate(split.positives):
        ranks[q, : len(items)] = np.sort(position[q, items])
    counts = torch.tensor([len(p) for p in split.positives])
    want = PersonTask().metrics_from_ranks(torch.from_numpy(ranks), counts, split, "t2i")
    got = score_split(method, "person", split, queries, gallery, depth=n)
    assert got.protocol["rerank_depth"] == n
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert got.results["t2i"][key] == pytest.approx(want[key], abs=1e-9), key
    single = score_split(method, "person", split, queries, gallery, depth=0).results["t2i"]
    assert single != got.results["t2i"]  # the second stage changed the numbers


@pytest.mark.parametrize("mmap", [False, True])
def test_search_through_an_index_equals_evaluation_two_stages(tiny_data, tmp_path: Path, mmap: bool):
    """The Retriever's two stages (index top K', candidates' stored vectors and side arrays from the index)
    give what the evaluation path gives over the gallery matrix: one function, one score."""
    from xmr.index import create_index, open_index
    from xmr.search.retriever import Retriever

    _, tokenizer = tiny_data
    method = tiny_method("toy_rerank", tokenizer).eval()
    queries, gallery = _embedded(method, tokenizer)
    index = create_index(method.embed_dim, "toy", extra={"images_root": str(tmp_path)})
    index.add(gallery.vectors.numpy(), [f"{i}.png" for i in range(len(gallery))],
              {k: v.numpy() for k, v in gallery.extras.items()})
    index.save(tmp_path / "toy.index")
    opened = open_index(tmp_path / "toy.index", mmap=mmap)
    model = load_checkpoint(save_checkpoint(method, tokenizer, tmp_path / "ckpt"))
    retriever = Retriever(model, opened, precision="fp32", check_model=False)
    assert retriever.rerank_depth == method.rerank_depth
    for depth in (0, 5, 12):
        hits = retriever.search_vectors(queries, 6, rerank_depth=depth)
        want = two_stage(queries, 6, matrix_stage1(gallery.vectors), reranker=method, depth=depth,
                         fetch=matrix_fetch(gallery))
        assert [[h.id for h in row] for row in hits] == want.ids.tolist()
        # Side arrays come back from the index in fp16: scores agree to fp16 rounding of the patches.
        np.testing.assert_allclose([[h.score for h in row] for row in hits], want.scores, atol=2e-3)
        np.testing.assert_allclose([[h.first_stage_score for h in row] for row in hits], want.first_stage,
                                   atol=1e-6)
