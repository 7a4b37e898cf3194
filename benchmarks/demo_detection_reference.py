"""How far can the demo's held-out detection sets be solved? Two single-purpose detectors as references.

The demo's UniGenDet model learns detection beside explanation and generation, from about five detection images per
step. This script trains, on the same detection training images, and scores on the demo's four held-out sets with
the balanced accuracy the demo reports:

* **spectral ridge**: scikit-learn's ridge classifier on the standardised log power spectrum of the gray image,
  pooled over 4x4 frequency cells (a classic frequency-domain detector; deterministic, seconds);
* **CNN**: a plain convolutional classifier (four 3x3 conv layers, global average pooling, a linear layer; random
  initialisation, random horizontal flips) trained for many image views, per seed.

Where such a reference reaches a figure the demo model does not, the model and its budget are the limit, not the
held-out set.

    python benchmarks/demo_detection_reference.py --data runs/demo/data --seeds 0 1 2 --epochs 40

``--data`` is a demo dataset folder (``runs/demo/data`` after ``./run.sh demo``); without it the script writes one
with the demo's default settings to a temporary folder. Prints the spectral ridge's figures, then for the CNN, every
``--every`` epochs, the training accuracy and each held-out set's balanced accuracy, and the mean over seeds at the
last epoch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a demo dataset folder (default: write one to a temporary folder)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="score the held-out sets every this many epochs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def reference_cnn(width: int = 32):
    """Four 3x3 convolutions (the last two with stride 2), ReLU, global average pooling, a linear layer to two
    classes. The first two layers keep full resolution, so pixel-level artefacts reach the features."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 2),
    )


def load_set(json_path: Path, image_root: Path):
    """A FakeClue JSON as a ``[N, 3, H, W]`` tensor in [-1, 1] and labels (1 = fake)."""
    import numpy as np
    import torch

    from unigendet.coevolution.report import load_fakeclue_images

    images, labels = load_fakeclue_images(json_path, image_root)
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2 - 1, torch.tensor(labels)


def spectral_features(x):
    """``[N, 3, H, W]`` in [-1, 1] -> log power spectrum of the mean-removed gray image, averaged over 4x4 frequency
    cells (``[N, (H / 4) * (W / 4)]``)."""
    import numpy as np

    gray = x.mean(1).double().numpy()
    gray = gray - gray.mean(axis=(1, 2), keepdims=True)
    power = np.log(np.abs(np.fft.fft2(gray)) ** 2 + 1e-8)
    n, h, w = power.shape
    return power.reshape(n, h // 4, 4, w // 4, 4).mean(axis=(2, 4)).reshape(n, -1)


def spectral_ridge(train, sets: dict, alpha: float = 10.0) -> dict[str, float]:
    """Balanced accuracy of a ridge classifier on :func:`spectral_features` for each held-out set."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = train
    classifier = make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha)).fit(spectral_features(x), y.numpy())
    return {name: float(balanced_accuracy_score(labels.numpy(), classifier.predict(spectral_features(images))))
            for name, (images, labels) in sets.items()}


def balanced_accuracies(net, sets: dict) -> dict[str, float]:
    import torch

    from unigendet.coevolution.report import detection_figures

    figures = {}
    with torch.no_grad():
        for name, (x, y) in sets.items():
            p_fake = net(x).softmax(-1)[:, 1].tolist()
            figures[name] = detection_figures(p_fake, y.tolist())["balanced_accuracy"]
    return figures


def train_one(seed: int, train, sets: dict, args) -> list[dict]:
    """Train from scratch with ``seed``; returns one record per scored epoch."""
    import torch

    torch.manual_seed(seed)
    x, y = train
    net = reference_cnn()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr)
    records = []
    for epoch in range(1, args.epochs + 1):
        net.train()
        for batch in torch.randperm(len(x)).split(args.batch_size):
            images = x[batch]
            flip = torch.rand(len(batch)) < 0.5  # label-preserving: every demo artefact survives a mirror
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            loss = torch.nn.functional.cross_entropy(net(images), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % args.every == 0 or epoch == args.epochs:
            net.eval()
            with torch.no_grad():
                train_acc = (net(x).argmax(-1) == y).float().mean().item()
            record = {"seed": seed, "epoch": epoch, "image_views": epoch * len(x), "train_accuracy": train_acc,
                      **balanced_accuracies(net, sets)}
            records.append(record)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
    return records


def demo_data(folder: str | None, scratch: Path):
    from unigendet.demo.data import (
        HELDOUT_DOMAINS_JSON,
        HELDOUT_GENERATORS_JSON,
        HELDOUT_JSON,
        HELDOUT_PHOTOS_JSON,
        TRAIN_JSON,
        make_demo_dataset,
    )
    from unigendet.demo.run import DemoSettings

    if folder is None:
        s = DemoSettings()
        make_demo_dataset(scratch, num_train=s.num_train, num_heldout=s.num_heldout, image_size=s.image_size,
                          seed=s.seed, t2i_per_photo=s.t2i_per_photo, artefact_strength=s.artefact_strength,
                          paired_train=s.paired_train, train_generator_instances=s.generator_instances)
        folder = scratch
    root = Path(folder)
    names = {"heldout": HELDOUT_JSON, "heldout_photos": HELDOUT_PHOTOS_JSON,
             "heldout_generators": HELDOUT_GENERATORS_JSON, "heldout_domains": HELDOUT_DOMAINS_JSON}
    missing = [n for n in (TRAIN_JSON, *names.values()) if not (root / n).is_file()]
    if missing:
        raise SystemExit(f"{root} is not a demo dataset folder: missing {', '.join(missing)}")
    return load_set(root / TRAIN_JSON, root), {k: load_set(root / v, root) for k, v in names.items()}


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(caller_threads)


def _run(args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        train, sets = demo_data(args.data, Path(scratch))
    ridge = spectral_ridge(train, sets)
    print("spectral ridge: " + " / ".join(f"{name} {100 * v:.1f}%" for name, v in ridge.items()), flush=True)
    records = [r for seed in args.seeds for r in train_one(seed, train, sets, args)]
    last = [r for r in records if r["epoch"] == args.epochs]
    mean = {name: sum(r[name] for r in last) / len(last) for name in sets}
    print(f"CNN, mean over seeds {args.seeds} at epoch {args.epochs} ({args.epochs * len(train[0])} image views): "
          + " / ".join(f"{name} {100 * v:.1f}%" for name, v in mean.items()), flush=True)
    result = {"spectral_ridge": ridge, "cnn_records": records, "cnn_mean_last_epoch": mean}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
