"""How much longer a pack fits with activation checkpointing: none, whole-layer, sub-layer (attention and MLP
halves) and nested (whole layers whose recomputation checkpoints its halves, the MLP in token chunks), measured
as the peak memory of one training step.

    python benchmarks/checkpoint_memory.py                                   # demo geometry, fp32
    python benchmarks/checkpoint_memory.py --geometry official               # LLM 512 x 8 MoT layers, ViT 256 x 4
    python benchmarks/checkpoint_memory.py --model-config configs/model/tiny.yaml --tokens 1024 2048 4096

Each (mode, pack size) runs in its own process: build the model and VAE, run one GDUF step (VAE encode, forward,
backward) and read its peak memory above what was in use just before it. On CPU that is the kernel's peak
resident set (``/proc/self/clear_refs`` resets the mark), with glibc told to serve every allocation of 64 KiB or
more by its own mapping (``MALLOC_MMAP_THRESHOLD_``): freed tensors then leave the resident set at once, so the
peak is what the step holds, not what the allocator kept cached from freed ones (without it the figures depend on
the allocator's history: measured 281 MiB against 136 MiB for the same 8K-token step). On CUDA it is
``torch.cuda.max_memory_allocated``. A line fitted per mode over the pack sizes gives bytes per token; the longest
pack under ``--budget-mib`` of step memory follows, and its ratio to the no-checkpointing pack. The step time of
each mode at the largest measured pack is printed with it (the price of recomputation). Linux only on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("none", "layer", "sublayer", "nested")
# The geometry of ``benchmarks/official_step.py`` (our step against the official code), on the tiny model's
# vocabulary, VAE and patch sizes.
GEOMETRIES = {
    "demo": ("configs/model/demo.yaml", []),
    "official": ("configs/model/tiny.yaml", [
        "llm.hidden_size=512", "llm.intermediate_size=1536", "llm.num_hidden_layers=8", "llm.num_attention_heads=8",
        "llm.num_key_value_heads=2", "vit.hidden_size=256", "vit.intermediate_size=1024",
        "vit.num_attention_heads=4", "vit.num_hidden_layers=4"]),
}
MMAP_THRESHOLD_BYTES = 65536


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> None:
    import torch

    from unigendet.config.loader import load_config
    from unigendet.models.config import ModelConfig
    from unigendet.models.unigendet import UniGenDet
    from unigendet.models.vae import FluxVAE
    from unigendet.objectives import GDUFLossConfig, GDUFObjective
    from unigendet.profiling.random_packs import synthetic_pack

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(ModelConfig, args.model_config, args.set)
    torch.manual_seed(0)
    model = UniGenDet(cfg).train().to(device)
    model.set_activation_checkpointing(args.mode != "none", "layer" if args.mode == "none" else args.mode)
    vae = FluxVAE(cfg.vae).to(device)
    objective = GDUFObjective(GDUFLossConfig(), vae, cfg.latent_patch_size, cfg.detection_loss)
    batch = synthetic_pack(cfg, args.tokens[0], args.image_size).to(device)
    before = _reset_peak(device)
    start = time.perf_counter()
    loss, _ = objective(model, batch, torch.Generator(device).manual_seed(0))
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": args.mode, "tokens": batch.sequence_length,
                      "step_mib": (_peak(device) - before) / 2**20, "step_s": seconds}))


def _reset_peak(device) -> int:
    """Reset the peak-memory mark; returns the bytes in use now."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    return _status_kib("VmRSS") * 1024


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def measure(args, mode: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--tokens", str(tokens), "--model-config",
           args.model_config, "--image-size", str(args.image_size), "--threads", str(args.threads),
           "--device", args.device, *[f"--set={o}" for o in args.set]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} at {tokens} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fit(points: list[dict]) -> tuple[float, float]:
    """Least-squares line step_mib = a + b * tokens -> (a, b)."""
    n = len(points)
    xs = [p["tokens"] for p in points]
    ys = [p["step_mib"] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=list(GEOMETRIES), default=None,
                   help="a named geometry (sets --model-config and its overrides)")
    p.add_argument("--model-config", default="configs/model/demo.yaml")
    p.add_argument("--set", action="append", default=[], help="model config override key=value (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--budget-mib", type=float, default=None,
                   help="step memory budget (default: what no checkpointing needs at the largest --tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=MODES, default="none", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.geometry:
        args.model_config, base = GEOMETRIES[args.geometry]
        args.set = [*base, *args.set]
    if args.child:
        child(args)
        return {}
    points = {mode: [measure(args, mode, t) for t in args.tokens] for mode in MODES}
    lines = {mode: fit(pts) for mode, pts in points.items()}
    budget = args.budget_mib or points["none"][-1]["step_mib"]
    longest = {mode: (budget - a) / b for mode, (a, b) in lines.items()}
    result = {"model_config": args.model_config, "overrides": args.set, "budget_mib": budget, "points": points,
              "mib_per_1k_tokens": {m: b * 1000 for m, (_, b) in lines.items()},
              "longest_pack_tokens": longest,
              "longer_than_none": {m: longest[m] / longest["none"] for m in MODES},
              "step_s_at_largest": {m: pts[-1]["step_s"] for m, pts in points.items()}}
    if args.json:
        print(json.dumps(result))
        return result
    measure_of = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"{args.model_config} {' '.join(args.set)}: step memory budget {budget:.0f} MiB (fp32, {args.device}, "
          f"{measure_of} of one step)")
    print(f"{'mode':<10} {'MiB/1K tok':>11} {'longest pack':>13} {'x none':>7} {'step s':>8}")
    for m in MODES:
        print(f"{m:<10} {result['mib_per_1k_tokens'][m]:>11.1f} {longest[m]:>13.0f} "
              f"{result['longer_than_none'][m]:>7.2f} {result['step_s_at_largest'][m]:>8.2f}")
    return result


if __name__ == "__main__":
    main()
