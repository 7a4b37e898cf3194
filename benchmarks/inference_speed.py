"""Inference throughput: head-only detection vs detection with an explanation, per-token decoding cost, and
text-to-image sampling at 30 and 50 steps with and without classifier-free guidance.

    python benchmarks/inference_speed.py                         # tiny geometry, random weights, CPU
    python benchmarks/inference_speed.py --model-config configs/model/demo.yaml --recipe configs/train/gduf_demo.yaml
    python benchmarks/inference_speed.py --model-dir runs/demo/gduf/final --device cuda --dtype bf16

Every figure is the best of ``--repeats`` timed runs after one warm-up run; head-only and explained detection run
in alternation, and the median and range of their per-pair ratio are printed beside the ratio of the bests. With
random weights the end-of-answer token is rare, so explanations run to ``--tokens``; the generated-token count is
printed and used for the per-token figures. ``decode ms/token/row`` is (explanation time - head-only time) /
generated tokens per image, to compare with ``cached forward ms``: one forward of a batch of one-token queries over
the image contexts' KV cache, the work each decoding step does.

The detector lays out its context as the training run did: ``--model-dir`` reads the exported run's transforms,
``--recipe`` takes them from a training recipe (a random-weight model then sees what a model trained with that recipe
would: at the demo geometry 64-px images stay 64 px, where the model's default transforms would upscale them to
128 px and quadruple the context).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from unigendet.config.loader import load_config
from unigendet.data.tokenizer import build_tiny_tokenizer
from unigendet.inference.detect import DEFAULT_QUESTION, DetectorPreprocessing, UniGenDetDetector
from unigendet.inference.generate import Generator, SamplerSettings
from unigendet.inference.loading import DTYPES, load_for_inference
from unigendet.models.config import ModelConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.training.config import load_train_config

CORPUS = [DEFAULT_QUESTION, "This is a fake image.", "This is a real image.", "a red cup on a wooden table"] * 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="configs/model/tiny.yaml", help="geometry of a random-weight model")
    p.add_argument("--model-dir", default=None, help="an exported model directory instead of random weights")
    p.add_argument("--recipe", default=None,
                   help="training recipe whose data transforms and SMSA layout the detector uses (default: those of "
                        "--model-dir's run, else the model's default transforms)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int):
    """(best wall time of ``repeats`` runs after a warm-up, the last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        seconds, result = timed(fn, device)
        times.append(seconds)
    return min(times), result


def timed(fn, device: torch.device):
    """(wall seconds of one call of ``fn``, its result), the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def interleaved(head_only, explained, device: torch.device, repeats: int):
    """Head-only and explained detection timed in alternation (one warm-up each), so a slow spell of a shared
    machine hits both: (best head-only s, best explained s, explained/head-only of each pair, last explained
    result)."""
    head_only()
    result = explained()
    heads, explains = [], []
    for _ in range(repeats):
        heads.append(timed(head_only, device)[0])
        seconds, result = timed(explained, device)
        explains.append(seconds)
    return min(heads), min(explains), [e / h for h, e in zip(heads, explains)], result


def build(args):
    if args.model_dir:
        return load_for_inference(args.model_dir, device=args.device, dtype=args.dtype)
    cfg = load_config(ModelConfig, args.model_config)
    torch.manual_seed(0)
    model = UniGenDet(cfg).to(args.device, DTYPES[args.dtype]).eval()
    vae = FluxVAE(cfg.vae).to(args.device)
    return model, vae, build_tiny_tokenizer(CORPUS, vocab_size=cfg.llm.vocab_size)


def preprocessing(args) -> DetectorPreprocessing | None:
    """How the detector builds its context: the recipe's data settings, else the exported run's, else None (the
    model's defaults)."""
    if args.recipe:
        data = load_train_config(args.recipe).data
        return DetectorPreprocessing(vit_transform=data.vit_transform.build(),
                                     vae_transform=data.vae_transform.build(), smsa=data.smsa)
    return DetectorPreprocessing.from_run(args.model_dir) if args.model_dir else None


def images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def cached_forward_ms(detector: UniGenDetDetector, pictures: list[Image.Image], device, repeats: int) -> float:
    """One decoding step's work: a batch of one-token queries over the contexts' KV cache (not committed)."""
    fwd = detector.cached_forward
    plans = [detector.context(img, DEFAULT_QUESTION) for img in pictures]
    lat, ts = detector._latents(plans, [0] * len(plans))
    cache = fwd.new_cache(len(plans))
    with torch.no_grad():
        fwd.forward(cache, fwd.embed(fwd.pack(plans), lat, ts), commit=True)
        inputs = torch.full((len(plans),), detector.special.bos, dtype=torch.long, device=fwd.device)
        seconds, _ = best_seconds(lambda: fwd.forward(cache, fwd.token_block(inputs), commit=False), device, repeats)
    return seconds * 1000


def context_tokens(detector: UniGenDetDetector, picture: Image.Image) -> int:
    """Tokens of one image's detection context (VAE block, ViT block, question), as packed for the prefill."""
    return detector.cached_forward.pack([detector.context(picture, DEFAULT_QUESTION)]).sequence_length


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, vae, tokenizer = build(args)
    detector = UniGenDetDetector(model, vae, tokenizer, preprocessing(args))
    pictures = images(args.batch, args.image_size)
    head_s, explain_s, speedups, results = interleaved(lambda: detector.detect(pictures, max_new_tokens=0),
                                                      lambda: detector.detect(pictures, max_new_tokens=args.tokens),
                                                      device, args.repeats)
    tokens = float(np.mean([len(r.token_ids) for r in results]))
    # Decoding's cost is the difference of the two timings. When a few tokens decode in less time than the two
    # timings' noise, the difference can come out zero or negative, which measures nothing: nan then.
    decode_s = explain_s - head_s if explain_s > head_s and tokens > 0 else float("nan")
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "batch": args.batch,
        "context_tokens_per_image": context_tokens(detector, pictures[0]),
        "head_only_images_per_s": args.batch / head_s,
        "explained_images_per_s": args.batch / explain_s,
        "explanation_tokens_per_image": tokens,
        "head_only_speedup": explain_s / head_s,
        "head_only_speedup_median_pair": float(np.median(speedups)),
        "head_only_speedup_pair_range": f"{min(speedups):.2f}-{max(speedups):.2f}",
        "decode_tokens_per_s": args.batch * tokens / decode_s,
        "decode_ms_per_token_step": decode_s / tokens * 1000 if tokens > 0 else float("nan"),
        "cached_forward_ms": cached_forward_ms(detector, pictures, device, args.repeats),
    }
    generator = Generator(model, vae, tokenizer)
    prompts = [CORPUS[3]] * args.batch
    for steps in args.steps:
        for name, scale in (("cfg", 4.0), ("no_cfg", 1.0)):
            settings = SamplerSettings(num_steps=steps, cfg_text_scale=scale, cfg_interval=(0.0, 1.0))
            seconds, _ = best_seconds(lambda: generator.generate(prompts, args.image_size, args.image_size,
                                                                 settings=settings), device, args.repeats)
            out[f"generate_{steps}_steps_{name}_images_per_s"] = args.batch / seconds
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>40}: {value:.4g}" if isinstance(value, float) else f"{key:>40}: {value}")
    return out


if __name__ == "__main__":
    main()
