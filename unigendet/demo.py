"""The embedded demo: GDUF on CPU on data the project makes itself, then held-out detection accuracy.

1. Write the demo dataset (real photographs bundled with scikit-image, fakes made by
   generator-like processes, FakeClue-format JSON with templated explanations, captions).
2. Train the tiny model with GDUF (detection + explanation + flow matching) through the same
   Trainer and DeepSpeed engine as a cluster run, in one process.
3. Reload the exported model directory (no training code) and score the held-out split with the
   detection head.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from unigendet.data.demo_data import make_demo_dataset

logger = logging.getLogger(__name__)

# The demo runs from a source checkout (``./run.sh demo``); its recipes live in configs/.
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "train" / "gduf_demo.yaml"


def demo_overrides(data, run_dir: Path, steps: int, seed: int) -> list[str]:
    return [
        f"data.sources.fakeclue.json_path={data.train_json}",
        f"data.sources.fakeclue.image_root={data.image_root}",
        f"data.sources.t2i.data_files=[{data.t2i_parquet}]",
        f"checkpoint.dir={run_dir}",
        "checkpoint.resume=none",
        f"total_steps={steps}",
        f"seed={seed}",
    ]


def heldout_accuracy(model_dir: Path, data, cfg, seed: int = 0) -> dict[str, float]:
    from unigendet.checkpoint.export import load_model_directory
    from unigendet.data.packing import PackBuilder
    from unigendet.data.sources import FakeClueSource, SampleEncoder
    from unigendet.data.synthetic import pack_geometry
    from unigendet.data.tokenizer import special_token_ids
    from unigendet.data.transforms import ImageTransform
    from unigendet.inference.scoring import head_fake_probabilities

    model, vae, tokenizer = load_model_directory(model_dir)
    geometry = pack_geometry(model.config)
    t, v = cfg.data.vit_transform, cfg.data.vae_transform
    encoder = SampleEncoder(tokenizer, geometry, ImageTransform(t.max_size, t.min_size, t.stride, t.max_pixels),
                            ImageTransform(v.max_size, v.min_size, v.stride, v.max_pixels), smsa=cfg.data.smsa)
    source = FakeClueSource(data.heldout_json, data.image_root, encoder, split="all", name="heldout")
    samples = [source.load(i) for i in range(len(source))]
    builder = PackBuilder(special_token_ids(tokenizer), geometry)
    p_fake, labels = head_fake_probabilities(model, vae, samples, builder, seed=seed)
    # Ties go to "fake", as the official head's argmax over (fake, real) logits does.
    predictions = (p_fake >= 0.5).long()
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    return {
        "heldout_images": len(samples),
        "accuracy": (predictions == labels).float().mean().item(),
        "fake_recall": (predictions[labels == 1] == 1).float().mean().item(),
        "real_recall": (predictions[labels == 0] == 0).float().mean().item(),
        "chance": majority,
    }


def run_demo(out_dir: str | Path = "runs/demo", steps: int = 500, seed: int = 0,
             num_train: int = 320, num_heldout: int = 128, image_size: int = 64,
             overrides: list[str] | None = None) -> dict[str, float]:
    from unigendet.training.config import load_train_config
    from unigendet.training.trainer import Trainer

    out = Path(out_dir)
    # 64 px images with the demo geometry (8-px ViT patches, 16-px latent tokens): neither transform
    # resamples them, so pixel-level generator artefacts reach both encoders intact.
    data = make_demo_dataset(out / "data", num_train=num_train, num_heldout=num_heldout, image_size=image_size, seed=seed)
    logger.info("demo data: %s", data.counts)
    run_dir = out / "gduf"
    shutil.rmtree(run_dir, ignore_errors=True)  # a demo run always starts fresh
    cfg = load_train_config(str(RECIPE), demo_overrides(data, run_dir, steps, seed) + list(overrides or []))
    state = Trainer(cfg).train()
    first, last = state.history[0], state.history[-1]
    report = heldout_accuracy(run_dir / "final", data, cfg, seed)
    report.update(steps=steps, loss_first=first["loss"], loss_last=last["loss"])
    lines = [
        "UniGenDet demo (tiny model, CPU, GDUF)",
        f"  training loss      {first['loss']:.3f} -> {last['loss']:.3f} over {steps} steps",
        f"  held-out images    {report['heldout_images']} (never seen in training)",
        f"  detection accuracy {100 * report['accuracy']:.1f}%  (chance {100 * report['chance']:.1f}%)",
        f"  fake recall        {100 * report['fake_recall']:.1f}%   real recall {100 * report['real_recall']:.1f}%",
        f"  model directory    {run_dir / 'final'}",
    ]
    logger.info("\n%s", "\n".join(lines))
    return report
