"""The inference fast path (`xmr.methods.inference`) gives the simple path's embeddings, metrics and hits.

Tolerances, on L2-normalised embeddings e_fast and e_ref (the method's own encoders in fp32, eagerly):
- fp32 (eager or compiled): max |e_fast - e_ref| <= 1e-5 over all elements.
- bf16 (autocast, bf16 weights, compiled): "within 1e-3" means 1 - cos(e_fast, e_ref) <= 1e-3 for every
  embedding, i.e. |e_fast - e_ref|_2 <= 0.045. An element-wise 1e-3 bound is not what bf16 can promise:
  its 8-bit mantissa rounds each value by up to 2^-9 relative, and on ViT-B/16 the largest element error
  is ~1.6e-3 while 1 - cos stays ~5e-5 (benchmarks/encode.py reports both). We also bound the
  element-wise error by 1e-2, far above the 2-layer tiny model's error but below an embedding's
  typical element (~0.18 at D = 32), so a wrong recipe fails.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmr.methods.inference import InferenceEncoder, compile_available, inference_copy, prepare_encoder
from xmr.methods.irra import IRRA, IRRAConfig
from xmr.models.clip import CLIP, LayerNorm, get_clip_config
from xmr.outputs import QueryBatch

COMPILE_OK, COMPILE_WHY = compile_available()
needs_compile = pytest.mark.skipif(not COMPILE_OK, reason=f"torch.compile unavailable: {COMPILE_WHY}")


@pytest.fixture(scope="module")
def tiny_method() -> IRRA:
    torch.manual_seed(0)
    return IRRA(CLIP(get_clip_config("tiny")), IRRAConfig(losses=["itc"])).eval()


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 64, 32, generator=gen)
    ids = torch.randint(1, 999, (6, 32), generator=gen)
    return images, ids


def reference(method, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return F.normalize(method.encode_image(images), dim=-1), F.normalize(method.encode_text(ids), dim=-1)


def fast(encoder: InferenceEncoder, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    gallery = encoder.encode_gallery(images).vectors
    text = encoder.encode_query(QueryBatch(ids=ids)).vectors
    image_query = encoder.encode_query(QueryBatch(images=images)).vectors
    assert torch.equal(image_query, gallery)  # IRRA's image queries and gallery share the image tower
    return F.normalize(gallery, dim=-1), F.normalize(text, dim=-1)


def assert_bf16_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == ref.shape
    one_minus_cos = 1 - (got * ref).sum(-1)
    assert float(one_minus_cos.max()) <= 1e-3
    assert float((got - ref).abs().max()) <= 1e-2


def test_fp32_eager_is_the_method_exactly(tiny_method, inputs):
    encoder = prepare_encoder(tiny_method, "fp32")
    for got, ref in zip(fast(encoder, *inputs), reference(tiny_method, *inputs)):
        assert torch.equal(got, ref)
    assert encoder.describe()["cast_weights"] is False and prepare_encoder(encoder) is encoder


@pytest.mark.parametrize("cast", [False, True], ids=["autocast", "bf16-weights"])
def test_bf16_within_tolerance(tiny_method, inputs, cast):
    encoder = InferenceEncoder(tiny_method, "bf16", cast_weights=cast)
    assert encoder.cast_weights is cast
    for got, ref in zip(fast(encoder, *inputs), reference(tiny_method, *inputs)):
        assert_bf16_close(got, ref)
        assert not torch.equal(got, ref)  # bf16 really ran


def test_bf16_default_casts_a_copy_and_leaves_the_method_alone(tiny_method):
    before = {k: v.clone() for k, v in tiny_method.state_dict().items()}
    tiny_method.train()
    encoder = prepare_encoder(tiny_method, "bf16")
    assert encoder.cast_weights  # the measured default on CPU
    copy = encoder._model
    assert copy.clip.visual.conv1.weight.dtype == torch.bfloat16
    norms = [m for m in copy.modules() if isinstance(m, LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    # LayerNorm weights are shared, not rounded through bf16.
    assert copy.clip.ln_final.weight is tiny_method.clip.ln_final.weight
    assert tiny_method.training and not copy.training
    after = tiny_method.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    tiny_method.eval()


def test_inference_copy_without_dtype_shares_parameters(tiny_method):
    copy = inference_copy(tiny_method)
    assert copy is not tiny_method
    assert all(a is b for a, b in zip(copy.parameters(), tiny_method.parameters()))


def test_unknown_precision_is_named(tiny_method):
    with pytest.raises(ValueError, match="precision='int4'"):
        prepare_encoder(tiny_method, "int4")


def test_model_errors_propagate(tiny_method):
    encoder = prepare_encoder(tiny_method, "bf16")
    with pytest.raises(ValueError, match="expected images"):
        encoder.encode_gallery(torch.zeros(1, 3, 32, 32))


@pytest.mark.slow  # four inductor compilations: ~20 s idle, over a minute on 2 busy cores
@needs_compile
def test_compiled_matches_eager(tiny_method, inputs):
    ref = reference(tiny_method, *inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp32 = InferenceEncoder(tiny_method, "fp32", compile=True)
        got32 = fast(fp32, *inputs)
        bf16 = InferenceEncoder(tiny_method, "bf16", compile=True)
        got16 = fast(bf16, *inputs)
    # A fall-back to eager would make this test meaningless.
    assert not [w for w in caught if "torch.compile" in str(w.message) and "eagerly" in str(w.message)]
    assert fp32.compiled and bf16.compiled and bf16.cast_weights
    for got, want in zip(got32, ref):
        assert float((got - want).abs().max()) <= 1e-5
    for got, want in zip(got16, ref):
        assert_bf16_close(got, want)


def test_compile_unavailable_falls_back_with_a_warning(tiny_method, inputs, monkeypatch):
    from xmr.methods import inference as encoding

    monkeypatch.setattr(encoding, "compile_available", lambda: (False, "no C++ compiler"))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        encoder = InferenceEncoder(tiny_method, "fp32", compile=True)
    assert not encoder.compiled
    for got, ref in zip(fast(encoder, *inputs), reference(tiny_method, *inputs)):
        assert torch.equal(got, ref)


# -- integration -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_setup(tiny_pedes):
    from xmr.data.formats import load_dataset
    from xmr.data.transforms import build_transform
    from xmr.jobs.train import prepare_tokenizer, tokenize_fn

    splits = load_dataset("cuhk_pedes", tiny_pedes)
    tokenizer = prepare_tokenizer(None, [r.caption for r in splits.train], 150)
    torch.manual_seed(1)
    cfg = get_clip_config("tiny", **{"text.vocab_size": tokenizer.vocab_size, "text.eot_token_id": tokenizer.eot_id})
    method = IRRA(CLIP(cfg), IRRAConfig(losses=["itc"])).eval()
    return method, splits.test, tokenize_fn(tokenizer, 32), build_transform(False, (64, 32))


def test_evaluator_metrics_unchanged_at_fp32(eval_setup):
    from xmr.data.datasets import ImageDataset, TextDataset, build_loader
    from xmr.evaluation.evaluator import embed_split, evaluate_split
    from xmr.evaluation.metrics import retrieval_metrics

    method, split, tokenize, transform = eval_setup
    # The simple path: the method's raw towers over batches of 4, as the evaluator called them before.
    texts = build_loader(TextDataset(split.captions, tokenize), 4, shuffle=False, num_workers=0)
    images = build_loader(ImageDataset(split.image_paths, transform), 4, shuffle=False, num_workers=0)
    with torch.inference_mode():
        ref_t = F.normalize(torch.cat([method.encode_text(b["ids"]) for b in texts]).float(), dim=-1)
        ref_i = F.normalize(torch.cat([method.encode_image(b["images"]) for b in images]).float(), dim=-1)
    want = retrieval_metrics(ref_t, ref_i, torch.as_tensor(split.caption_pids), torch.as_tensor(split.image_pids))

    got_t, got_i = embed_split(method, split, tokenize, batch_size=4, precision="fp32")
    assert torch.equal(got_t, ref_t) and torch.equal(got_i, ref_i)
    got = evaluate_split(method, split, tokenize, batch_size=4, precision="fp32")["t2i"]
    assert {k: v for k, v in got.items() if k != "embed_seconds"} == want
    # bf16 through the evaluator: every embedding within the bf16 tolerance of fp32's.
    bf_t, bf_i = embed_split(method, split, tokenize, batch_size=4, precision="bf16")
    assert_bf16_close(bf_t, ref_t)
    assert_bf16_close(bf_i, ref_i)


def test_retriever_hits_unchanged_at_fp32(index_dir, train_gallery):
    pytest.importorskip("faiss")
    import xmr

    _, _, records = train_gallery
    captions = [r.caption for r in records[:6]]
    retriever = xmr.load(index_dir, precision="fp32")
    method = retriever.model.method
    with torch.inference_mode():  # the simple path: raw encoder, normalise, search
        ref = F.normalize(method.encode_text(retriever.model.tokenize(captions)).float(), dim=-1).numpy()
    np.testing.assert_array_equal(retriever.encode_texts(captions), ref)
    for caption in captions:  # one query at a time, as search_text encodes it (a batch of 1)
        with torch.inference_mode():
            one = F.normalize(method.encode_text(retriever.model.tokenize([caption])).float(), dim=-1).numpy()
        want = retriever.search_vectors(one, k=5)[0]
        assert [(h.id, h.score) for h in retriever.search_text(caption, k=5)] == [(h.id, h.score) for h in want]
    bf16 = xmr.load(index_dir, precision="bf16")
    assert bf16.encoder.cast_weights
    assert_bf16_close(torch.from_numpy(bf16.encode_texts(captions)), torch.from_numpy(ref))
