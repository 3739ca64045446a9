"""Typed config: YAML + overrides, unknown keys with suggestions, type checks, resolved dump."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from occdistill.config import dump_config, load_config, save_config, to_dict
from occdistill.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class Root:
    name: str = "run"
    epochs: int = 2
    amp: bool = False
    milestones: tuple[int, ...] = ()
    resume: Optional[str] = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_without_file():
    cfg = load_config(Root)
    assert cfg == Root()


def test_yaml_then_overrides_later_wins(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 5\noptim:\n  lr: 0.01\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Root, p, ["optim.lr=0.5", "milestones=[1, 3]", "resume=ckpt.pt", "amp=true"])
    assert cfg.epochs == 5
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.milestones == (1, 3) and cfg.resume == "ckpt.pt" and cfg.amp is True


def test_int_accepted_as_float_but_not_reverse():
    assert load_config(Root, None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="'epochs': expected an integer"):
        load_config(Root, None, ["epochs=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean 'lr'"),
        ("epoch=3", "unknown config key 'epoch'; did you mean 'epochs'"),
        ("optim.schedule=cosin", "'optim.schedule': 'cosin' is not one of"),
        ("amp=yes please", "'amp': expected true/false"),
        ("epochs.x=1", "'epochs' is a value, not a section"),
        ("noequals", "not of the form key=value"),
        ("optim.betas=[1]", "expected 2 values"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(Root, None, [override])


def test_unknown_key_in_yaml_names_dotted_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  betaz: [0.1, 0.2]\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.betaz'; did you mean 'betas'"):
        load_config(Root, p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Root, tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Root, p)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Root, None, ["optim.lr=0.25", "milestones=[4]"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    assert load_config(Root, path) == cfg
    assert "lr: 0.25" in dump_config(cfg)


@dataclass(frozen=True)
class Preset:
    # The parent's default for the section differs from Optim's own defaults.
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5, schedule="constant"))


def test_partial_section_overlays_the_parent_default(tmp_path):
    cfg = load_config(Preset, None, ["optim.betas=[0.1, 0.2]"])
    assert cfg.optim == Optim(lr=0.5, betas=(0.1, 0.2), schedule="constant")
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.25\n")
    assert load_config(Preset, p).optim == Optim(lr=0.25, schedule="constant")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(Preset, p, ["optim.lrr=1"])


def test_exponent_without_dot_is_a_float():
    # PyYAML (YAML 1.1) parses 1e-3 as a string; a float field must still accept it.
    assert load_config(Root, None, ["optim.lr=1e-3"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="'optim.lr': expected a number"):
        load_config(Root, None, ["optim.lr=fast"])
