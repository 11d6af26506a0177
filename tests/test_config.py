from pathlib import Path

import pytest
from conftest import REPO

from xmr.config import ExperimentConfig, load_config, parse_override
from xmr.errors import ConfigError


def test_paper_recipes_load_with_paper_values():
    cfg = load_config(REPO / "configs/irra/cuhk_pedes.yaml")
    assert cfg.model.clip == "ViT-B/16" and cfg.model.image_size == (384, 128)
    assert cfg.loss.names == ["sdm", "id", "mlm"]
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay) == (1e-5, 1e-3, 4e-5)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.data.batch_size) == (60, 5, 64)
    assert cfg.optim.betas == (0.9, 0.999)
    icfg = load_config(REPO / "configs/irra/icfg_pedes.yaml")
    assert icfg.data.format == "icfg_pedes" and icfg.optim.lr == 1e-5  # inherited through `base`
    assert load_config(REPO / "configs/irra/rstpreid.yaml").data.format == "rstpreid"
    assert load_config(REPO / "configs/demo.yaml").model.clip == "demo"


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "model.image_size=[192,64]", "loss.names=itc", "model.stride=12",
                             "model.pretrained=null"])
    assert cfg.optim.lr == 3e-4 and cfg.model.image_size == (192, 64)
    assert cfg.loss.names == ["itc"] and cfg.model.stride == 12 and cfg.model.pretrained is None
    assert parse_override("a.b=1") == (["a", "b"], 1)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("optim.lr=fast", "optim.lr must be float"),
    ("model.image_size=[1,2,3]", "list of 2 values"),
    ("train.precision=fp8", "train.precision"),
    ("loss.names=[sdm,foo]", "loss.names"),
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
