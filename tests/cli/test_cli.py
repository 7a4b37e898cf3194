"""The command line: every command through the one config loader (--print-config round trips, --dry-run checks
without loading a model, short flags as aliases of dotted keys, one-line errors with exit status 2)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from unigendet.cli import COMMANDS, main, stage_main
from unigendet.config.command_line import resolve
from unigendet.config.loader import (
    ConfigError,
    MissingKeyError,
    config_template,
    from_dict,
    key_type,
    load_config,
    parse_text,
    to_yaml,
)
from unigendet.recipes import recipe_path


@pytest.fixture
def inputs(tmp_path):
    """Files and folders the commands read (content is never looked at: nothing is loaded here)."""
    paths = {"model": tmp_path / "model", "root": tmp_path / "dm", "gen": tmp_path / "gen", "stage": tmp_path / "stage"}
    for folder in paths.values():
        folder.mkdir()
    # a saved detector's metadata alone (a cascade's dry run checks that its stage directories hold detectors)
    (paths["stage"] / "detector.json").write_text('{"format": "unigendet-detector", "version": 1, '
                                                  '"detector": "spectral"}')
    for name in ("a.png", "b.png", "test.json", "table.json", "report.json", "results.jsonl"):
        (tmp_path / name).write_text("{}")
        paths[name] = tmp_path / name
    return {k: str(v) for k, v in paths.items()}


def complete_args(name: str, p: dict[str, str]) -> list[str]:
    """Enough settings for each command's config to validate."""
    model = ["--model", p["model"]]
    return {
        "demo": [],
        "train": ["--config", str(recipe_path("train/gduf_demo.yaml"))],
        "coevolve": ["--config", str(recipe_path("coevolution/bagel7b.yaml"))],
        "export": ["--source", p["model"], "--out", p["gen"] + "/export", "--reports", p["report.json"]],
        "convert-data": ["--dataset-info", p["test.json"], "--data-yaml", p["table.json"], "--out", p["gen"] + "/d.yaml"],
        "detect": [p["a.png"], p["b.png"], *model],
        "cascade": ["--binary", p["stage"], "--spectral", p["stage"], "--verifier", "stub_spectral_peak", "--out",
                    p["gen"]],
        "generate": ["a red cup", *model, "--out", p["gen"]],
        "serve": [*model],
        "plan": ["--recipe", str(recipe_path("train/gduf_demo.yaml")), "--gpus", "2"],
        "eval fakeclue": [*model, "--json-path", p["test.json"], "--image-root", p["root"]],
        "eval dmimage": [*model, "--root", p["root"]],
        "eval arforensics": ["--generators", "VAR", "RAR", *model, "--root", p["root"]],
        "eval genimage": [*model, "--root", p["root"]],
        "eval ufd": ["--subsets", "progan", *model, "--root", p["root"], "--split", "test"],
        "eval drct2m": [*model, "--root", p["root"], "--real-root", p["gen"], "--no-pair-reals"],
        "eval diffusionforensics": [*model, "--root", p["root"], "--pair-reals"],
        "eval deepfakebench": ["--datasets", "DFDC", *model, "--root", p["root"], "--json-path", p["test.json"]],
        "eval robustness": [*model, "--json-path", p["test.json"], "--image-root", p["root"]],
        "eval compare": ["--detectors", f"a=unigendet:{p['model']}", f"unigendet:{p['model']}", "--json-path",
                         p["test.json"], "--image-root", p["root"]],
        "eval merge": [p["report.json"]],
        "eval fid": [*model, "--gen-dir", p["gen"], "--data-files", p["table.json"], "--inception-weights",
                     p["report.json"]],
        "eval geneval": [*model, "--stage", "summarise", "--gen-dir", p["gen"], "--results", p["results.jsonl"]],
        "eval diversity": [*model, "--gen-dir", p["gen"], "--data-files", p["table.json"], "--clip-dir", p["gen"]],
    }[name]


def printed_config(capsys, *argv: str) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def _flat(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return keys


# --------------------------------------------------------------------------------------------------
# --print-config


@pytest.mark.parametrize("name", [c.name for c in COMMANDS])
def test_print_config_round_trips_through_the_loader(name, inputs, capsys, tmp_path):
    command = next(c for c in COMMANDS if c.name == name)
    cls = resolve(command.config)
    assert main([*name.split(), *complete_args(name, inputs), "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert _flat(config_template(cls)) <= _flat(printed)  # every key, with its default
    saved = tmp_path / "printed.yaml"
    saved.write_text(text)
    loaded = load_config(cls, saved)
    assert to_yaml(loaded) == text
    assert loaded == from_dict(cls, printed)
    # Read back through the command line, the file alone gives the same config again.
    assert main([*name.split(), "--config", str(saved), "--print-config"]) == 0
    assert capsys.readouterr().out == text


def test_print_config_of_an_incomplete_config_shows_every_key_and_what_is_missing(capsys):
    assert main(["eval", "fakeclue", "--print-config"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed["fakeclue"]["json_path"] is None and printed["fakeclue"]["batch_size"] == 8
    assert printed["decoding"]["do_sample"] is False and printed["model"]["dtype"] == "auto"
    assert "model.path (--model)" in err and "fakeclue.json_path (--json-path)" in err


def test_print_config_still_rejects_a_bad_key(capsys):
    assert main(["eval", "fakeclue", "--print-config", "fakeclue.bacth_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unigendet: error:") and "fakeclue.bacth_size" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# --dry-run


def _forbid_model_loading(monkeypatch):
    import unigendet.inference.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not load a model")

    monkeypatch.setattr(loading, "load_for_inference", refuse)


@pytest.mark.parametrize("name", [c.name for c in COMMANDS if c.name not in ("demo", "train")])
def test_dry_run_validates_without_loading_a_model(name, inputs, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    assert main([*name.split(), *complete_args(name, inputs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "valid" in out


def test_dry_run_of_train_validates_the_recipe(tmp_path, capsys):
    recipe = str(recipe_path("train/gduf_demo.yaml"))
    data = [f"data.sources.fakeclue.json_path={tmp_path / 'train.json'}", f"data.sources.fakeclue.image_root={tmp_path}",
            f"data.sources.t2i.data_files=[{tmp_path / 't2i.parquet'}]"]
    assert main(["train", "--config", recipe, "total_steps=7", *data, "--dry-run"]) == 2  # the files do not exist yet
    assert "data.sources.fakeclue.json_path" in capsys.readouterr().err
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "t2i.parquet").write_bytes(b"")
    assert main(["train", "--config", recipe, "total_steps=7", *data, "--dry-run"]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["train", "--config", recipe, "optim.lrr=1", "--dry-run"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", "total_steps=7"]) == 2
    assert "--config" in capsys.readouterr().err


def test_dry_run_names_a_bad_key(inputs, capsys):
    args = complete_args("eval fakeclue", inputs)
    assert main(["eval", "fakeclue", *args, "fakeclue.bacth_size=3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unigendet: error: unknown key(s) fakeclue.bacth_size") and len(err.splitlines()) == 1
    assert main(["eval", "fakeclue", *args, "decoding.top_p=1.5", "--dry-run"]) == 2
    assert "decoding.top_p must be in (0, 1]" in capsys.readouterr().err


def test_dry_run_reports_missing_inputs(inputs, tmp_path, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    missing = str(tmp_path / "no_model")
    assert main(["detect", inputs["a.png"], "--model", missing, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and missing in err
    assert main(["detect", inputs["a.png"], str(tmp_path / "c.png"), "--model", inputs["model"], "--dry-run"]) == 2
    assert "images[1]" in capsys.readouterr().err
    assert main(["eval", "dmimage", "--model", inputs["model"], "--dry-run"]) == 2
    assert "detection.root (--root)" in capsys.readouterr().err
    # Gathering finished shards reads no model, so its directory need not exist.
    assert main(["eval", "dmimage", "--model", missing, "--root", inputs["root"], "--gather-only", "--dry-run"]) == 0


def test_stage_checks(inputs, capsys):
    fid = ["eval", "fid", "--model", inputs["model"], "--gen-dir", inputs["gen"]]
    assert main([*fid, "--dry-run"]) == 2  # generating needs a prompt table
    assert "prompts.table.data_files (--data-files)" in capsys.readouterr().err
    assert main([*fid, "--stage", "score", "--dry-run"]) == 2  # scoring needs the Inception weights
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    both = [*fid, "--data-files", inputs["table.json"], "--inception-weights", inputs["report.json"]]
    assert main([*both, "--shard", "0/2", "--dry-run"]) == 2
    assert "stage all runs in one process" in capsys.readouterr().err
    assert main(["eval", "geneval", "--model", inputs["model"], "--gen-dir", inputs["gen"], "--stage", "generate",
                 "--dry-run"]) == 2
    assert "geneval.metadata_file (--metadata-file), geneval.prompt_set (--prompt-set)" in capsys.readouterr().err


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        main(["detect", "x.png", "--model", str(tmp_path / "none"), "--dry-run", "--debug"])


# --------------------------------------------------------------------------------------------------
# Short flags are aliases of config keys


@pytest.mark.parametrize("name, flags, keys", [
    ("detect", ["--dtype", "bf16", "--no-smsa", "--posterior", "mean", "--question", "123", "--json"],
     ["model.dtype=bf16", "detector.smsa=false", "detector.posterior=mean", "question='123'", "json=true"]),
    ("generate", ["--size", "48x32", "--steps", "3", "--cfg-interval", "0.1", "0.9", "--seed", "5"],
     ["height=32", "width=48", "sampler.num_steps=3", "sampler.cfg_interval=[0.1,0.9]", "seed=5"]),
    ("eval fid", ["--selection", "official-slice", "--slice", "3", "9", "--dims", "64", "--keep-borders",
                  "--device", "cpu", "--fid-batch-size", "7"],
     ["prompts.rule=official_slice", "prompts.slice_start=3", "prompts.slice_stop=9", "fid.dims=64",
      "generation.crop_black_borders=false", "model.device=cpu", "fid.device=cpu", "fid.batch_size=7"]),
    ("eval robustness", ["--settings", "none", "jpeg70", "--gather-only", "--out", "o", "--name", "n"],
     ["robustness.settings=[none,jpeg70]", "robustness.base.gather_only=true", "robustness.base.out_dir=o",
      "robustness.name=n"]),
    ("eval fakeclue", ["--max-new-tokens", "0", "--label-convention", "real0_fake1", "--shard", "1/2"],
     ["fakeclue.max_new_tokens=0", "fakeclue.label_convention=real0_fake1", "fakeclue.shard=1/2"]),
    ("demo", ["--steps", "6", "--diga-steps", "2", "--out", "o"], ["demo.steps=6", "demo.diga_steps=2", "out_dir=o"]),
    ("eval arforensics", ["--detector", "ltd", "--backbone", "clip", "--generators", "VAR"],
     ["model.detector=ltd", "model.backbone_path=clip", "detection.groups=[VAR]"]),
    ("eval drct2m", ["--split", "train", "--generators", "sd"], ["detection.split=train", "detection.groups=[sd]"]),
    ("eval deepfakebench", ["--compression", "c40", "--frames-per-video", "4"],
     ["detection.compression=c40", "detection.frames_per_video=4"]),
    ("eval compare", ["--name", "cmp", "--out", "o", "--limit", "3", "--max-new-tokens", "0"],
     ["compare.name=cmp", "compare.base.out_dir=o", "compare.base.limit=3", "compare.base.max_new_tokens=0"]),
])
def test_a_flag_and_its_dotted_key_give_the_same_config(name, flags, keys, inputs, capsys):
    base = [*name.split(), *complete_args(name, inputs)]
    via_flags = printed_config(capsys, *base, *flags)
    assert via_flags == printed_config(capsys, *base, *keys)
    assert via_flags != printed_config(capsys, *base)


def test_sample_is_the_papers_decoding_and_single_settings_override_it(inputs, capsys):
    from unigendet.inference.detect import DecodingConfig

    base = ["detect", *complete_args("detect", inputs)]
    decoding = printed_config(capsys, *base, "--sample", "--top-k", "5")["decoding"]
    assert decoding == {**dataclasses.asdict(DecodingConfig.paper()), "top_k": 5}
    assert printed_config(capsys, *base, "--sample", "decoding.top_p=0.5")["decoding"]["top_p"] == 0.5


def test_robustness_benchmark_flag_picks_the_base_config(inputs, capsys):
    model = ["--model", inputs["model"]]
    dm = printed_config(capsys, "eval", "robustness", *model, "--benchmark", "dmimage", "--root", inputs["root"])
    assert dm["robustness"]["base"]["benchmark"] == "dmimage" and dm["robustness"]["name"] == "robustness_dmimage"
    assert dm == printed_config(capsys, "eval", "robustness", *model, "robustness.base.benchmark=dmimage",
                                f"robustness.base.root={inputs['root']}")


def test_precedence_file_then_flags_then_key_values(inputs, capsys, tmp_path):
    recipe = tmp_path / "fakeclue.yaml"
    recipe.write_text(yaml.safe_dump({"fakeclue": {"batch_size": 4, "seed": 1}, "model": {"dtype": "bf16"}}))
    base = ["eval", "fakeclue", *complete_args("eval fakeclue", inputs), "--config", str(recipe)]
    assert printed_config(capsys, *base)["fakeclue"]["batch_size"] == 4
    assert printed_config(capsys, *base, "--batch-size", "6")["fakeclue"]["batch_size"] == 6
    cfg = printed_config(capsys, *base, "--batch-size", "6", "fakeclue.batch_size=7")
    assert cfg["fakeclue"]["batch_size"] == 7 and cfg["fakeclue"]["seed"] == 1 and cfg["model"]["dtype"] == "bf16"


def test_positional_words_stay_text(inputs, capsys):
    base = ["generate", "--model", inputs["model"], "--out", inputs["gen"]]
    prompts = printed_config(capsys, *base, "E=mc2 on a blackboard", "yes", "null", "seed=3")
    assert prompts["prompts"] == ["E=mc2 on a blackboard", "yes", "null"] and prompts["seed"] == 3


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_flag_names_a_config_key_and_help_lists_it(command, capsys):
    cls = resolve(command.config)
    for flag in command.flags:
        for key in flag.keys:
            key_type(cls, key)
    with pytest.raises(SystemExit) as done:
        main([*command.name.split(), "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "key=value" in text and "--print-config" in text
    for flag in command.flags:
        assert flag.name in text
        assert all(f"sets {key}" in text or f", {key}" in text for key in flag.keys)


def test_top_level_usage_and_unknown_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in COMMANDS)
    assert main(["eval", "--help"]) == 0 and "eval fid" in capsys.readouterr().out
    assert main(["evaluate"]) == 2 and "unknown command" in capsys.readouterr().err
    assert main([]) == 2


def test_stage_entry_points(capsys):
    recipe = str(recipe_path("train/diga_demo.yaml"))
    assert stage_main("diga", ["--config", recipe, "--local_rank=0", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["stage"] == "diga"
    with pytest.raises(SystemExit, match="train/gduf.py"):
        stage_main("diga", ["--config", recipe, "stage=gduf"])


# --------------------------------------------------------------------------------------------------
# Loader additions the command line relies on


@dataclasses.dataclass
class _Inner:
    path: str
    size: int = 3


@dataclasses.dataclass
class _Other:
    root: str
    kind: str = "x"


@dataclasses.dataclass
class _Outer:
    inner: _Inner
    either: _Inner | _Other
    name: str | None = None
    shape: tuple[int, int] = (1, 2)


def test_missing_keys_are_named_after_every_given_key_is_checked():
    with pytest.raises(MissingKeyError) as err:
        from_dict(_Outer, {"name": "n"})
    assert err.value.keys == ["inner.path", "either.path"]
    with pytest.raises(ConfigError, match=r"inner\.sise") as bad:
        from_dict(_Outer, {"inner": {"sise": 1}})
    assert not isinstance(bad.value, MissingKeyError)
    with pytest.raises(ConfigError, match=r"either: fits none of .*as _Inner: .*as _Other: "):
        from_dict(_Outer, {"inner": {"path": "p"}, "either": {"path": "p", "root": "r"}})
    assert from_dict(_Outer, {"inner": {"path": "p"}, "either": {"root": "r"}}).either == _Other("r")


def test_template_key_types_and_text_parsing():
    assert config_template(_Outer) == {"inner": {"path": None, "size": 3}, "either": {"path": None, "size": 3},
                                       "name": None, "shape": [1, 2]}
    assert key_type(_Outer, "either.root") is str and key_type(_Outer, "inner.size") is int
    with pytest.raises(ConfigError, match="unknown key inner.nope"):
        key_type(_Outer, "inner.nope")
    assert parse_text("007", str) == "007" and parse_text("null", str | None) == "null"
    assert parse_text("7", int) == 7 and parse_text("1e-4", float) == 1e-4 and parse_text("true", bool | None) is True
    assert parse_text(["3", "4"], tuple[int, int]) == [3, 4] and parse_text(["1", "b"], list[str]) == ["1", "b"]


def test_post_init_errors_become_config_errors_with_the_section():
    from unigendet.inference.detect import DecodingConfig

    holder = dataclasses.make_dataclass("Holder", [("decoding", DecodingConfig)])
    with pytest.raises(ConfigError, match=r"^decoding\.temperature must be > 0"):
        from_dict(holder, {"decoding": {"temperature": 0.0}})


def test_a_list_flag_hands_back_the_overrides_after_it(tmp_path):
    """``--generators A B key=value``: the key=value word is an override, not a third generator."""
    from unigendet.cli import COMMANDS
    from unigendet.config.command_line import config_data, parse_command_line, resolve
    from unigendet.config.loader import from_dict

    command = next(c for c in COMMANDS if c.name == "eval arforensics")
    ns = parse_command_line(command, ["--model", str(tmp_path), "--root", str(tmp_path),
                                      "--generators", "VAR", "RAR", "detection.batch_size=3"])
    cls = resolve(command.config)
    cfg = from_dict(cls, config_data(command, cls, ns))
    assert cfg.detection.groups == ["VAR", "RAR"] and cfg.detection.batch_size == 3
