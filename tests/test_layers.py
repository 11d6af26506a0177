"""Imports go one way: foundation <- models, losses, text, data, index <- methods <- engine, evaluation, search
<- jobs, serve <- cli (design.md). Checked statically over every import statement, lazy ones included."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "xmr"
LIBRARY = {"models", "losses", "text", "data", "index", "methods", "evaluation"}
APPLICATION = {"engine", "jobs", "serve", "cli"}
FOUNDATION = {"errors", "outputs", "config", "registry", "precision", "atomic", "viz"}


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "xmr" else None


def _imports() -> dict[str, set[str]]:
    """Package (or top-level module) -> the xmr packages its files import."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel == Path("__init__.py"):
            continue  # the `xmr.load` facade sits above everything
        source = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                target = _package_of(name)
                if target and target != source:
                    edges[source].add(target)
    return edges


def test_library_modules_import_no_application_code():
    edges = _imports()
    offenders = {src: sorted(edges[src] & APPLICATION) for src in LIBRARY | FOUNDATION if edges[src] & APPLICATION}
    assert not offenders, f"library modules import application code: {offenders}"
    assert not edges["search"] & {"engine", "jobs", "serve", "cli"}, edges["search"]


def test_no_two_packages_import_each_other():
    edges = _imports()
    mutual = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, set())})
    assert not mutual, f"packages importing each other: {mutual}"


def test_foundation_imports_only_foundation():
    edges = _imports()
    for module in FOUNDATION:
        assert edges[module] <= FOUNDATION, (module, edges[module] - FOUNDATION)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The test can fail: a library module importing the trainer is reported."""
    fake = tmp_path / "xmr"
    (fake / "models").mkdir(parents=True)
    (fake / "engine").mkdir()
    (fake / "models" / "bad.py").write_text("def f():\n    from xmr.engine.trainer import Trainer\n")
    (fake / "engine" / "trainer.py").write_text("from xmr.models.bad import f\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    edges = _imports()
    assert edges["models"] == {"engine"} and edges["engine"] == {"models"}


def test_search_and_serving_load_checkpoints_without_training_code():
    fixture = Path(__file__).parent / "fixtures" / "legacy_irra_checkpoint"
    code = ("import sys; import xmr.search.retriever, xmr.serve, xmr.index; "
            "from xmr.methods.loading import load_checkpoint; "
            f"m = load_checkpoint({str(fixture)!r}); "
            "bad = sorted(n for n in sys.modules if n.startswith(('xmr.engine', 'xmr.jobs', 'xmr.cli'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_config_and_registry_stay_light():
    """Reading a recipe imports neither torch nor any method module until a method is asked for."""
    code = ("import sys; import xmr.config, xmr.registry, xmr.precision; "
            "bad = sorted(n for n in sys.modules if n == 'torch' or n.startswith('xmr.methods')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
