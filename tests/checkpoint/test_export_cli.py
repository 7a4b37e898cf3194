"""``unigendet export`` from the command line: sharded bf16 exports, --to bagel, the model card, push_to_hub."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import tiny_config
from test_bagel_checkpoint import CORPUS, TINY

from unigendet.checkpoint.bagel import load_bagel_checkpoint
from unigendet.checkpoint.commands import ExportCommand, run_export_command
from unigendet.checkpoint.export import load_model_directory, save_model_directory
from unigendet.cli import main
from unigendet.data.tokenizer import build_tiny_tokenizer
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE

CFG = tiny_config()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An fp32 export of a tiny model, with a run config and an evaluation report next to it."""
    torch.manual_seed(0)
    model = UniGenDet(CFG)
    root = tmp_path_factory.mktemp("export_cli")
    directory = root / "final"
    save_model_directory(directory, model, model.state_dict(), FluxVAE(CFG.vae),
                         build_tiny_tokenizer(CORPUS, vocab_size=CFG.llm.vocab_size))
    run = {"stage": "gduf", "total_steps": 7, "seed": 3, "optim": {"lr": 2e-5},
           "data": {"sources": {"fakeclue": {"kind": "fakeclue", "json_path": "data/train.jsonl", "weight": 5.0}}}}
    (directory / "train_config.yaml").write_text(yaml.safe_dump(run))
    report = root / "dmimage.json"
    report.write_text(json.dumps({"metrics": {"head": {"acc": 0.8125, "auc": 0.9}}, "headline": ["head.acc"]}))
    return directory, report, model


def test_cli_export_shards_casts_and_writes_a_card(tmp_path, source, capsys):
    directory, report, model = source
    out = tmp_path / "hub"
    assert main(["export", "--source", str(directory), "--out", str(out), "--max-shard-size", "300KB",
                 "--reports", str(report), "--base-model", "ByteDance-Seed/BAGEL-7B-MoT"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "model.safetensors.index.json" in summary["files"] and summary["dtype"] == "bf16"
    assert (out / "train_config.yaml").is_file()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["base_model"] == "ByteDance-Seed/BAGEL-7B-MoT"
    assert "| dmimage | head.acc | 0.8125 |" in card and "7 steps" in card and "data/train.jsonl" in card
    loaded, _, _ = load_model_directory(out, dtype=torch.bfloat16)
    assert loaded.llm2vae.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.vae2llm.weight, model.vae2llm.weight.to(torch.bfloat16))


def test_cli_export_to_bagel_layout(tmp_path, source):
    directory, _, model = source
    out = tmp_path / "bagel"
    assert main(["export", "--source", str(directory), "--out", str(out), "--to", "bagel", "--dtype", "fp32"]) == 0
    for name in ("ema.safetensors", "llm_config.json", "vit_config.json", "ae.safetensors", "README.md"):
        assert (out / name).is_file(), name
    again, _, _ = load_bagel_checkpoint(out, **TINY)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_cli_export_errors_are_named(tmp_path, source, capsys):
    directory, _, _ = source
    assert main(["export", "--source", str(directory), "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "max_shard_size" in capsys.readouterr().err
    assert main(["export", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_push_to_hub_uploads_the_export_folder(tmp_path, source, monkeypatch):
    """Everything up to the network: the repo is created and the folder uploaded (the HTTP client is replaced)."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)) or "https://hub/commit/1")
    directory, _, _ = source
    out = tmp_path / "pushed"
    summary = run_export_command(ExportCommand(source=str(directory), out=str(out), push_to_hub="me/unigendet-tiny"))
    assert [c[:2] for c in calls] == [("create", "me/unigendet-tiny"), ("upload", "me/unigendet-tiny")]
    assert calls[0][2]["private"] is True and calls[1][2]["folder_path"] == str(out)
    assert summary["pushed"] == "https://hub/commit/1"
    assert 'load_model_directory("me/unigendet-tiny")' in (out / "README.md").read_text()


def test_push_in_offline_mode_is_a_one_line_error_after_the_export(tmp_path, source, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory, _, _ = source
    out = tmp_path / "offline"
    assert main(["export", "--source", str(directory), "--out", str(out), "--push-to-hub", "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pushing it to me/tiny failed" in err
    assert "huggingface-cli upload me/tiny" in err and (out / "README.md").is_file()
