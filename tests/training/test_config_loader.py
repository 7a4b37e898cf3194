"""Typed config loader: conversion, error messages naming dotted keys, overrides, YAML, round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from unigendet.config.loader import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    save_config,
    to_dict,
)
from unigendet.models.config import LLMConfig, ModelConfig


@dataclass
class LLM:
    hidden_size: int = 64
    num_heads: int = 4
    rope_theta: float = 10000.0
    qk_norm: bool = True
    act: Literal["silu", "gelu"] = "silu"

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")


@dataclass
class Model:
    llm: LLM = field(default_factory=LLM)
    vit: Optional[LLM] = None
    widths: list[int] = field(default_factory=lambda: [8, 16])
    sizes: tuple[int, ...] = (1, 2)


@dataclass
class Train:
    model: Model = field(default_factory=Model)
    lr: float = 1e-3
    steps: int = 10
    name: str = "run"
    resume: Optional[str] = None
    mode: Literal["gduf", "diga"] = "gduf"
    use_ema: bool = False
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be positive, got {self.steps}")


# --------------------------------------------------------------------------- from_dict


def test_from_dict_defaults_and_values():
    assert from_dict(Train, {}) == Train()
    cfg = from_dict(
        Train,
        {
            "model": {"llm": {"hidden_size": 128, "act": "gelu"}, "vit": {"num_heads": 2}, "sizes": [4, 5, 6]},
            "lr": 2,  # int accepted for a float field and converted
            "resume": "ckpt/step_100",
            "mode": "diga",
            "use_ema": True,
            "tags": ["a", "b"],
            "weights": {"mse": 1, "ce": 0.25},
        },
    )
    assert cfg.model.llm == LLM(hidden_size=128, act="gelu")
    assert cfg.model.vit == LLM(num_heads=2)
    assert cfg.model.widths == [8, 16]
    assert cfg.model.sizes == (4, 5, 6)
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float)
    assert cfg.resume == "ckpt/step_100" and cfg.mode == "diga" and cfg.use_ema is True
    assert cfg.tags == ["a", "b"]
    assert cfg.weights == {"mse": 1.0, "ce": 0.25} and isinstance(cfg.weights["mse"], float)
    assert from_dict(Train, {"resume": None}).resume is None


def test_unknown_key_names_full_dotted_path():
    with pytest.raises(ConfigError, match=r"model\.llm\.hiden_size") as err:
        from_dict(Train, {"model": {"llm": {"hiden_size": 3}}})
    assert "hidden_size" in str(err.value)  # the valid keys are listed
    with pytest.raises(ConfigError, match=r"unknown key\(s\) learning_rate"):
        from_dict(Train, {"learning_rate": 0.1})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"steps": "10"}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"steps": True}, "steps"),  # bool is not an int here
        ({"use_ema": 1}, "use_ema"),
        ({"lr": "fast"}, "lr"),
        ({"lr": False}, "lr"),
        ({"name": 3}, "name"),
        ({"model": {"llm": {"hidden_size": "big"}}}, "model.llm.hidden_size"),
        ({"model": {"llm": 5}}, "model.llm"),
        ({"model": {"widths": 8}}, "model.widths"),
        ({"model": {"widths": [8, "x"]}}, r"model.widths\[1\]"),
        ({"model": {"sizes": [1, "2"]}}, r"model.sizes\[1\]"),
        ({"tags": "a"}, "tags"),
        ({"weights": {"mse": "x"}}, "weights.mse"),
        ({"resume": 7}, "resume"),
    ],
)
def test_wrong_type_names_key(data, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        from_dict(Train, data)


def test_literal_violation_names_key_and_choices():
    with pytest.raises(ConfigError, match="mode") as err:
        from_dict(Train, {"mode": "gdu"})
    assert "gduf" in str(err.value) and "diga" in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.llm\.act.*silu.*gelu"):
        from_dict(Train, {"model": {"llm": {"act": "relu"}}})


def test_validate_hook_errors_are_config_errors():
    with pytest.raises(ConfigError, match="steps must be positive"):
        from_dict(Train, {"steps": 0})
    # Nested: the message is prefixed with the section path.
    with pytest.raises(ConfigError, match=r"^model\.llm\.hidden_size \(66\) must be divisible"):
        from_dict(Train, {"model": {"llm": {"hidden_size": 66}}})
    with pytest.raises(ValueError):  # ConfigError is a ValueError for callers that catch broadly
        from_dict(Train, {"steps": -1})


@dataclass
class Shape:
    shape: tuple[int, int] = (2, 3)


def test_fixed_length_tuple():
    assert from_dict(Shape, {"shape": [4, 5]}).shape == (4, 5)
    assert from_dict(Shape, to_dict(Shape())) == Shape()
    with pytest.raises(ConfigError, match=r"^shape\[1\]:"):
        from_dict(Shape, {"shape": [4, "x"]})


def test_fixed_length_tuple_wrong_length():
    with pytest.raises(ConfigError, match=r"^shape: expected 2 items"):
        from_dict(Shape, {"shape": [1, 2, 3]})


def test_not_a_mapping():
    with pytest.raises(ConfigError):
        from_dict(Train, [1, 2])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- to_dict / round trips


def test_to_dict_round_trip():
    cfg = from_dict(
        Train,
        {"model": {"vit": {"hidden_size": 32}, "sizes": [6, 7]}, "tags": ["x"], "weights": {"a": 0.5}},
    )
    data = to_dict(cfg)
    assert data["model"]["sizes"] == [6, 7]  # tuples become plain lists
    assert data["model"]["vit"]["hidden_size"] == 32
    assert from_dict(Train, data) == cfg
    assert to_dict(from_dict(Train, data)) == data


def test_model_config_defaults_and_round_trip():
    cfg = from_dict(ModelConfig, {})
    assert cfg == ModelConfig()
    assert cfg.llm.hidden_size == 3584 and cfg.vit.num_hidden_layers == 26
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    small = from_dict(ModelConfig, {"llm": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}})
    assert from_dict(ModelConfig, to_dict(small)) == small
    with pytest.raises(ConfigError, match=r"llm\.hiden_size"):
        from_dict(ModelConfig, {"llm": {"hiden_size": 64}})
    with pytest.raises(ConfigError, match=r"^llm\.hidden_size \(65\)"):
        from_dict(ModelConfig, {"llm": {"hidden_size": 65}})
    with pytest.raises(ConfigError, match="detection_loss"):
        from_dict(ModelConfig, {"detection_loss": "focal"})
    assert isinstance(from_dict(LLMConfig, {}).rope_theta, float)


# --------------------------------------------------------------------------- overrides


def test_dotted_overrides():
    data = apply_overrides(
        {"model": {"llm": {"hidden_size": 64}}},
        ["model.llm.num_heads=8", "model.widths=[1, 2, 3]", "--use_ema=true", "name=my run", "lr=0.5", "tags=[a,b]"],
    )
    assert data == {
        "model": {"llm": {"hidden_size": 64, "num_heads": 8}, "widths": [1, 2, 3]},
        "use_ema": True,
        "name": "my run",
        "lr": 0.5,
        "tags": ["a", "b"],
    }
    cfg = from_dict(Train, data)
    assert cfg.model.llm.num_heads == 8 and cfg.model.widths == [1, 2, 3] and cfg.lr == 0.5
    # Creates missing sections; a value with '=' keeps everything after the first one.
    assert apply_overrides({}, ["a.b=3", "s=x=y", "e="]) == {"a": {"b": 3}, "s": "x=y", "e": ""}


def test_override_int_to_float_field():
    cfg = load_config(Train, overrides=["lr=1", "model.llm.rope_theta=1000000.0"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.model.llm.rope_theta == 1e6


def test_override_exponent_float():
    assert apply_overrides({}, ["lr=1e-4"]) == {"lr": 1e-4}
    assert load_config(Train, overrides=["lr=1e-4"]).lr == 1e-4


def test_override_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["lr"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, ["=3"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"lr": 0.1}, ["lr.x=3"])
    with pytest.raises(ConfigError, match=r"model\.llm\.hiden_size"):
        load_config(Train, overrides=["model.llm.hiden_size=3"])


# --------------------------------------------------------------------------- YAML files


def test_load_config_from_yaml(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "model:\n  llm:\n    hidden_size: 32\n    act: gelu\n  widths: [4, 4]\nlr: 0.0002\nmode: diga\ntags:\n  - t1\n"
    )
    cfg = load_config(Train, path, overrides=["model.llm.num_heads=2", "steps=5"])
    assert cfg.model.llm == LLM(hidden_size=32, num_heads=2, act="gelu")
    assert cfg.model.widths == [4, 4] and cfg.lr == 2e-4 and cfg.steps == 5
    assert cfg.mode == "diga" and cfg.tags == ["t1"]
    # Overrides win over the file.
    assert load_config(Train, path, overrides=["lr=0.1"]).lr == 0.1

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(Train, empty) == Train()

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  llm:\n    hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"model\.llm\.hiden_size"):
        load_config(Train, bad)


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Train, tmp_path / "nope.yaml")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = from_dict(Train, {"model": {"sizes": [3, 4], "vit": {}}, "lr": 3e-4, "tags": ["x"]})
    path = tmp_path / f"cfg{suffix}"
    save_config(cfg, path)
    assert load_config(Train, path) == cfg


def test_literal_does_not_accept_bool_for_int():

    @dataclass
    class C:
        level: Literal[0, 1] = 0

    with pytest.raises(ConfigError, match="level"):
        from_dict(C, {"level": True})


def test_validate_value_error_becomes_config_error():
    @dataclass
    class C:
        n: int = 1

        def validate(self):
            if self.n < 0:
                raise ValueError("n must be non-negative")

    with pytest.raises(ConfigError, match="non-negative"):
        from_dict(C, {"n": -1})


def test_base_include_at_any_level(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text("llm:\n  hidden_size: 64\n  num_attention_heads: 4\nmax_latent_size: 8\n")
    (tmp_path / "run.yaml").write_text("model:\n  _base_: model/small.yaml\n  max_latent_size: 16\nname: x\n")
    data = load_yaml(tmp_path / "run.yaml")
    assert data == {"model": {"llm": {"hidden_size": 64, "num_attention_heads": 4}, "max_latent_size": 16}, "name": "x"}


def test_base_include_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_yaml(tmp_path / "a.yaml")
