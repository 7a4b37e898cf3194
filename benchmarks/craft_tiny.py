"""CRAFT on its tiny recipe: UNet evaluations per batch and images/s for scoring and training (with and without
cached inverted latents), and optionally a behavioural run (does fine-tuning separate reals from fakes?).

    python benchmarks/craft_tiny.py --threads 1
    python benchmarks/craft_tiny.py --threads 1 --behaviour --steps 60

Synthetic data: "real" = smooth random colour fields (4x4 Gaussian noise, bicubic up-sampled to 32 px); "fake" =
the same plus a period-2 checkerboard of amplitude 0.15 on the [-1, 1] scale (an up-sampling-like artefact).
The behavioural run uses the MSE distance with margin m = 2 x the mean real distance at initialisation and
delta = m / 2, trains on 64 images (random batches of 8) and reports, on 64 other images, the mean distances of
reals and fakes and the AUC of the distance and of p(fake), before and after; then the same with
``perturb=false`` and ``finetune=[]`` (only the MLP trains).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from unigendet.detectors.base import build_detector, detector_config
from unigendet.recipes import recipe_path


def smooth_fields(seed: int, n: int, size: int = 32, amplitude: float = 0.15):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0)[..., None]
    images, labels = [], []
    for i in range(n):
        small = rng.normal(0, 0.5, (4, 4, 3)).clip(-1, 1)
        channels = [Image.fromarray(((small[..., c] + 1) * 127.5).astype(np.uint8)).resize((size, size), Image.BICUBIC)
                    for c in range(3)]
        field = np.stack([np.asarray(ch, dtype=np.float64) / 127.5 - 1 for ch in channels], axis=-1)
        if i % 2:
            field = field + amplitude * checker
        images.append(Image.fromarray(((field.clip(-1, 1) + 1) * 127.5).astype(np.uint8)))
        labels.append(i % 2)
    return images, labels


def auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def tiny(*overrides: str):
    return build_detector("craft", detector_config("craft", recipe_path("detectors/craft_tiny.yaml"), list(overrides)))


def _per_batch(detector, fn, repeats: int) -> tuple[float, float, float]:
    detector.unet_calls.reset()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds = (time.perf_counter() - start) / repeats
    return seconds, detector.unet_calls.with_grad / repeats, detector.unet_calls.without_grad / repeats


def cost(batch_size: int = 8, repeats: int = 3) -> dict:
    detector = tiny()
    images, labels = smooth_fields(0, 4 * batch_size)
    optimizer = detector.make_optimizer()
    batch = detector.collate(images[:batch_size], labels[:batch_size], train=True)
    detector.training_step(batch, optimizer)  # warm-up
    out = {"num_steps": detector.config.num_steps, "k": detector.config.k, "batch_size": batch_size}
    seconds, grad, nograd = _per_batch(detector, lambda: detector.training_step(batch, optimizer), repeats)
    out["train_uncached"] = {"images_per_s": batch_size / seconds, "unet_calls_with_grad": grad,
                             "unet_calls_without_grad": nograd}
    with torch.no_grad():
        cached = dict(batch, features=detector.extract_features(batch))
    seconds, grad, nograd = _per_batch(detector, lambda: detector.training_step(cached, optimizer), repeats)
    out["train_cached"] = {"images_per_s": batch_size / seconds, "unet_calls_with_grad": grad,
                           "unet_calls_without_grad": nograd}
    seconds, grad, nograd = _per_batch(detector, lambda: detector.predict_proba(images, batch_size=batch_size), 2)
    out["score"] = {"images_per_s": len(images) / seconds, "unet_calls_per_batch": (grad + nograd) * batch_size
                    / len(images)}
    return out


def _distances(detector, images, labels) -> dict:
    detector.eval()
    with torch.no_grad():
        d = torch.cat([detector.run(detector.preprocess(images[s:s + 16]))["distance"]
                       for s in range(0, len(images), 16)]).tolist()
    real = [v for v, y in zip(d, labels) if y == 0]
    fake = [v for v, y in zip(d, labels) if y == 1]
    return {"d_real": sum(real) / len(real), "d_fake": sum(fake) / len(fake), "auc_d": auc(d, labels)}


def behaviour(steps: int, extra: list[str]) -> dict:
    train_x, train_y = smooth_fields(0, 64)
    test_x, test_y = smooth_fields(1, 64)
    m = 2 * _distances(tiny("distance=mse"), train_x[:32], train_y[:32])["d_real"]
    detector = tiny("distance=mse", f"margin={m}", f"delta={m / 2}", *extra)
    before = _distances(detector, test_x, test_y)
    optimizer = detector.make_optimizer()
    order = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(len(train_x), generator=order)[:8].tolist()
        detector.training_step(detector.collate([train_x[i] for i in idx], [train_y[i] for i in idx], train=True),
                               optimizer)
    seconds = time.perf_counter() - start
    after = _distances(detector, test_x, test_y)
    return {"margin": m, "before": before, "after": after, "train_seconds": seconds,
            "auc_p_fake": auc(detector.predict_proba(test_x, batch_size=16), test_y)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--behaviour", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"cost": cost()}
    if args.behaviour:
        report["behaviour"] = {"full": behaviour(args.steps, []),
                               "no_finetune_no_perturb": behaviour(args.steps, ["perturb=false", "finetune=[]"])}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
