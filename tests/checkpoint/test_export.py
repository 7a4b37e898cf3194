"""Exports: sharded bf16/fp32 model directories, back-export to the BAGEL layout, peft adapters, hub ids."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from helpers import tiny_config
from helpers.bfl_layout import write_bfl_vae
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bagel_checkpoint import CORPUS, TINY, bagel_state, llm_json, run, vit_json

from unigendet.checkpoint.bagel import load_bagel_checkpoint, save_bagel_checkpoint
from unigendet.checkpoint.export import (
    ADAPTER_DIR,
    base_state,
    load_model_directory,
    merge_lora_state,
    save_model_directory,
)
from unigendet.data.tokenizer import build_tiny_tokenizer
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE

CFG = tiny_config()


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = UniGenDet(CFG).eval()
    for param in model.parameters():  # break the und -> gen copy so every tensor is distinct
        param.data.add_(0.01 * torch.randn_like(param))
    return model, FluxVAE(CFG.vae), build_tiny_tokenizer(CORPUS, vocab_size=CFG.llm.vocab_size)


def test_sharded_export_loads_to_identical_outputs(tmp_path, parts, mixed_samples):
    model, vae, tokenizer = parts
    save_model_directory(tmp_path, model, model.state_dict(), vae, tokenizer, max_shard_size="300KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    for shard in shards:
        assert (tmp_path / shard).stat().st_size <= 300_000 + 64_000  # one tensor may overflow a shard
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "unigendet" and config["architectures"] == ["UniGenDet"]
    loaded, loaded_vae, _ = load_model_directory(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    a, b = run(model, vae, mixed_samples), run(loaded.eval(), loaded_vae, mixed_samples)
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.ce_logits, b.ce_logits)
    # Writing again unsharded removes the old shards, so the directory never holds two layouts.
    save_model_directory(tmp_path, model, model.state_dict(), vae, tokenizer)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("model-0000*"))


def test_bf16_export_halves_the_weights(tmp_path, parts):
    model, vae, tokenizer = parts
    save_model_directory(tmp_path / "fp32", model, model.state_dict(), vae, tokenizer)
    save_model_directory(tmp_path / "bf16", model, model.state_dict(), vae, tokenizer, dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "bf16")}
    assert size["bf16"] < 0.51 * size["fp32"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _, _ = load_model_directory(tmp_path / "bf16", dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        if value.is_floating_point() and key in loaded.state_dict() and "pos_embed" not in key:
            assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16)), key


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny BAGEL/UniGenDet directory in the released layout (DIGA variant: fake_cls_head and diga_mlp)."""
    root = tmp_path_factory.mktemp("official") / "UniGenDet-tiny"
    root.mkdir()
    (root / "llm_config.json").write_text(json.dumps(llm_json(CFG.llm)))
    (root / "vit_config.json").write_text(json.dumps(vit_json(CFG.vit)))
    save_file(bagel_state(seed=4, latent_to_vit=False, diga_mlp=True), str(root / "ema.safetensors"))
    write_bfl_vae(root / "ae.safetensors", CFG.vae, seed=5)
    build_tiny_tokenizer(CORPUS, vocab_size=CFG.llm.vocab_size).save_pretrained(str(root))
    return root


def _assert_same_files(a, b, name):
    left, right = load_file(str(a / name)), load_file(str(b / name))
    assert set(left) == set(right), sorted(set(left) ^ set(right))
    for key in left:
        assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_official_layout_round_trip_is_bit_exact(tmp_path, official, dtype):
    source = official
    if dtype is not None:  # a bf16 release: the weights in bf16, the sin-cos tables fp32 as released
        source = tmp_path / "bf16-release"
        shutil.copytree(official, source)
        state = load_file(str(official / "ema.safetensors"))
        save_file({k: v if k.endswith("pos_embed") else v.to(dtype) for k, v in state.items()},
                  str(source / "ema.safetensors"))
    model, vae, tokenizer = load_bagel_checkpoint(source, dtype=dtype, **TINY)
    out = save_bagel_checkpoint(tmp_path / "back", model, vae, tokenizer)
    _assert_same_files(source, out, "ema.safetensors")
    _assert_same_files(source, out, "ae.safetensors")
    for name in ("llm_config.json", "vit_config.json"):
        mine, theirs = json.loads((out / name).read_text()), json.loads((source / name).read_text())
        assert all(mine[k] == theirs[k] for k in theirs if k in mine and k not in ("torch_dtype",)), name
    # BAGEL's code builds the slow Qwen2Tokenizer, which reads vocab.json + merges.txt: read them back with the
    # tokenizers library's own parser of that format and compare with the fast tokenizer's BPE model.
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    fast = json.loads((out / "tokenizer.json").read_text())["model"]
    from_files = json.loads(Tokenizer(BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt"))).to_str())
    assert from_files["model"]["vocab"] == fast["vocab"]
    assert [list(m) for m in from_files["model"]["merges"]] == [list(m) for m in fast["merges"]]
    added = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"):
        assert added[str(tokenizer.convert_tokens_to_ids(token))]["content"] == token
    again, _, again_tokenizer = load_bagel_checkpoint(out, dtype=dtype, **TINY)
    assert again.config == model.config and again_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_back_export_shards_with_an_index_the_loader_reads(tmp_path, official, mixed_samples):
    model, vae, tokenizer = load_bagel_checkpoint(official, **TINY)
    out = save_bagel_checkpoint(tmp_path / "sharded", model, vae, tokenizer, max_shard_size="250KB")
    assert (out / "ema.safetensors.index.json").is_file() and not (out / "ema.safetensors").exists()
    again, again_vae, _ = load_bagel_checkpoint(out, **TINY)
    a, b = run(model, vae, mixed_samples), run(again, again_vae, mixed_samples)
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.det_logits, b.det_logits)


def test_lora_export_writes_a_peft_adapter_equal_to_the_merged_weights(tmp_path, parts, mixed_samples):
    from peft import PeftModel

    from unigendet.training.freeze import LoRAConfig, apply_lora

    model, vae, tokenizer = parts
    lora = LoRAConfig(enabled=True, r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"])
    adapted = apply_lora(copy.deepcopy(model), lora)
    torch.manual_seed(1)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapter do something
            param.data.normal_(std=0.05)
    state = adapted.state_dict()
    save_model_directory(tmp_path, adapted, state, vae, tokenizer, lora_scaling=lora.scaling)
    adapter = tmp_path / ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    base = UniGenDet.without_weights(CFG)
    base.load_state_dict_strict({k: v.clone() for k, v in base_state(state).items()})  # peft merges in place
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    n_lora = sum("lora_A" in k for k in peft_model.state_dict())
    assert n_lora == sum("lora_A" in k for k in state) > 0
    merged_by_peft = peft_model.merge_and_unload().eval()
    exported, exported_vae, _ = load_model_directory(tmp_path)
    ours = merge_lora_state(state, lora.scaling)
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(merged_by_peft.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
        assert torch.equal(value, ours[key]), key
    a, b = run(merged_by_peft, vae, mixed_samples), run(exported.eval(), exported_vae, mixed_samples)
    torch.testing.assert_close(a.velocity, b.velocity, rtol=1e-5, atol=1e-5)
    assert not torch.equal(a.velocity, run(model, vae, mixed_samples).velocity)  # the adapter changed the model


def test_hub_id_loads_from_the_local_cache_offline_and_names_the_download_command(tmp_path, parts, monkeypatch,
                                                                                 capsys):
    import huggingface_hub.constants as hub_constants

    model, vae, tokenizer = parts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        load_model_directory("someone/unigendet-tiny")
    assert "'someone/unigendet-tiny'" in str(err.value)
    assert "huggingface-cli download someone/unigendet-tiny" in str(err.value)
    # The hub cache layout: models--<owner>--<name>/snapshots/<commit>/ with refs/main naming the commit.
    repo = tmp_path / "hub" / "models--someone--unigendet-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_model_directory(repo / "snapshots" / commit, model, model.state_dict(), vae, tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded, _, _ = load_model_directory("someone/unigendet-tiny")
    assert torch.equal(loaded.llm2vae.weight, model.llm2vae.weight)
    from unigendet.inference.loading import load_for_inference

    assert torch.equal(load_for_inference("someone/unigendet-tiny", device="cpu")[0].vae2llm.weight,
                       model.vae2llm.weight)
    # From the command line: a one-line error naming the id and the download command (exit status 2).
    from PIL import Image

    from unigendet.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["detect", str(tmp_path / "a.png"), "--model", "nobody/missing", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "huggingface-cli download nobody/missing" in err
    with pytest.raises(FileNotFoundError, match="model directory runs/x/final does not exist"):
        load_model_directory("runs/x/final")


def test_inference_loads_sharded_exports_and_auto_dtype(tmp_path, parts):
    from unigendet.inference.loading import load_for_inference, resolve_dtype

    model, vae, tokenizer = parts
    save_model_directory(tmp_path, model, model.state_dict(), vae, tokenizer, dtype="bf16", max_shard_size="300KB")
    loaded, _, _ = load_for_inference(tmp_path, device="cpu", dtype="auto")
    assert loaded.vae2llm.weight.dtype == torch.float32  # auto is fp32 on CPU: the bf16 values, widened
    assert torch.equal(loaded.vae2llm.weight, model.vae2llm.weight.to(torch.bfloat16).float())
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype("int8", torch.device("cpu"))


def test_shard_sizes_parse_and_the_trainer_export_settings_validate():
    from unigendet.checkpoint.manager import CheckpointConfig
    from unigendet.config.loader import ConfigError
    from unigendet.utils.safetensors_shards import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2**31 and parse_size("300 KB") == 300_000
    for bad in ("lots", "0GB", "-1MB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ConfigError, match="export_max_shard_size"):
        CheckpointConfig(export_max_shard_size="lots").validate()
    assert CheckpointConfig(export_max_shard_size="none").export_shard_size() is None
    assert CheckpointConfig().export_shard_size() == "5GB" and CheckpointConfig().export_dtype == "fp32"
