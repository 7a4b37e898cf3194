"""Partitioned (ZeRO-3, ``deepspeed.zero.Init``) model construction: the same values as a full construction, from a
random init and from checkpoints, lower peak host memory per rank, and the configuration rules. The distributed
checks run a driver script on 2 CPU ranks (gloo) under torchrun, like a launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_config

from unigendet.config.loader import ConfigError
from unigendet.training.construction import resolve_construction

DRIVER = r'''
import json, resource, sys

import torch

from unigendet.config.loader import from_dict
from unigendet.distributed import all_gather_object, close_process_group, exit_process, init_process_group, rank
from unigendet.distributed.engine import DeepSpeedConfig, OptimConfig, resolve_deepspeed_config
from unigendet.models.config import ModelConfig
from unigendet.training.builders import InitConfig, build_model_and_vae
from unigendet.utils.seeding import seed_everything

task, out = sys.argv[1], sys.argv[2]
init_process_group("cpu")


def zero3(dtype, offload=False):
    config = resolve_deepspeed_config(DeepSpeedConfig(zero_stage=3, offload_params=offload), OptimConfig(),
                                      dtype == torch.bfloat16, world_size=2)
    # Partition every tensor of the tiny model (by default those under 1e5 elements stay whole on every rank).
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def build(init, cfg, dtype, partitioned, offload=False):
    seed_everything(1234)
    model, vae = build_model_and_vae(init, cfg, dtype, zero3_config=zero3(dtype, offload) if partitioned else None)
    return model, vae, torch.get_rng_state()


def gathered(model, dtype):
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.data.detach().to(dtype).clone()
    return out


def differences(a, b):
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(set(a) ^ set(b))[:5]}"]
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


if task == "equal":
    cases = json.loads(sys.argv[3])
    report = {}
    for case in cases:
        cfg = from_dict(ModelConfig, case["model"])
        init = InitConfig(kind=case["kind"], path=case["path"], weights=case.get("weights"), tokenizer="tiny")
        dtype = getattr(torch, case["dtype"])
        full, full_vae, full_rng = build(init, cfg, dtype, partitioned=False)
        part, part_vae, part_rng = build(init, cfg, dtype, partitioned=True, offload=case["offload"])
        report[f"{case['kind']}-{case['dtype']}" + ("-offload" if case["offload"] else "")] = {
            "params": differences(gathered(full, dtype), gathered(part, dtype)),
            "partitioned": all(hasattr(p, "ds_id") for p in part.parameters()),
            "local_numel": sum(p.ds_tensor.numel() for p in part.parameters()),
            "numel": sum(p.numel() for p in full.parameters()),
            "buffers": differences(dict(full.named_buffers()), dict(part.named_buffers())),
            "vae": differences(full_vae.state_dict(), part_vae.state_dict()),
            "rng": torch.equal(full_rng, part_rng),
            "train_mode": part.training,
            # The fine-tuned head is the checkpoint's plus one: far from a fresh init's values.
            "tuned_head": bool(gathered(part, torch.float32)["detection_head.3.bias"].abs().min() > 0.5),
        }
else:
    cfg = from_dict(ModelConfig, json.loads(sys.argv[3]))
    model, _, _ = build(InitConfig(kind="random", tokenizer="tiny"), cfg, torch.float32, task == "partitioned")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"peak_rss": all_gather_object(peak), "numel": sum(getattr(p, "ds_numel", p.numel())
                                                                 for p in model.parameters())}
if rank() == 0:
    with open(out, "w") as f:
        json.dump(report, f)
close_process_group()
exit_process(0)
'''


def run_driver(tmp_path: Path, *args: str, timeout: int = 300, env: dict[str, str] | None = None) -> dict:
    """The driver on 2 CPU ranks; rank 0's JSON report."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / f"report-{args[0]}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), args[0], str(out), *args[1:]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _model_json(cfg) -> dict:
    from unigendet.config.loader import to_dict

    return to_dict(cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny export directory (without the DIGA projector) and a tiny BAGEL directory (without the detection
    head), both with weights that differ from any fresh init, so the loads and the fresh heads are both exercised."""
    from safetensors.torch import save_file

    from unigendet.checkpoint.bagel import save_bagel_checkpoint, to_bagel_state_dict
    from unigendet.checkpoint.export import save_model_directory
    from unigendet.data.tokenizer import build_tiny_tokenizer
    from unigendet.models.unigendet import UniGenDet
    from unigendet.models.vae import FluxVAE

    root = tmp_path_factory.mktemp("checkpoints")
    cfg = tiny_config()
    torch.manual_seed(7)
    model, vae = UniGenDet(cfg), FluxVAE(cfg.vae)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    tokenizer = build_tiny_tokenizer(["This is a real image.", "This is a fake image."], vocab_size=512)
    state = model.state_dict()
    save_model_directory(root / "export", model, state, vae, tokenizer, max_shard_size=200_000)
    no_head = {k: v for k, v in state.items() if not k.startswith("detection_head.")}
    save_bagel_checkpoint(root / "bagel", model, vae, tokenizer, state=no_head, dtype="bf16")
    # A fine-tune file in the released naming that overrides some base keys (init.weights) and adds the head.
    tuned = {k: v + 1.0 for k, v in state.items() if k.startswith(("detection_head.", "language_model.model.norm"))}
    save_file(to_bagel_state_dict(tuned, cfg, pos_embed=False), str(root / "tuned.safetensors"))
    return root


def _cases(checkpoints: Path) -> list[dict]:
    plain = _model_json(tiny_config())
    with_projector = _model_json(tiny_config(diga_projector=True))
    cases = [{"kind": "random", "path": None, "model": plain, "dtype": d} for d in ("float32", "bfloat16")]
    cases += [{"kind": "unigendet", "path": str(checkpoints / "export"), "model": with_projector, "dtype": d}
              for d in ("float32", "bfloat16")]
    cases.append({"kind": "bagel", "path": str(checkpoints / "bagel"), "model": plain, "dtype": "bfloat16"})
    cases = [{**case, "offload": False} for case in cases]
    # Parameter offload (the partitions are created on zero.Init's remote device, the host) and a fine-tune file
    # over the base directory.
    cases.append({"kind": "bagel", "path": str(checkpoints / "bagel"), "model": plain, "dtype": "bfloat16",
                  "offload": True, "weights": str(checkpoints / "tuned.safetensors")})
    return cases


@pytest.mark.slow
def test_partitioned_construction_equals_full_construction(tmp_path, checkpoints):
    """Random init (fp32 and bf16), a sharded export (the DIGA projector fresh) and a bf16 BAGEL directory (the
    detection head fresh): every parameter gathered from the partitions equals the full construction's (cast to
    the training dtype) bit for bit, buffers and VAE too, and the host generator ends where it ends after a full
    construction (so everything seeded later is unchanged)."""
    report = run_driver(tmp_path, "equal", json.dumps(_cases(checkpoints)))
    assert set(report) == {"random-float32", "random-bfloat16", "unigendet-float32", "unigendet-bfloat16",
                           "bagel-bfloat16", "bagel-bfloat16-offload"}
    assert report["bagel-bfloat16-offload"]["tuned_head"] and not report["bagel-bfloat16"]["tuned_head"]
    for name, case in report.items():
        assert case["params"] == [], (name, case["params"])
        assert case["buffers"] == [] and case["vae"] == [], name
        assert case["rng"], name
        assert case["partitioned"] and case["train_mode"], name
        # Each of the 2 ranks holds about half of the parameters (padding and small persisted tensors aside).
        assert case["local_numel"] < 0.6 * case["numel"], (name, case["local_numel"], case["numel"])


# ~130M parameters: the tiny geometry widened, so construction memory dwarfs the interpreter's own.
WIDE = {"llm.hidden_size": 1024, "llm.intermediate_size": 2816, "llm.num_attention_heads": 8,
        "llm.num_key_value_heads": 2, "llm.num_hidden_layers": 6, "llm.vocab_size": 4096}


@pytest.mark.slow
def test_partitioned_construction_lowers_peak_host_memory_per_rank(tmp_path):
    """Each mode in its own 2-rank launch, so the peaks are independent. Tensors above 1 MiB are allocated with
    mmap in both launches: glibc otherwise serves this model's 4-12 MB tensors from its heap once a first one is
    freed (its mmap threshold grows up to 32 MiB) and keeps the freed heap, so the peak would count memory the
    process no longer uses. A 7B model's large tensors are above 32 MiB, where glibc returns them on free."""
    model = json.dumps(_model_json(tiny_config(**WIDE)))
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
    full = run_driver(tmp_path, "full", model, env=env)
    part = run_driver(tmp_path, "partitioned", model, env=env)
    assert full["numel"] == part["numel"] > 100e6
    model_mib = full["numel"] * 4 / 2**20
    full_mib = [p / 2**20 for p in full["peak_rss"]]
    part_mib = [p / 2**20 for p in part["peak_rss"]]
    print(f"\n{full['numel'] / 1e6:.0f}M parameters ({model_mib:.0f} MiB fp32): peak host RSS per rank after "
          f"construction, full {[round(m) for m in full_mib]} MiB, partitioned {[round(m) for m in part_mib]} MiB")
    # The partitioned build saves half the model per rank minus one module's transient (measured 274 MiB of 559 on
    # an idle machine); a quarter leaves room for allocator noise when other jobs share the machine.
    for f, p in zip(full_mib, part_mib):
        assert f - p > model_mib / 4, (full_mib, part_mib, model_mib)


def test_construction_modes():
    assert resolve_construction("auto", 3, "gduf")[0] == "partitioned"
    assert resolve_construction("auto", 2, "gduf") == (
        "full", "deepspeed.zero_stage is 2 (only ZeRO-3 partitions parameters)")
    assert resolve_construction("auto", 3, "diga")[0] == "full"
    assert resolve_construction("full", 3, "gduf")[0] == "full"
    assert resolve_construction("partitioned", 3, "gduf")[0] == "partitioned"


@pytest.mark.parametrize("zero_stage, stage, match", [
    (2, "gduf", "zero_stage is 2"),
    (1, "diga", "zero_stage is 1 .*; stage diga copies the whole model as its frozen teacher"),
    (3, "diga", "frozen teacher"),
])
def test_forced_partitioned_construction_names_what_blocks_it(zero_stage, stage, match):
    with pytest.raises(ConfigError, match=f"init.construction: partitioned cannot be used here: .*{match}"):
        resolve_construction("partitioned", zero_stage, stage)


def test_train_config_checks_the_construction_at_load():
    from unigendet.training.config import load_train_config

    recipe = REPO / "configs" / "train" / "gduf_demo.yaml"
    with pytest.raises(ConfigError, match="init.construction: partitioned cannot be used here"):
        load_train_config(str(recipe), ["init.construction=partitioned", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match="init.construction"):
        load_train_config(str(recipe), ["init.construction=sharded"])
    cfg = load_train_config(str(recipe), ["init.construction=partitioned", "deepspeed.zero_stage=3"])
    assert cfg.init.construction == "partitioned"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from unigendet.demo.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=24, num_heldout=4, image_size=64, seed=0)


def _train(ckpt: Path, demo, construction: str, extra: list[str]) -> tuple[list[dict], str]:
    """Three ZeRO-3 steps on 2 CPU ranks with weight decay (so the decay/no-decay split of the parameter groups
    matters); returns the logged metrics and the ranks' log."""
    args = ["-m", "unigendet.cli", "train", "--config", str(REPO / "configs" / "train" / "gduf_demo.yaml"),
            f"data.sources.fakeclue.json_path={demo.train_json}", f"data.sources.fakeclue.image_root={demo.image_root}",
            f"data.sources.t2i.data_files=[{demo.t2i_parquet}]", f"checkpoint.dir={ckpt}", "logging.interval=1",
            "logging.progress_bar=never", "deepspeed.zero_stage=3", f"init.construction={construction}",
            "total_steps=3", "optim.warmup_steps=0", "checkpoint.interval=100", "data.num_workers=0", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["lora.enabled=true", "lora.r=4"]], ids=["plain", "lora"])
def test_training_from_a_partitioned_construction_matches_a_full_one(tmp_path, demo, extra):
    """The Trainer under ZeRO-3, without and with LoRA adapters (built on the partitioned model): the same losses
    step by step and the same exported weights."""
    from safetensors.torch import load_file

    full, full_log = _train(tmp_path / "full", demo, "full", extra)
    part, part_log = _train(tmp_path / "part", demo, "partitioned", extra)
    assert "model construction: full (init.construction is full)" in full_log
    assert "model construction: partitioned" in part_log
    assert "after model construction: peak host RSS per rank" in part_log
    assert [h["loss"] for h in part] == [h["loss"] for h in full]
    exported = [load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("full", "part")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
