"""How much longer a pack fits with activation checkpointing: no checkpointing, whole-layer and sub-layer
(attention and MLP halves) checkpointing, measured on CPU as the peak resident memory of one training step.

    python benchmarks/checkpoint_memory.py                                   # demo geometry, fp32
    python benchmarks/checkpoint_memory.py --model-config configs/model/tiny.yaml --tokens 1024 2048 4096

Each (mode, pack size) runs in its own process: build the model and VAE, reset the kernel's peak-RSS mark
(``/proc/self/clear_refs``), run one GDUF step (VAE encode, forward, backward), and read the peak resident set
above the resident set just before the step. A line fitted per mode over the pack sizes gives bytes per token;
the longest pack under ``--budget-mib`` of step memory follows, and its ratio to the no-checkpointing pack. The
step time of each mode at the largest measured pack is printed with it (the price of recomputation). Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODES = ("none", "layer", "sublayer")


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
    cfg = load_config(ModelConfig, args.model_config)
    torch.manual_seed(0)
    model = UniGenDet(cfg).train()
    model.set_activation_checkpointing(args.mode != "none", "layer" if args.mode == "none" else args.mode)
    vae = FluxVAE(cfg.vae)
    objective = GDUFObjective(GDUFLossConfig(), vae, cfg.latent_patch_size, cfg.detection_loss)
    batch = synthetic_pack(cfg, args.tokens[0], args.image_size)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loss, _ = objective(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"mode": args.mode, "tokens": batch.sequence_length, "step_mib": (peak - before) / 1024,
                      "step_s": seconds}))


def measure(args, mode: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--tokens", str(tokens), "--model-config",
           args.model_config, "--image-size", str(args.image_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
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
    p.add_argument("--model-config", default="configs/model/demo.yaml")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--budget-mib", type=float, default=None,
                   help="step memory budget (default: what no checkpointing needs at the largest --tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=MODES, default="none", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    points = {mode: [measure(args, mode, t) for t in args.tokens] for mode in MODES}
    lines = {mode: fit(pts) for mode, pts in points.items()}
    budget = args.budget_mib or points["none"][-1]["step_mib"]
    longest = {mode: (budget - a) / b for mode, (a, b) in lines.items()}
    result = {"model_config": args.model_config, "budget_mib": budget, "points": points,
              "mib_per_1k_tokens": {m: b * 1000 for m, (_, b) in lines.items()},
              "longest_pack_tokens": longest,
              "longer_than_none": {m: longest[m] / longest["none"] for m in MODES},
              "step_s_at_largest": {m: pts[-1]["step_s"] for m, pts in points.items()}}
    if args.json:
        print(json.dumps(result))
        return result
    print(f"{args.model_config}: step memory budget {budget:.0f} MiB (fp32, CPU, peak RSS of one step)")
    print(f"{'mode':<10} {'MiB/1K tok':>11} {'longest pack':>13} {'x none':>7} {'step s':>8}")
    for m in MODES:
        print(f"{m:<10} {result['mib_per_1k_tokens'][m]:>11.1f} {longest[m]:>13.0f} "
              f"{result['longer_than_none'][m]:>7.2f} {result['step_s_at_largest'][m]:>8.2f}")
    return result


if __name__ == "__main__":
    main()
