"""IRRA is unchanged by the method-neutral refactor, and checkpoints of the earlier code still load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import REPO, tiny_overrides

from xmr.config import load_config
from xmr.jobs.train import run_training
from xmr.methods.loading import load_checkpoint

FIXTURES = REPO / "tests" / "fixtures"


def test_irra_losses_are_bitwise_those_recorded_before_the_refactor(tiny_pedes, tmp_path):
    """20 fp32 steps of sdm + id + mlm on the tiny set equal, bit for bit, the losses the code at
    commit 72ba11e logged (tests/fixtures/record_irra_losses.py wrote the fixture with the old config keys)."""
    recorded = json.loads((FIXTURES / "irra_losses_20_steps.json").read_text())["steps"]
    overrides = tiny_overrides(tiny_pedes, tmp_path / "run", **{
        "optim.epochs": 3, "train.max_steps_per_epoch": None, "data.sampler": "identity",
        "data.num_instances": 2, "train.eval_every": 100})
    run_training(load_config(REPO / "configs/demo.yaml", overrides))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: r[k] for k in recorded[0]} for r in logged if r["kind"] == "train"][:20]
    assert len(steps) == 20
    assert steps == recorded  # exact float equality, every part of every step


def test_a_checkpoint_written_by_the_earlier_code_loads_and_encodes_as_before():
    """tests/fixtures/legacy_irra_checkpoint was written by commit cf038e3 (config: `method: irra`, `loss:`,
    IRRA fields under `model`, exported `irra:` section); it is converted on read and gives the same features."""
    directory = FIXTURES / "legacy_irra_checkpoint"
    expected = json.loads((directory / "expected_outputs.json").read_text())
    model = load_checkpoint(directory)
    assert model.upgraded
    assert model.config["model"]["config"]["losses"] == ["sdm", "id", "mlm"]
    experiment = model.experiment()
    assert experiment.method.name == "irra" and experiment.method.cmt_depth == 1
    assert experiment.method.temperature == 0.05
    from xmr.outputs import QueryBatch

    with torch.no_grad():
        text = model.method.encode_query(model.text_query(expected["texts"])).vectors
        images = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(expected["image_seed"]))
        image = model.method.encode_gallery(images).vectors
        image_query = model.method.encode_query(QueryBatch(images=images)).vectors
    torch.testing.assert_close(text, torch.tensor(expected["text_feats"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(image, torch.tensor(expected["image_feats"]), rtol=0, atol=1e-6)
    assert torch.equal(image, image_query)


def test_the_legacy_checkpoint_fixture_is_in_the_old_shape():
    import yaml

    config = yaml.safe_load((FIXTURES / "legacy_irra_checkpoint" / "config.yaml").read_text())
    assert "irra" in config["model"] and "loss" in config["experiment"]
    assert isinstance(config["experiment"]["method"], str)
    assert Path(FIXTURES / "legacy_irra_checkpoint" / "model.safetensors").is_file()
