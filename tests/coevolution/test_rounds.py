"""Co-evolution rounds: prompts, the fakes a round adds, the overrides of later rounds, the per-round report."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from unigendet.coevolution.config import CoevolutionConfig, PromptSetConfig
from unigendet.coevolution.report import detection_figures, round_table, write_report
from unigendet.coevolution.rounds import (
    RoundPaths,
    gduf_overrides,
    load_prompt_set,
    round_images,
    write_detection_json,
)
from unigendet.config.loader import ConfigError
from unigendet.evaluation.image_generation import IMAGE_NAME, folder_name
from unigendet.labels import parse_label
from unigendet.recipes import recipe_path


def _prompts(tmp_path, per_prompt=2):
    table = tmp_path / "prompts.jsonl"
    table.write_text("".join(json.dumps({"caption": f"a photo of thing {i}", "photo": f"p{i}"}) + "\n"
                             for i in range(3)))
    return load_prompt_set(PromptSetConfig(data_files=[str(table)], group_column="photo", per_prompt=per_prompt))


def test_prompt_set_repeats_each_caption_with_its_own_index(tmp_path):
    ps = _prompts(tmp_path)
    assert [p.index for p in ps.prompts] == list(range(6))
    assert [p.prompt for p in ps.prompts][:2] == ["a photo of thing 0"] * 2
    assert ps.groups == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert len({p.key for p in ps.prompts}) == 6  # distinct folders, hence distinct images and seeds
    with pytest.raises(ValueError, match="no column"):
        load_prompt_set(PromptSetConfig(data_files=[str(tmp_path / "prompts.jsonl")], group_column="nope"))


def _draw_round(tmp_path, index, prompt_set):
    paths = RoundPaths.of(tmp_path / "run", index)
    for k, prompt in enumerate(prompt_set.prompts):
        folder = paths.generated / folder_name(prompt)
        folder.mkdir(parents=True)
        Image.new("RGB", (16, 16), (10 * k, 20 * index, 0)).save(folder / IMAGE_NAME)
    return paths


def test_a_round_adds_exactly_its_generators_images_as_fakes(tmp_path):
    ps = _prompts(tmp_path)
    paths = _draw_round(tmp_path, 1, ps)
    cfg = _cfg(tmp_path, fake_answers=["This is a fake image. Generated."])
    n = write_detection_json(paths, ps, cfg, "<image>\nReal or fake?")
    entries = json.loads(paths.detection_json.read_text())
    assert n == len(entries) == len(ps.prompts)
    # Every entry is one of the round's images, each image once, labelled fake in the FakeClue convention.
    files = sorted(str(paths.root / e["image"]) for e in entries)
    assert files == sorted(str(p) for p in paths.generated.glob(f"*/{IMAGE_NAME}"))
    assert {parse_label(e["label"], "fakeclue", "t") for e in entries} == {1}  # internal 1 = fake
    assert all(e["conversations"][1]["value"] == "This is a fake image. Generated." for e in entries)
    assert [im.getpixel((0, 0)) for im in round_images(paths, ps.prompts)][:2] == [(0, 20, 0), (10, 20, 0)]


def test_paired_reals_keep_the_added_data_balanced(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(value):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="PNG")
        return buf.getvalue()

    table = tmp_path / "reals.parquet"
    pq.write_table(pa.table({"image": [png(v) for v in (1, 2, 3, 4)]}), table)
    ps = _prompts(tmp_path)  # 6 generated images, more than the table's 4 reals: the table is cycled
    paths = _draw_round(tmp_path, 2, ps)
    n = write_detection_json(paths, ps, _cfg(tmp_path, real_table=str(table)), "q")
    entries = json.loads(paths.detection_json.read_text())
    labels = [parse_label(e["label"], "fakeclue", "t") for e in entries]
    assert n == len(entries) == 12 and labels.count(0) == labels.count(1) == 6
    reals = [e for e in entries if parse_label(e["label"], "fakeclue", "t") == 0]
    values = sorted(Image.open(paths.root / e["image"]).getpixel((0, 0))[0] for e in reals)
    assert set(values) == {1, 2, 3, 4} and len(values) == 6
    assert all(e["conversations"][1]["value"].startswith("This is a real image.") for e in reals)


def _cfg(tmp_path, **kw):
    kw = {"later_gduf_steps": 7, **kw}
    return CoevolutionConfig(gduf=str(recipe_path("train/gduf_demo.yaml")),
                             diga=str(recipe_path("train/diga_demo.yaml")), out_dir=str(tmp_path / "run"),
                             gduf_overrides=["seed=3"], prompts=PromptSetConfig(data_files=["x.jsonl"]), **kw)


def test_later_rounds_continue_from_the_previous_generator_with_every_earlier_rounds_fakes(tmp_path):
    from unigendet.training.config import load_train_config

    cfg = _cfg(tmp_path, fake_weight=0.5, later_gduf_overrides=["optim.warmup_steps=5"])
    assert gduf_overrides(cfg, 1) == ["seed=3"]
    third = gduf_overrides(cfg, 3)
    assert f"init.path={RoundPaths.of(cfg.out_dir, 2).generator}" in third and "total_steps=7" in third
    train = load_train_config(cfg.gduf, third)
    added = {k: v for k, v in train.data.sources.items() if k.startswith("round")}
    assert sorted(added) == ["round1_images", "round2_images"]
    for r, name in ((1, "round1_images"), (2, "round2_images")):
        source = added[name]
        assert source.kind == "fakeclue" and source.weight == 0.5
        assert source.json_path == str(RoundPaths.of(cfg.out_dir, r).detection_json)
        assert source.image_root == str(RoundPaths.of(cfg.out_dir, r).root)
    assert train.init.kind == "unigendet" and train.total_steps == 7 and train.seed == 3
    assert train.optim.warmup_steps == 5


def test_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="rounds"):
        _cfg(tmp_path, rounds=0).validate()
    with pytest.raises(ConfigError, match="fake_answers"):
        _cfg(tmp_path, fake_answers=["This is a real image."]).validate()
    with pytest.raises(ConfigError, match="real_answers"):
        _cfg(tmp_path, real_answers=["This is a fake image."]).validate()
    with pytest.raises(ConfigError, match="later_gduf_steps"):
        _cfg(tmp_path, later_gduf_steps=0).validate()


def test_detection_figures():
    f = detection_figures([0.9, 0.2, 0.6, 0.4, 0.1, 0.7], [1, 0, 1, 1, 0, 0])
    assert f["real_recall"] == pytest.approx(2 / 3) and f["fake_recall"] == pytest.approx(2 / 3)
    assert f["balanced_accuracy"] == pytest.approx(2 / 3) and f["accuracy"] == pytest.approx(4 / 6)
    only_fakes = detection_figures([0.9, 0.2], [1, 1])
    assert only_fakes["balanced_accuracy"] == 0.5 and only_fakes["real_recall"] != only_fakes["real_recall"]


def test_report_has_one_row_per_round(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"round": r, "detector": {"sets": {"heldout": {"balanced_accuracy": 0.8 + r / 100}},
                                         "newest_generator": {"called_fake": 0.1 * r, "mean_p_fake": 0.2},
                                         "by_generator": {f"G{k}": {"mean_p_fake": 0.1 * k, "called_fake": 0.0}
                                                          for k in range(1, r + 1)}},
                "generator": {"consistency": 0.5, "fd": 3.0, "kid": 0.01}} for r in (1, 2)]
    lines = round_table(records)
    assert len(lines) == 4 and "81.0%" in lines[2] and "G2 0.200" in lines[3]
    files = write_report(records, tmp_path)
    assert json.loads(files["json"].read_text()) == records
    assert files["plot"].stat().st_size > 1000


def test_the_shipped_7b_recipe_loads_and_names_existing_stage_recipes():
    from helpers import REPO

    from unigendet.config.loader import load_config

    cfg = load_config(CoevolutionConfig, recipe_path("coevolution/bagel7b.yaml"))
    cfg.validate()
    assert cfg.rounds == 2 and cfg.real_table and cfg.generation.height == 1024
    for stage in (cfg.gduf, cfg.diga):
        assert (REPO / stage).is_file(), stage
    # Round 2's GDUF overrides apply cleanly to the 7B recipe.
    from unigendet.training.config import load_train_config

    train = load_train_config(str(REPO / cfg.gduf), gduf_overrides(cfg, 2))
    assert train.total_steps == 400 and train.data.sources["round1_images"].weight == 0.5


def test_join_ranks_is_a_no_op_for_one_process(monkeypatch):
    from unigendet.coevolution import rounds

    calls = []
    monkeypatch.setattr(rounds, "init_process_group", lambda device: calls.append(device))
    rounds.join_ranks({"WORLD_SIZE": "1"})
    rounds.join_ranks({})
    assert calls == []
    rounds.join_ranks({"WORLD_SIZE": "2"})
    rounds.join_ranks({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "MASTER_ADDR": "h",
                       "MASTER_PORT": "1"})
    assert calls == ["cpu", "cpu"]
