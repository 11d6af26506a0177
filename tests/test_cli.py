"""The command line as a user runs it: train, evaluate, demo; bad input gives one readable line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides


def xmr(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xmr.cli", *args], capture_output=True, check=False, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tiny_pedes, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "--config", "configs/demo.yaml"]
    for item in tiny_overrides(tiny_pedes, run, **{"optim.epochs": 1}):
        args += ["--set", item]
    proc = xmr(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "validation (t2i)" in proc.stdout and "R1" in proc.stdout
    return run


def test_evaluate_prints_table_and_writes_traceable_report(trained, tiny_pedes, tmp_path):
    out = tmp_path / "report.json"
    proc = xmr("evaluate", "--checkpoint", str(trained / "best"), "--data", str(tiny_pedes), "--i2t",
               "--out", str(out), "--workers", "0", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "t2i (test)" in proc.stdout and "i2t (test)" in proc.stdout and "mINP" in proc.stdout
    report = json.loads(out.read_text())
    t2i = report["results"]["t2i"]
    assert 0 <= t2i["R1"] <= t2i["R5"] <= t2i["R10"] <= 100
    protocol = report["protocol"]
    assert protocol["dataset"] == "cuhk_pedes" and protocol["split"] == "test"
    assert len(protocol["checkpoint_sha256"]) == 16 and protocol["directions"] == ["t2i", "i2t"]
    assert "tie" in protocol["tie_rule"] and protocol["config"]["model"]["method"] == "irra"


def test_evaluate_under_the_image_text_task_records_its_protocol(trained, tiny_pedes, tmp_path):
    """Captions against their own image (not the identity): R@K both ways and RSUM, protocol recorded."""
    out = tmp_path / "it.json"
    proc = xmr("evaluate", "--checkpoint", str(trained / "best"), "--data", str(tiny_pedes), "--task", "image_text",
               "--out", str(out), "--workers", "0", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rsum" in proc.stdout and "medr" in proc.stdout
    report = json.loads(out.read_text())
    t2i, i2t = report["results"]["t2i"], report["results"]["i2t"]
    assert t2i["rsum"] == pytest.approx(sum(d[f"R{k}"] for d in (t2i, i2t) for k in (1, 5, 10)))
    assert report["protocol"]["task"]["task"] == "image_text" and report["protocol"]["rerank_depth"] == 0
    bad = xmr("evaluate", "--checkpoint", str(trained / "best"), "--data", str(tiny_pedes), "--task", "composed")
    assert bad.returncode == 2 and "no 'composed' queries" in bad.stderr


def test_help_explains_commands():
    proc = xmr("--help")
    assert proc.returncode == 0
    for command in ("train", "evaluate", "demo"):
        assert command in proc.stdout
    assert "--set" in xmr("train", "--help").stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["train", "--config", "configs/demo.yaml", "--set", "optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["evaluate", "--checkpoint", "/nonexistent/ckpt", "--data", "."], "/nonexistent/ckpt"),
    (["embed", ".", "--checkpoint", ".", "--out", "unused", "--processes", "0"], "'--processes'"),
    (["search", ".", "a query", "-k", "0"], "'-k' / '--top'"),
])
def test_bad_input_is_one_readable_line(args, message):
    proc = xmr(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_on_a_folder_that_is_not_a_dataset(trained, tmp_path):
    proc = xmr("evaluate", "--checkpoint", str(trained / "best"), "--data", str(tmp_path))
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr


def test_demo_job_trains_once_then_reuses_the_cache(tmp_path, monkeypatch):
    from xmr.jobs import demo as jobs

    monkeypatch.setitem(jobs.DEMO_DATA, "num_ids", 20)
    monkeypatch.setitem(jobs.DEMO_DATA, "images_per_id", 2)
    monkeypatch.setitem(jobs.DEMO_DATA, "image_size", (64, 32))
    overrides = tuple(o for o in tiny_overrides(Path("unused"), Path("unused"), **{"optim.epochs": 1})
                      if not o.startswith(("data.root", "train.output_dir", "data.format")))
    first = jobs.run_demo(REPO / "configs/demo.yaml", tmp_path, overrides, progress=False)
    assert Path(first["grid"]).is_file() and Path(first["report"]).is_file()
    assert 0 < first["chance_R1"] < 100
    mtime = (Path(first["checkpoint"]) / "model.safetensors").stat().st_mtime
    second = jobs.run_demo(REPO / "configs/demo.yaml", tmp_path, overrides, progress=False)
    assert second["run_dir"] == first["run_dir"]
    assert (Path(second["checkpoint"]) / "model.safetensors").stat().st_mtime == mtime
    assert second["results"]["t2i"]["R1"] == pytest.approx(first["results"]["t2i"]["R1"])
