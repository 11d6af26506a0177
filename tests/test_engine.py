"""Training engine end to end on tiny data: checkpoints, exact resume, DDP with 2 CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from xmr.config import load_config
from xmr.engine.trainer import Trainer
from xmr.jobs.train import run_training
from xmr.methods.loading import load_checkpoint


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_train_writes_checkpoints_and_validation(tiny_pedes, tmp_path):
    cfg = load_config(REPO / "configs/demo.yaml", tiny_overrides(tiny_pedes, tmp_path / "run"))
    result = run_training(cfg)
    run = tmp_path / "run"
    assert (run / "last" / "model.safetensors").is_file() and (run / "last" / "trainer_state.pt").is_file()
    assert (run / "best" / "model.safetensors").is_file() and not (run / "best" / "trainer_state.pt").exists()
    assert (run / "config.yaml").is_file()
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert result.best_metric == max(r["R1"] for r in evals)
    assert len(train_losses(run)) == 6 and all(torch.isfinite(torch.tensor(train_losses(run))))
    model = load_checkpoint(run / "best")
    feats = model.method.encode_text(model.tokenize(["a man in a red coat"]))
    assert feats.shape == (1, model.method.clip.config.embed_dim)


def test_resume_replays_the_uninterrupted_run_exactly(tiny_pedes, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_pedes, tmp_path / "full", **{"optim.epochs": 3, "data.sampler": "identity",
                                                                 "data.num_instances": 2})
    run_training(load_config(REPO / "configs/demo.yaml", overrides))
    reference = train_losses(tmp_path / "full")

    interrupted = load_config(REPO / "configs/demo.yaml",
                              overrides + [f"train.output_dir={tmp_path / 'killed'}"])
    original = Trainer._train_epoch

    def killed_in_epoch_two(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted)
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    assert len(train_losses(tmp_path / "killed")) == 3
    run_training(interrupted, resume="auto")
    resumed = train_losses(tmp_path / "killed")
    assert len(resumed) == len(reference) == 9
    assert resumed == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_train_hooks_are_called_and_resumed_exactly(tiny_pedes, tmp_path, monkeypatch):
    import toy_reranker

    toy_reranker.register()
    overrides = tiny_overrides(tiny_pedes, tmp_path / "full", **{"optim.epochs": 3, "method.name": "toy_hooks"})

    def hook_state(run: Path) -> dict:
        return torch.load(run / "last" / "trainer_state.pt", weights_only=True)["hooks"]

    run_training(load_config(REPO / "configs/demo.yaml", overrides))
    full = hook_state(tmp_path / "full")
    assert full == {"epochs_seen": [0, 1, 2], "steps_seen": 9}  # 3 steps per epoch

    killed = load_config(REPO / "configs/demo.yaml", overrides + [f"train.output_dir={tmp_path / 'killed'}"])
    original = Trainer._train_epoch

    def killed_in_epoch_three(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", killed_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        run_training(killed)
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    assert hook_state(tmp_path / "killed") == {"epochs_seen": [0, 1], "steps_seen": 6}
    run_training(killed, resume="auto")
    assert hook_state(tmp_path / "killed") == full
    assert train_losses(tmp_path / "killed") == pytest.approx(train_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)


def test_bf16_autocast_trains(tiny_pedes, tmp_path):
    cfg = load_config(REPO / "configs/demo.yaml",
                      tiny_overrides(tiny_pedes, tmp_path / "bf16", **{"train.precision": "bf16", "optim.epochs": 1}))
    result = run_training(cfg)
    assert result.epochs_done == 1 and all(torch.isfinite(torch.tensor(train_losses(tmp_path / "bf16"))))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes(tiny_pedes, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text("base: " + str(REPO / "configs/demo.yaml") + "\n")
    overrides = tiny_overrides(tiny_pedes, tmp_path / "ddp", **{"optim.epochs": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "xmr.cli", "train", "--config", str(config)]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "last" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3  # written once (rank 0), 3 steps
    assert any(r["kind"] == "eval" for r in records)
