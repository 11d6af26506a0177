"""Checkpoint loading: parity with transformers, every supported layout, grid resize, errors, atomic saves."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmr.errors import CheckpointError
from xmr.models import checkpoints as ckpt
from xmr.models.checkpoints import (
    detect_format,
    infer_clip_config,
    load_clip_weights,
    load_model_dir,
    load_pretrained_clip,
    read_state_dict,
    resize_positional_grid,
    save_model_dir,
    split_irra_state_dict,
)
from xmr.models.clip import CLIP, get_clip_config

transformers = pytest.importorskip("transformers")

EOS = 99  # HF text eos id of the small parity model (the largest id, so argmax pooling agrees too)


# 64-dimensional heads like OpenAI's, so configs inferred from weight shapes (heads = width // 64) agree.
TINY = {"vision.heads": 1, "text.heads": 1}


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(get_clip_config("tiny", **(TINY | overrides))).eval()


def features(model: CLIP, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images).pooled, model.encode_text(ids).pooled


# -- parity with transformers ----------------------------------------------------------------------
def hf_model(
    image: int,
    patch: int,
    v_width: int,
    v_layers: int,
    v_heads: int,
    t_width: int,
    t_layers: int,
    t_heads: int,
    embed: int,
    eos: int = EOS,
    vocab: int = 100,
    context: int = 16,
):
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": t_width,
            "intermediate_size": 4 * t_width,
            "num_hidden_layers": t_layers,
            "num_attention_heads": t_heads,
            "max_position_embeddings": context,
            "hidden_act": "quick_gelu",
            "eos_token_id": eos,
            "bos_token_id": eos - 1,
            "pad_token_id": 0,
        },
        vision_config={
            "image_size": image,
            "patch_size": patch,
            "hidden_size": v_width,
            "intermediate_size": 4 * v_width,
            "num_hidden_layers": v_layers,
            "num_attention_heads": v_heads,
            "hidden_act": "quick_gelu",
        },
        projection_dim=embed,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # perturb everything so LayerNorms and biases are not the trivial 1 / 0
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def as_tensor(out) -> torch.Tensor:
    # transformers 5.x returns BaseModelOutputWithPooling whose pooler_output is the projected feature
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_ids(batch: int, length: int, eos: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, eos - 1, (batch, length), generator=gen)
    for row in range(batch):
        end = 3 + (row * 5) % (length - 3)
        ids[row, end] = eos
        ids[row, end + 1 :] = 0
    return ids


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory) -> tuple[object, Path]:
    model = hf_model(32, 8, 64, 2, 4, 64, 2, 2, 32)
    path = tmp_path_factory.mktemp("hf") / "clip"
    model.save_pretrained(path)
    return model, path


def test_hf_parity_native_size(hf_small):
    hf, path = hf_small
    ours = load_pretrained_clip(path).eval()
    assert ours.config.text.eot_token_id == EOS and ours.config.vision.heads == 4
    images, ids = torch.randn(3, 3, 32, 32), text_ids(3, 16, EOS, 100)
    with torch.no_grad():
        ref_i = as_tensor(hf.get_image_features(pixel_values=images))
        ref_t = as_tensor(hf.get_text_features(input_ids=ids))
    assert ref_i.shape == (3, 32) and ref_t.shape == (3, 32)
    out_i, out_t = features(ours, images, ids)
    torch.testing.assert_close(out_i, ref_i, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_t, ref_t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.logit_scale, hf.logit_scale)


def test_hf_parity_resized_grid(hf_small):
    # transformers interpolates the 4x4 grid bicubically on the fly; we resize it once when loading.
    hf, path = hf_small
    ours = load_pretrained_clip(path, image_size=(48, 32)).eval()
    assert ours.visual.grid_size == (6, 4)
    images = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        ref = as_tensor(hf.get_image_features(pixel_values=images, interpolate_pos_encoding=True))
    torch.testing.assert_close(features(ours, images, text_ids(1, 8, EOS, 100))[0], ref, atol=1e-4, rtol=1e-4)


def test_hf_parity_legacy_eos_argmax(tmp_path):
    hf = hf_model(32, 16, 32, 1, 2, 32, 1, 2, 16, eos=2)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained_clip(tmp_path).eval()
    assert ours.config.text.eot_token_id is None  # HF's legacy eos id 2 means "pool at the argmax id"
    ids = text_ids(3, 16, 99, 100)
    with torch.no_grad():
        ref = as_tensor(hf.get_text_features(input_ids=ids))
    torch.testing.assert_close(ours.encode_text(ids).pooled.detach(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layers", [2, pytest.param(12, marks=pytest.mark.slow)])
def test_hf_parity_vit_b16_size(layers):
    # OpenAI ViT-B/16 sizes (224 px, patch 16, widths, heads, vocab, context); full depth is the slow variant.
    start = time.perf_counter()
    hf = hf_model(224, 16, 768, layers, 12, 512, layers, 8, 512, eos=49407, vocab=49408, context=77)
    sd = ckpt.convert_hf_to_openai(hf.state_dict())
    ours = CLIP(get_clip_config("ViT-B/16", **{"vision.layers": layers, "text.layers": layers})).eval()
    notes = load_clip_weights(ours, hf.state_dict())
    assert notes == ["read hf layout"] and set(sd) == set(ours.state_dict())
    images, ids = torch.randn(1, 3, 224, 224), text_ids(2, 77, 49407, 49408)
    with torch.no_grad():
        ref_i = as_tensor(hf.get_image_features(pixel_values=images))
        ref_t = as_tensor(hf.get_text_features(input_ids=ids))
    out_i, out_t = features(ours, images, ids)
    torch.testing.assert_close(out_i, ref_i, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_t, ref_t, atol=1e-4, rtol=1e-4)
    assert time.perf_counter() - start < 60


# -- layouts and round trips -----------------------------------------------------------------------
@pytest.fixture()
def reference() -> tuple[CLIP, torch.Tensor, torch.Tensor]:
    model = tiny_clip(seed=3)
    return model, torch.randn(2, 3, 64, 32), torch.randint(1, 999, (2, 12))


def assert_same_model(loaded: CLIP, reference) -> None:
    model, images, ids = reference
    for got, want in zip(features(loaded, images, ids), features(model, images, ids)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_openai_plain_pt(tmp_path, reference):
    path = tmp_path / "ViT-tiny.pt"
    torch.save(reference[0].state_dict(), path)
    assert detect_format(read_state_dict(path)) == "openai"
    loaded = tiny_clip(seed=9)
    assert load_clip_weights(loaded, path) == ["read openai layout"]
    assert_same_model(loaded, reference)
    assert_same_model(load_pretrained_clip(path, image_size=(64, 32)), reference)


class _Holder(nn.Module):
    """A module whose state dict has exactly the given keys, to write a TorchScript archive like OpenAI's."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in state.items():
            *path, name = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_buffer(name, value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_openai_torchscript_archive(tmp_path, reference):
    model = reference[0]
    with torch.no_grad():  # OpenAI released fp16 weights: make the reference exactly representable
        for param in model.parameters():
            param.copy_(param.half().float())
    state = {k: v.half() for k, v in model.state_dict().items()}
    state.update(
        input_resolution=torch.tensor(64), context_length=torch.tensor(32), vocab_size=torch.tensor(1000)
    )
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.trace(_Holder(state), torch.zeros(1)), path)
    raw = read_state_dict(path)
    assert "visual.conv1.weight" in raw and raw["visual.conv1.weight"].dtype == torch.float16
    loaded = tiny_clip(seed=9)
    load_clip_weights(loaded, path)
    assert loaded.visual.conv1.weight.dtype == torch.float32
    assert_same_model(loaded, reference)


def test_open_clip_module_prefix(tmp_path, reference):
    state = {f"module.{k}": v for k, v in reference[0].state_dict().items()}
    state["module.attn_mask"] = torch.full((32, 32), float("-inf")).triu(1)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, path)
    raw = read_state_dict(path)
    assert detect_format(raw) == "open_clip" and not any(k.startswith("module.") for k in raw)
    loaded = tiny_clip(seed=9)
    load_clip_weights(loaded, path)
    assert_same_model(loaded, reference)


def test_open_clip_custom_text_tower_rejected():
    state = {
        "visual.conv1.weight": torch.zeros(1),
        "text.transformer.embeddings.word_embeddings.weight": torch.zeros(1),
    }
    with pytest.raises(CheckpointError, match="custom tower"):
        load_clip_weights(tiny_clip(), state)


def test_irra_best_pth(tmp_path, reference):
    model = reference[0]
    heads = {
        "cross_attn.in_proj_weight": torch.randn(96, 32),
        "cross_modal_transformer.resblocks.0.ln_1.weight": torch.randn(32),
        "ln_pre_t.weight": torch.randn(32),
        "ln_post.bias": torch.randn(32),
        "mlm_head.fc.weight": torch.randn(1000, 32),
        "classifier.weight": torch.randn(7, 32),
    }
    state = {f"base_model.{k}": v for k, v in model.state_dict().items()} | heads
    path = tmp_path / "best.pth"
    torch.save({"model": state, "epoch": 12}, path)
    raw = read_state_dict(path)
    assert detect_format(raw) == "irra"
    clip_sd, head_sd = split_irra_state_dict(raw)
    assert set(clip_sd) == set(model.state_dict())
    assert set(head_sd) == {
        "fusion.cross_attn.in_proj_weight",
        "fusion.cross_modal_transformer.resblocks.0.ln_1.weight",
        "fusion.ln_pre_t.weight",
        "fusion.ln_post.bias",
        "mlm_head.fc.weight",
        "classifier.weight",
    }
    assert torch.equal(head_sd["fusion.cross_attn.in_proj_weight"], heads["cross_attn.in_proj_weight"])
    loaded = tiny_clip(seed=9)
    load_clip_weights(loaded, path)
    assert_same_model(loaded, reference)
    # IRRA trains at a non-square size (here 4x2 patches): the size cannot be guessed, only given
    with pytest.raises(CheckpointError, match="image_size"):
        load_pretrained_clip(path)
    assert_same_model(load_pretrained_clip(path, image_size=(64, 32)), reference)


def test_xmr_model_dir_round_trip(tmp_path, reference):
    model = reference[0]
    method_state = {f"clip.{k}": v for k, v in model.state_dict().items()} | {
        "classifier.weight": torch.randn(3, 32)
    }
    config = {"method": "irra", "clip": model.config.to_dict(), "epochs_done": 2}
    out = save_model_dir(tmp_path / "best", config, method_state, extra_files={"notes.txt": b"hello"})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "notes.txt"]
    loaded_config, loaded_state = load_model_dir(out)
    assert loaded_config == config
    assert loaded_state.keys() == method_state.keys()
    assert all(torch.equal(loaded_state[k], v) for k, v in method_state.items())
    assert detect_format(loaded_state) == "xmr"
    assert_same_model(load_pretrained_clip(out), reference)  # config read from config.yaml
    fresh = tiny_clip(seed=9)
    load_clip_weights(fresh, out)
    assert_same_model(fresh, reference)


def test_save_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "b": base, "t": base.t(), "view": base[1]}
    save_model_dir(tmp_path / "ck", {"x": (1, 2)}, state)
    config, loaded = load_model_dir(tmp_path / "ck")
    assert config == {"x": [1, 2]}
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


# -- grid resize, vocabulary growth ----------------------------------------------------------------
def test_resize_positional_grid_matches_interpolate():
    pos = torch.randn(1 + 14 * 14, 8)
    out = resize_positional_grid(pos, (14, 14), (24, 8))
    assert out.shape == (1 + 24 * 8, 8)
    assert torch.equal(out[0], pos[0])
    grid = pos[1:].reshape(14, 14, 8).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(24, 8), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(out[1:].reshape(24, 8, 8), expected)
    # the identity resize gives back the same grid
    torch.testing.assert_close(resize_positional_grid(pos, (14, 14), (14, 14)), pos)


def test_load_adapts_grid_vocab_and_context():
    source = tiny_clip(seed=1, **{"vision.image_size": (224, 224)})  # 14x14 grid, vocab 1000, context 32
    target = tiny_clip(seed=2, **{"vision.image_size": (384, 128), "text.context_length": 16})
    target.resize_token_embedding(1001)
    mask_row = target.token_embedding.weight[1000].detach().clone()
    notes = load_clip_weights(target, source.state_dict())
    assert any("14x14 -> 24x8" in n for n in notes) and any("1000 -> 1001" in n for n in notes)
    expected = resize_positional_grid(source.visual.positional_embedding.detach(), (14, 14), (24, 8))
    torch.testing.assert_close(target.visual.positional_embedding.detach(), expected)
    assert torch.equal(target.token_embedding.weight[:1000], source.token_embedding.weight)
    assert torch.equal(target.token_embedding.weight[1000], mask_row)
    assert torch.equal(target.positional_embedding, source.positional_embedding[:16])


def test_infer_clip_config_from_shapes():
    with torch.device("meta"):
        sd = CLIP(get_clip_config("ViT-L/14")).state_dict()
    cfg = infer_clip_config(sd)
    assert cfg == get_clip_config("ViT-L/14")


# -- errors ----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        read_state_dict(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    state = tiny_clip().state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_model_dir(tmp_path / "d", {}, state)
        path.write_bytes((tmp_path / "d" / "model.safetensors").read_bytes())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    state = tiny_clip().state_dict()
    state["visual.proj"] = torch.zeros(64, 16)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_clip_weights(tiny_clip(), path)
    message = str(info.value)
    assert (
        "bad.pt" in message and "'visual.proj'" in message and "(64, 16)" in message and "(64, 32)" in message
    )


def test_missing_and_unexpected_keys():
    state = tiny_clip().state_dict()
    del state["ln_final.bias"]
    with pytest.raises(CheckpointError, match="missing key 'ln_final.bias'"):
        load_clip_weights(tiny_clip(), state)
    notes = load_clip_weights(tiny_clip(), state, strict=False)
    assert any("ln_final.bias" in n for n in notes)
    state = tiny_clip().state_dict() | {"extra.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        load_clip_weights(tiny_clip(), state)


def test_pickled_objects_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"state_dict": tiny_clip().state_dict(), "args": _Holder({})}, path)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        read_state_dict(path)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last"
    save_model_dir(target, {"epoch": 1}, {"w": torch.ones(3)})
    real_replace = os.replace

    def crash_on_final_rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_final_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save_model_dir(target, {"epoch": 2}, {"w": torch.zeros(3)})
    monkeypatch.undo()
    config, state = load_model_dir(target)
    assert config == {"epoch": 1} and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary leftovers
    save_model_dir(target, {"epoch": 3}, {"w": torch.full((3,), 3.0)})
    assert load_model_dir(target)[0] == {"epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_load_model_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_model_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.yaml").write_text("a: 1\n")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.yaml").write_text("[unclosed\n")
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_model_dir(tmp_path / "empty")
