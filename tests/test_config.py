from pathlib import Path

import pytest
from conftest import REPO

from xmr.config import ExperimentConfig, load_config, parse_override
from xmr.errors import ConfigError


def test_paper_recipes_load_with_paper_values():
    cfg = load_config(REPO / "configs/irra/cuhk_pedes.yaml")
    assert cfg.model.clip == "ViT-B/16" and cfg.model.image_size == (384, 128)
    assert cfg.method.name == "irra" and cfg.method.losses == ["sdm", "id", "mlm"]
    assert (cfg.method.temperature, cfg.method.cmt_depth, cfg.method.mlm_probability) == (0.02, 4, 0.15)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay) == (1e-5, 1e-3, 4e-5)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.data.batch_size) == (60, 5, 64)
    assert cfg.optim.betas == (0.9, 0.999)
    icfg = load_config(REPO / "configs/irra/icfg_pedes.yaml")
    assert icfg.data.format == "icfg_pedes" and icfg.optim.lr == 1e-5  # inherited through `base`
    assert load_config(REPO / "configs/irra/rstpreid.yaml").data.format == "rstpreid"
    assert load_config(REPO / "configs/demo.yaml").model.clip == "demo"


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "model.image_size=[192,64]", "method.losses=itc", "model.stride=12",
                             "model.pretrained=null"])
    assert cfg.optim.lr == 3e-4 and cfg.model.image_size == (192, 64)
    assert cfg.method.losses == ["itc"] and cfg.model.stride == 12 and cfg.model.pretrained is None
    assert parse_override("a.b=1") == (["a", "b"], 1)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("optim.lr=fast", "optim.lr must be float"),
    ("model.image_size=[1,2,3]", "list of 2 values"),
    ("train.precision=fp8", "train.precision"),
    ("method.losses=[sdm,foo]", "method.losses"),
    ("method.temprature=0.1", "did you mean 'method.temperature'"),
    ("method.cmt_depth=deep", "method.cmt_depth must be int"),
    ("method.name=irrra", "unknown method 'irrra' (did you mean 'irra'"),
    ("nonsense", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_bad_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  clipp: tiny\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.clipp'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_round_trip_through_dict():
    from xmr.config import config_from_dict

    cfg = load_config(REPO / "configs/irra/cuhk_pedes.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(ExperimentConfig().to_dict()["model"]["image_size"], list)


def test_method_section_is_validated_by_the_methods_own_config(tmp_path: Path):
    from xmr.methods.irra import IRRAConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: irra\n  losses: [itc]\n  temperature: 0.05\n")
    cfg = load_config(recipe, ["method.itc_weight=2"])
    assert isinstance(cfg.method, IRRAConfig) and cfg.method.losses == ["itc"]
    assert (cfg.method.temperature, cfg.method.itc_weight) == (0.05, 2.0)
    assert "loss" not in cfg.to_dict() and cfg.to_dict()["method"]["name"] == "irra"
    recipe.write_text("method:\n  name: irra\n  lossses: [itc]\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'method.lossses' \(did you mean 'method.losses'\?\)"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="method.temperature=-1.0 must be positive"):
        load_config(None, ["method.temperature=-1"])


def test_the_earlier_config_shape_is_converted_on_read(tmp_path: Path):
    old = tmp_path / "old.yaml"
    old.write_text("method: irra\nmodel:\n  clip: tiny\n  cmt_depth: 2\n  temperature: 0.05\n"
                   "loss:\n  names: [sdm, id]\n  id_weight: 0.5\ndata:\n  mlm_probability: 0.2\n")
    cfg = load_config(old)
    assert cfg.model.clip == "tiny" and cfg.method.losses == ["sdm", "id"]
    assert (cfg.method.cmt_depth, cfg.method.temperature, cfg.method.id_weight, cfg.method.mlm_probability) == (
        2, 0.05, 0.5, 0.2)
