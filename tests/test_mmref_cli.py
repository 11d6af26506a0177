"""MMRef as a user runs it: train a tiny model, evaluate with the initial and refined rows, tune the
refinement on val, re-score the whole gallery exactly, and search an index with and without refinement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides
from test_cli import xmr


def mmref_overrides(data: Path, run: Path, **extra: object) -> list[str]:
    items = [o for o in tiny_overrides(data, run, **extra) if not o.startswith("method.cmt_depth")]
    return items + ["method.refine.k=5"]


@pytest.fixture(scope="module")
def mmref_run(tiny_pedes, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mmref") / "run"
    args = ["train", "--config", "configs/mmref/demo.yaml"]
    for item in mmref_overrides(tiny_pedes, run, **{"optim.epochs": 1}):
        args += ["--set", item]
    proc = xmr(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"sdm", "fuse", "recon", "rgrl", "lr"} <= set(first) and first["lr"] != first["recon"]
    return run


def test_evaluate_prints_initial_and_refined_rows_and_the_grid(mmref_run, tiny_pedes, tmp_path):
    out = tmp_path / "report.json"
    proc = xmr("evaluate", "--checkpoint", str(mmref_run / "last"), "--data", str(tiny_pedes), "--out", str(out),
               "--workers", "0", "--precision", "fp32", "--refine-grid", "k=2,5;lam=0.0,0.5",
               "--refine-scope", "full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "t2i refined (test)" in proc.stdout and "t2i initial (test)" in proc.stdout
    assert "t2i full re-score (test)" in proc.stdout
    report = json.loads(out.read_text())
    results, protocol = report["results"], report["protocol"]
    assert set(results) == {"t2i", "t2i_initial", "t2i_full"}
    grid = protocol["refine_grid"]
    assert grid["selected_on"] == "val" and len(grid["rows"]) == 4
    best = max(grid["rows"], key=lambda r: r["R1"])
    assert grid["chosen"]["k"] in (2, 5) and best["R1"] == max(r["R1"] for r in grid["rows"])
    assert protocol["refinement"]["k"] == grid["chosen"]["k"] == protocol["rerank_depth"]
    assert protocol["refinement"]["num_references"] == 16
    lam0 = [r for r in grid["rows"] if r["lam"] == 0.0]
    assert all(r["R1"] == lam0[0]["R1"] and r["mAP"] == lam0[0]["mAP"] for r in lam0)  # lam 0 = no refinement


@pytest.fixture(scope="module")
def mmref_index(mmref_run, train_gallery, tmp_path_factory) -> Path:
    images, _, _ = train_gallery
    work = tmp_path_factory.mktemp("mmref-index")
    emb, index = work / "g.emb", work / "g.index"
    assert xmr("embed", str(images), "--checkpoint", str(mmref_run / "last"), "--out", str(emb),
               "--workers", "0").returncode == 0
    assert xmr("index", "build", str(emb), "--out", str(index)).returncode == 0
    return index


def test_search_with_and_without_refinement(mmref_index, train_gallery):
    _, _, records = train_gallery
    index = mmref_index
    query = records[0].caption
    refined = xmr("search", str(index), query, "-k", "5", "--refine-k", "8", "--refine-lambda", "0.5", "--json")
    plain = xmr("search", str(index), query, "-k", "5", "--no-refine", "--json")
    assert refined.returncode == 0 and plain.returncode == 0, refined.stderr[-2000:] + plain.stderr[-2000:]
    hits = json.loads(refined.stdout)["results"]
    for hit in hits:
        parts = hit["parts"]
        assert hit["score"] == pytest.approx(0.5 * parts["initial_score"] + 0.5 * parts["reference_score"], abs=1e-5)
        assert parts["initial_score"] == pytest.approx(hit["first_stage_score"], abs=1e-6)
    plain_hits = json.loads(plain.stdout)["results"]
    assert all(not h["parts"] and h["score"] == h["first_stage_score"] for h in plain_hits)
    table = xmr("search", str(index), query, "-k", "3")
    assert table.returncode == 0 and "S_ref" in table.stdout and "S_init" in table.stdout
    assert (REPO / "configs/mmref/demo.yaml").is_file()


def test_http_refine_switch_limits_and_score_parts(mmref_index, mmref_run, train_gallery):
    from fastapi.testclient import TestClient

    from xmr.search.retriever import load
    from xmr.serve import ServeSettings, create_app

    _, _, records = train_gallery
    retriever = load(mmref_index, mmref_run / "last", precision="fp32")
    client = TestClient(create_app(retriever, ServeSettings(max_refine_k=20)))
    text = records[0].caption
    body = client.post("/api/search/text", json={"text": text, "k": 4, "refine_k": 10}).json()
    for hit in body["results"]:
        assert hit["initial_score"] == pytest.approx(hit["first_stage_score"], abs=1e-6)
        assert hit["score"] == pytest.approx(0.7 * hit["initial_score"] + 0.3 * hit["reference_score"], abs=1e-5)
        assert set(hit["score_parts"]) == {"initial_score", "reference_score"}
    off = client.post("/api/search/text", json={"text": text, "k": 4, "refine": False}).json()["results"]
    assert all(h["reference_score"] is None and h["score"] == h["first_stage_score"] for h in off)
    too_deep = client.post("/api/search/text", json={"text": text, "refine_k": 21})
    assert too_deep.status_code == 422 and too_deep.json()["error"]["code"] == "invalid_refine_k"
    first_id = body["results"][0]["id"]
    similar = client.post("/api/search/similar", json={"id": first_id, "k": 3, "refine_k": 5})
    assert similar.status_code == 200 and similar.json()["results"][0]["reference_score"] is not None
    assert client.get("/api/health").json()["limits"]["max_refine_k"] == 20


def test_search_page_refine_toggle_and_score_hover(mmref_index, mmref_run, train_gallery, tmp_path_factory):
    """The page over an MMRef index: a refine switch, both scores on hover; unchecked, no reference score."""
    from test_web import _browser_or_skip, wait_for, wait_results

    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from xmr.search.retriever import load
    from xmr.serve import ServeSettings, create_app, serve_in_thread

    _, pid_of, records = train_gallery
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-mmref')}"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        app = create_app(load(mmref_index, mmref_run / "last", precision="fp32"), ServeSettings())
        with serve_in_thread(app) as url:
            browser.get(url + "/")
            wait_for(browser, lambda d: f"{len(pid_of)} images" in d.find_element(By.ID, "status-line").text,
                     "health")
            assert browser.find_element(By.ID, "refine-label").is_displayed()
            text = records[0].caption
            browser.find_element(By.ID, "q").send_keys(text)
            items = wait_results(browser, 10, text[:20])
            hover = items[0].find_element(By.CSS_SELECTOR, ".score").get_attribute("title")
            assert "initial (stage 1)" in hover and "reference" in hover
            browser.find_element(By.ID, "refine").click()
            browser.find_element(By.ID, "q").send_keys(" ")
            browser.find_element(By.ID, "q").submit()

            def unrefined(d):  # read in one script: the list may be re-rendered between two calls
                title = d.execute_script('const s = document.querySelector("#results .result .score");'
                                         'return s ? s.title : null;')
                return title is not None and "reference" not in title

            wait_for(browser, unrefined, "results without refinement")
    finally:
        browser.quit()


def test_ablation_command_trains_rows_once_and_tabulates(tiny_pedes, tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text("- {name: baseline, set: ['method.losses=[sdm]']}\n"
                    "- {name: full, set: ['method.losses=[sdm,fuse,rgrl]']}\n"
                    "- {name: full + refine, set: ['method.losses=[sdm,fuse,rgrl]'], refine: true}\n")
    args = ["ablation", "configs/mmref/demo.yaml", "--seeds", "2", "--rows", str(rows), "--out", str(tmp_path / "abl"),
            "--refine-grid", "k=3;lam=0.0,0.5"]
    for item in mmref_overrides(tiny_pedes, tmp_path / "unused", **{"optim.epochs": 1, "train.max_steps_per_epoch": 2}):
        args += ["--set", item]
    proc = xmr(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline" in proc.stdout and "± " in proc.stdout and "k=3" in proc.stdout
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == ["baseline", "full", "full + refine"] and summary["seeds"] == [0, 1]
    runs = sorted(p.name for p in (tmp_path / "abl").glob("run-*"))
    assert len(runs) == 4  # the refined row reuses the full row's two runs
    full, refined = summary["rows"][1], summary["rows"][2]
    for row in summary["rows"]:
        import statistics

        assert row["mean"]["R1"] == pytest.approx(statistics.fmean(s["R1"] for s in row["per_seed"]))
    assert all(s["k"] == 3 and s["lam"] in (0.0, 0.5) for s in refined["settings"])
    assert full["per_seed"] != [] and (tmp_path / "abl" / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_mmref_demo_job_ends_with_a_refined_index(tmp_path, monkeypatch):
    """`xmr demo --method mmref`: its recipe, the demo data, a model, both rows, and an index that refines."""
    import xmr
    from xmr.jobs import demo as jobs

    config, work = jobs.method_demo("mmref")
    assert config == Path("configs/mmref/demo.yaml") and work == Path(".cache/demo-mmref")
    monkeypatch.setitem(jobs.DEMO_DATA, "num_ids", 20)
    monkeypatch.setitem(jobs.DEMO_DATA, "images_per_id", 2)
    monkeypatch.setitem(jobs.DEMO_DATA, "image_size", (64, 32))
    overrides = tuple(o for o in mmref_overrides(Path("unused"), Path("unused"), **{"optim.epochs": 1})
                      if not o.startswith(("data.root", "train.output_dir", "data.format")))
    summary = jobs.run_demo(REPO / config, tmp_path, overrides, progress=False)
    assert {"t2i", "t2i_initial"} <= set(summary["results"]) and "stage 1 only" in summary["table"]
    retriever = xmr.load(summary["index"], summary["checkpoint"], precision="fp32")
    hits = retriever.search_text("a man in a red jacket", k=3)
    assert retriever.rerank_depth == 5 and {"initial_score", "reference_score"} <= set(hits[0].parts)
