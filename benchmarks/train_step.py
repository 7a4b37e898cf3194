"""Training-step benchmark: tokens/s, model FLOPs per token, achieved FLOP/s, measured matmul peak, MFU.

    ./run.sh bench --model configs/model/tiny.yaml --pack-tokens 2048 --image-size 64
    python benchmarks/train_step.py --model configs/model/bagel-7b-mot.yaml --layers 4 --device cuda \
        --dtype bf16 --pack-tokens 16384 --image-size 512 --backend flash

The pack is synthetic but laid out exactly like training data (alternating SMSA detection and
text-to-image samples). A step is VAE encode + forward + backward + AdamW step, as in training.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unigendet.config.loader import load_config
from unigendet.models.config import ModelConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import GDUFLossConfig, GDUFObjective
from unigendet.profiling.flops import measured_matmul_peak, training_step_flops
from unigendet.profiling.random_packs import synthetic_pack

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/tiny.yaml")
    p.add_argument("--layers", type=int, default=None, help="override the number of LLM layers (fit a big model on one device)")
    p.add_argument("--backend", default=None, choices=["sdpa", "flex", "flash"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--pack-tokens", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", default=None, choices=["none", "layer"],
                   help="model.compile: 'layer' compiles each decoder layer (compiled during the warm-up steps)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    overrides = [f"llm.num_hidden_layers={args.layers}"] if args.layers else []
    if args.backend:
        overrides.append(f"attn_backend={args.backend}")
    if args.compile:
        overrides.append(f"compile={args.compile}")
    cfg = load_config(ModelConfig, args.model, overrides)

    torch.manual_seed(0)
    model = UniGenDet(cfg).to(device=device, dtype=dtype)
    model.set_activation_checkpointing(args.activation_checkpointing)
    vae = FluxVAE(cfg.vae).to(device=device, dtype=dtype)
    objective = GDUFObjective(GDUFLossConfig(), vae, cfg.latent_patch_size, cfg.detection_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = synthetic_pack(cfg, args.pack_tokens, args.image_size).to(device)
    flops = training_step_flops(cfg, batch)

    def step(i):
        loss, _ = objective(model, batch, torch.Generator(device=device).manual_seed(i))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = measured_matmul_peak(device, dtype)
    achieved = flops.total / seconds
    result = {
        "model": args.model, "layers": cfg.llm.num_hidden_layers, "backend": cfg.attn_backend, "compile": cfg.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "pack_tokens": batch.sequence_length,
        "samples": len(batch.sample_lens), "step_s": seconds, "tokens_per_s": batch.sequence_length / seconds,
        "model_flops_per_token": flops.per_token, "achieved_flops": achieved, "matmul_peak_flops": peak,
        "mfu": achieved / peak,
    }
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    return result


if __name__ == "__main__":
    main()
