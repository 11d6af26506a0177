"""MMRef: its losses against hand-computed values, the stop-gradients by gradients, the refinement against
a brute-force recomputation with explicit m-dimensional profiles, the references' optimiser group and
checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmr import losses
from xmr.config import ModelConfig, OptimConfig
from xmr.data.formats import load_dataset
from xmr.engine.optim import build_param_groups
from xmr.errors import CheckpointError, ConfigError
from xmr.evaluation.scoring import score_split
from xmr.evaluation.shortlist import matrix_fetch, matrix_stage1, two_stage
from xmr.methods import BuildContext, build_method
from xmr.methods.base import ExplainedReranker, FullScopeReranker, PreparesGallery, Reranker
from xmr.methods.mmref import MMRef, MMRefConfig
from xmr.models.references import ReferenceRefiner, reference_codes, reference_projection
from xmr.outputs import Embedded

# -- losses -------------------------------------------------------------------------------------------


def test_proxy_softmax_loss_matches_the_spec_hand_case():
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # row 0: cosines (1, 0, -1) / 0.5 -> -log(e^2 / (e^2 + 1 + e^-2)); row 1: (0, 1, 0) / 0.5
    row0 = math.log(1 + math.exp(-2) + math.exp(-4))
    row1 = math.log(1 + 2 * math.exp(-2))
    assert row0 == pytest.approx(0.142932, abs=1e-6) and row1 == pytest.approx(0.239545, abs=1e-6)
    loss = losses.proxy_softmax_loss(feats, refs, labels, 0.5)
    assert loss.item() == pytest.approx(0.191238, abs=1e-6)
    # L_rgrl and L_fuse are the same function with the stop-gradient on the other side: equal values
    assert losses.proxy_softmax_loss(feats.detach(), refs, labels, 0.5).item() == pytest.approx(loss.item())
    assert losses.proxy_softmax_loss(feats * 3.0, refs, labels, 0.5).item() == pytest.approx(loss.item())


def test_proxy_anchor_loss_by_hand():
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    a, d = 4.0, 0.1
    cos = [[1, 0, -1], [0, 1, 0], [0.6, 0.8, -0.6]]
    pos = {0: [0], 1: [1, 2]}
    pos_loss = sum(math.log(1 + sum(math.exp(-a * (cos[x][p] - d)) for x in xs)) for p, xs in pos.items()) / 2
    neg_loss = sum(math.log(1 + sum(math.exp(a * (cos[x][p] + d)) for x in range(3) if labels[x] != p))
                   for p in range(3)) / 3
    got = losses.proxy_anchor_loss(feats, refs, labels, alpha=a, delta=d)
    assert got.item() == pytest.approx(pos_loss + neg_loss, rel=1e-5)


# -- the method -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tiny_pedes):
    from xmr.text.bpe_train import train_bpe
    from xmr.text.tokenizer import ClipTokenizer

    records = load_dataset("cuhk_pedes", tiny_pedes).train[:8]
    tokenizer = ClipTokenizer.from_merges(train_bpe([r.caption for r in records], 60))
    return records, tokenizer


def tiny_mmref(tokenizer, **fields) -> MMRef:
    torch.manual_seed(0)
    cfg = MMRefConfig(**fields)
    ctx = BuildContext(backbone=ModelConfig(clip="tiny", pretrained=None, image_size=(64, 32)), num_classes=16,
                       vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id, mask_id=tokenizer.mask_id,
                       special_ids=tuple(tokenizer.special_ids), context_length=24)
    return build_method(cfg, ctx)


def batch_for(method, records, tokenizer):
    from xmr.data.datasets import ImageTextDataset, build_loader
    from xmr.data.transforms import build_transform

    torch.manual_seed(1)
    dataset = ImageTextDataset(records, build_transform(False, (64, 32)),
                               lambda texts: tokenizer(texts, context_length=24), item_fn=method.item_fn(tokenizer))
    return next(iter(build_loader(dataset, len(records), shuffle=False)))


def grads_after(method, batch) -> tuple[torch.Tensor | None, bool]:
    method.zero_grad(set_to_none=True)
    method(batch).total.backward()
    encoder = any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.clip.parameters())
    return method.references.grad, encoder


@pytest.mark.parametrize("loss,refs_learn,encoders_learn", [
    ("fuse", True, False),   # global fusion: references absorb stop-gradient features
    ("rgrl", False, True),   # reference-guided learning: features against detached references
    ("lr", True, True),      # local reconstruction reaches the references and the text tower
])
def test_each_loss_moves_only_what_its_stop_gradient_allows(loss, refs_learn, encoders_learn, tiny_setup):
    records, tokenizer = tiny_setup
    # sdm with weight 0 keeps the alignment requirement satisfied without contributing a gradient
    method = tiny_mmref(tokenizer, losses=["sdm", loss], sdm_weight=0.0)
    ref_grad, encoder_moved = grads_after(method, batch_for(method, records, tokenizer))
    assert (ref_grad is not None and ref_grad.abs().sum() > 0) == refs_learn
    assert encoder_moved == encoders_learn


def test_proxy_anchor_rgrl_reaches_only_the_encoders(tiny_setup):
    records, tokenizer = tiny_setup
    method = tiny_mmref(tokenizer, losses=["sdm", "rgrl"], sdm_weight=0.0, rgrl_form="proxy_anchor")
    ref_grad, encoder_moved = grads_after(method, batch_for(method, records, tokenizer))
    assert ref_grad is None and encoder_moved


def test_references_have_their_own_optimiser_group_without_weight_decay(tiny_setup):
    _, tokenizer = tiny_setup
    method = tiny_mmref(tokenizer, ref_lr_factor=7.0)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, new_module_lr_factor=2.0, bias_lr_factor=1.0)
    groups = build_param_groups(method, cfg, method.param_rules())
    (group,) = [g for g in groups if any(p is method.references for p in g["params"])]
    assert group["lr"] == pytest.approx(7e-3) and group["weight_decay"] == 0.0
    assert all(p is method.references for p in group["params"])
    head = next(g for g in groups if any(p is method.mlm_head.fc.weight for p in g["params"]))
    assert head["lr"] == pytest.approx(2e-3)


def test_config_checks(tiny_setup):
    _, tokenizer = tiny_setup
    with pytest.raises(ConfigError, match="alignment loss"):
        MMRefConfig(losses=["fuse", "rgrl"]).validate()
    with pytest.raises(ConfigError, match="rgrl_form"):
        MMRefConfig(rgrl_form="arcface").validate()
    with pytest.raises(ConfigError, match="num_references=5 but the training data has 16"):
        tiny_mmref(tokenizer, num_references=5)


def test_checkpoint_round_trip_and_m_checked(tiny_setup, tmp_path):
    _, tokenizer = tiny_setup
    method = tiny_mmref(tokenizer)
    with torch.no_grad():
        method.references.add_(1.0)
    clone = MMRef.from_exported(method.export_config())
    clone.load_state_dict(method.state_dict())
    torch.testing.assert_close(clone.references, method.references)
    assert clone.cfg == method.cfg and clone.num_classes == 16
    other = MMRef.from_exported({**method.export_config(), "num_classes": 12})
    with pytest.raises(CheckpointError, match="16 MMRef references .* this model 12"):
        other.load_state_dict(method.state_dict())


def test_class_mean_init_averages_both_modalities(tiny_setup):
    records, tokenizer = tiny_setup
    method = tiny_mmref(tokenizer, ref_init="class_mean")
    before = method.references.detach().clone()
    batch = batch_for(method, records, tokenizer)
    method.initialise_from_data([batch])
    method.eval()
    with torch.no_grad():
        f_i = F.normalize(method.clip.encode_image(batch["images"]).pooled.float(), dim=-1)
        f_t = F.normalize(method.clip.encode_text(batch["ids"]).pooled.float(), dim=-1)
    pid = int(batch["pids"][0])
    rows = batch["pids"] == pid
    torch.testing.assert_close(method.references[pid], (f_i[rows].sum(0) + f_t[rows].sum(0)) / (2 * rows.sum()))
    unseen = [c for c in range(16) if c not in set(batch["pids"].tolist())]
    torch.testing.assert_close(method.references[unseen], before[unseen])


def test_refinement_protocols(tiny_setup):
    _, tokenizer = tiny_setup
    method = tiny_mmref(tokenizer)
    assert isinstance(method, Reranker) and isinstance(method, ExplainedReranker)
    assert isinstance(method, FullScopeReranker)
    method.set_refinement(k=7, lam=0.5)
    assert method.rerank_depth == 7 and method.refiner().lam == 0.5
    with pytest.raises(ConfigError):
        method.set_refinement(lam=1.5)


# -- refinement against brute force --------------------------------------------------------------------


def brute_force_refined(queries, gallery, refs, k, lam):
    """Per query: top-k by cosine (ties: gallery index), re-sorted by (1-lam) cos + lam cos(centred profiles)
    with explicit m-dim profiles (ties: first-stage position); the rest keep their order."""
    qn, gn, rn = F.normalize(queries, dim=-1), F.normalize(gallery, dim=-1), F.normalize(refs, dim=-1)
    pq, pg = qn @ rn.t(), gn @ rn.t()
    pq, pg = pq - pq.mean(1, keepdim=True), pg - pg.mean(1, keepdim=True)
    s_ref = F.normalize(pq, dim=-1) @ F.normalize(pg, dim=-1).t()
    s_init = qn @ gn.t()
    out = []
    for q in range(len(queries)):
        order = sorted(range(len(gallery)), key=lambda g: (-float(s_init[q, g]), g))
        head = order[:k]
        final = {g: (1 - lam) * float(s_init[q, g]) + lam * float(s_ref[q, g]) for g in head}
        head = [g for _, g in sorted(((-final[g], i), g) for i, g in enumerate(head))]
        out.append(head + order[k:])
    return out


@pytest.mark.parametrize("k", [1, 10, 53, 80])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_refinement_equals_brute_force_with_explicit_profiles(k, lam):
    gen = torch.Generator().manual_seed(k * 10 + int(lam * 10))
    queries = torch.randn(7, 8, generator=gen, dtype=torch.float64).float()
    gallery = torch.randn(53, 8, generator=gen, dtype=torch.float64).float()
    gallery[10] = gallery[3]  # duplicates tie on both scores: first-stage order decides
    gallery[40] = gallery[3]
    refs = torch.randn(11, 8, generator=gen)
    refiner = ReferenceRefiner(refs, k=k, lam=lam)
    gnorm = Embedded(gallery).normalized()
    ranked = two_stage(Embedded(queries).normalized(), 53, matrix_stage1(gnorm.vectors), reranker=refiner,
                       depth=k, fetch=matrix_fetch(gnorm))
    expected = brute_force_refined(queries.double(), gallery.double(), refs.double(), k, lam)
    for q in range(7):
        got = ranked.ids[q].tolist()
        # near-equal scores may swap between float32 and float64: compare scores at mismatches
        if got != expected[q]:
            mism = [i for i, (a, b) in enumerate(zip(got, expected[q])) if a != b]
            s = ranked.scores[q]
            assert all(abs(s[i] - s[j]) < 1e-5 for i in mism for j in mism), (q, mism)
    if lam == 0.0:  # refinement with weight 0 keeps the initial order exactly
        plain = two_stage(Embedded(queries).normalized(), 53, matrix_stage1(gnorm.vectors))
        np.testing.assert_array_equal(ranked.ids, plain.ids)


def test_factorisation_reproduces_profile_cosines_and_zero_codes():
    gen = torch.Generator().manual_seed(3)
    refs, x = torch.randn(11, 8, generator=gen), torch.randn(20, 8, generator=gen)
    rn, xn = F.normalize(refs, dim=-1), F.normalize(x, dim=-1)
    for profile in ("centered", "raw"):
        p = xn @ rn.t()
        if profile == "centered":
            p = p - p.mean(1, keepdim=True)
        w = reference_projection(refs, profile)
        z = reference_codes(x, w)
        torch.testing.assert_close(z @ z.t(), F.normalize(p, dim=-1) @ F.normalize(p, dim=-1).t(), atol=1e-5, rtol=0)
    # one reference: every centred profile is 0, so S_ref = 0 (not NaN)
    w = reference_projection(refs[:1], "centered")
    assert torch.count_nonzero(reference_codes(x, w)) == 0


def test_full_scope_vectors_give_the_refined_score_of_every_pair():
    gen = torch.Generator().manual_seed(4)
    refs, q, g = torch.randn(11, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.randn(30, 8, generator=gen)
    refiner = ReferenceRefiner(refs, k=30, lam=0.3)
    full = refiner.full_scope_vectors(q) @ refiner.full_scope_vectors(g).t()
    qn, gn = F.normalize(q, dim=-1), F.normalize(g, dim=-1)
    w = refiner.projection
    expected = 0.7 * qn @ gn.t() + 0.3 * reference_codes(q, w) @ reference_codes(g, w).t()
    torch.testing.assert_close(full, expected, atol=1e-6, rtol=0)


def test_refined_metrics_equal_the_brute_force_reranked_lists():
    from xmr.data.records import EvalSplit

    gen = torch.Generator().manual_seed(5)
    labels_g = torch.arange(40) % 8
    labels_q = torch.arange(24) % 8
    gallery = F.normalize(torch.randn(40, 8, generator=gen) + 0.8 * F.one_hot(labels_g, 8).float(), dim=-1)
    queries = F.normalize(torch.randn(24, 8, generator=gen) + 0.8 * F.one_hot(labels_q, 8).float(), dim=-1)
    refs = torch.randn(6, 8, generator=gen)
    positives = [[g for g in range(40) if labels_g[g] == labels_q[q]] for q in range(24)]
    split = EvalSplit(gallery_paths=[f"{i}.jpg" for i in range(40)], positives=positives,
                      query_texts=[f"q{i}" for i in range(24)])
    for k in (5, 40):
        refiner = ReferenceRefiner(refs, k=k, lam=0.5)
        got = score_split(refiner, "person", split, Embedded(queries), Embedded(gallery)).results["t2i"]
        lists = brute_force_refined(queries.double(), gallery.double(), refs.double(), k, 0.5)
        r1 = 100.0 * np.mean([lists[q][0] in positives[q] for q in range(24)])
        ap = []
        for q in range(24):
            hits = [i for i, g in enumerate(lists[q]) if g in positives[q]]
            ap.append(np.mean([(n + 1) / (i + 1) for n, i in enumerate(hits)]))
        assert got["R1"] == pytest.approx(r1, abs=1e-4)
        assert got["mAP"] == pytest.approx(100.0 * np.mean(ap), abs=1e-3)
        if k == 40:  # a full-depth shortlist is the full refinement
            full = score_split(refiner, "person", split, Embedded(refiner.full_scope_vectors(queries)),
                               Embedded(refiner.full_scope_vectors(gallery)), depth=0).results["t2i"]
            for name in ("R1", "R5", "R10", "mAP", "mINP"):
                assert got[name] == pytest.approx(full[name], abs=1e-3)


@pytest.mark.parametrize("name", ["cuhk_pedes", "icfg_pedes", "rstpreid", "cub", "flowers102", "demo"])
def test_mmref_recipes_load_as_mmref(name):
    from conftest import REPO

    from xmr.config import load_config

    cfg = load_config(REPO / f"configs/mmref/{name}.yaml")
    assert cfg.method.name == "mmref" and cfg.method.losses == ["sdm", "fuse", "lr", "rgrl"]
    assert cfg.train.output_dir.endswith(name if name != "demo" else "run")
    if name != "demo":
        assert cfg.model.clip == "ViT-B/16" and cfg.optim.lr == pytest.approx(1e-5)


def test_a_recipe_for_another_method_replaces_the_base_method_section(tmp_path):
    from xmr.config import load_config

    (tmp_path / "base.yaml").write_text("method: {name: irra, cmt_depth: 2}\noptim: {lr: 0.5}\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nmethod: {name: mmref, lr_depth: 2}\n")
    (tmp_path / "same.yaml").write_text("base: base.yaml\nmethod: {temperature: 0.1}\n")
    top = load_config(tmp_path / "top.yaml")
    assert top.method.name == "mmref" and top.method.lr_depth == 2 and top.optim.lr == 0.5
    same = load_config(tmp_path / "same.yaml")
    assert same.method.name == "irra" and same.method.cmt_depth == 2 and same.method.temperature == 0.1


def test_prepared_gallery_codes_give_the_per_candidate_scores():
    """Evaluation computes each gallery item's code once (PreparesGallery); search computes it per
    candidate: the same refined scores up to float rounding, the same order."""
    gen = torch.Generator().manual_seed(11)
    gallery = F.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    queries = F.normalize(torch.randn(20, 16, generator=gen), dim=-1)
    refiner = ReferenceRefiner(torch.randn(9, 16, generator=gen), k=40, lam=0.4)
    assert isinstance(refiner, PreparesGallery)
    stage1 = matrix_stage1(gallery)
    per_candidate = two_stage(Embedded(queries), 10, stage1, reranker=refiner, depth=40,
                              fetch=matrix_fetch(Embedded(gallery)))
    prepared = two_stage(Embedded(queries), 10, stage1, reranker=refiner, depth=40,
                         fetch=matrix_fetch(Embedded(gallery), refiner.prepare_gallery(gallery)))
    assert np.array_equal(per_candidate.ids, prepared.ids)
    np.testing.assert_allclose(per_candidate.scores, prepared.scores, atol=1e-6)
    np.testing.assert_allclose(per_candidate.parts["reference_score"], prepared.parts["reference_score"], atol=1e-6)
