"""The embedded demo: the paper's whole loop on CPU, on data the project makes itself.

1. Write the demo dataset (real photographs bundled with scikit-image, fakes made by
   generator-like processes, FakeClue-format JSON with templated explanations, captions).
2. Stage 1, GDUF: train the tiny model (detection + explanation + flow matching) through the same
   Trainer and DeepSpeed engine as a cluster run, in one process; score the held-out split with
   the detection head.
3. Stage 2, DIGA: align the generator to a frozen copy of the stage-1 detector; as a control, run
   the same number of steps with the alignment weight at 0 (flow matching only).
4. Evidence: generate images from the stage-1, control and DIGA generators and let the frozen
   stage-1 detector score them (mean p(fake)). Whatever the figures, they are printed as measured.
5. Score the held-out split with the final model under the FakeClue protocol (explanations
   generated, parsed and compared with the references; head Acc/AUC), writing JSON/Markdown/ROC.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from unigendet.demo.baselines import BASELINES, OPTIONAL_BASELINES, detector_row, format_table, run_baselines
from unigendet.demo.data import make_demo_dataset
from unigendet.recipes import recipe_path

logger = logging.getLogger(__name__)

RECIPE = recipe_path("train/gduf_demo.yaml")
DIGA_RECIPE = recipe_path("train/diga_demo.yaml")


@dataclass
class DemoSettings:
    """Sizes of a demo run (the defaults are what ``./run.sh demo`` runs)."""

    steps: int = 500  # GDUF steps
    diga_steps: int = 100  # DIGA steps, and flow-matching-only steps of the control
    seed: int = 0
    num_train: int = 320
    num_heldout: int = 128
    image_size: int = 64
    samples_per_caption: int = 2  # generated images per demo caption (13 captions)
    sampling_steps: int = 30  # schedule points of the Euler sampler
    explain_tokens: int = 48  # answer tokens generated per held-out image in the FakeClue scoring
    # Baseline detectors trained on the same training images and compared on the same held-out images ([] = none);
    # CRAFT is opt-in (``demo.baselines=[ltd,corit,spectral,craft]``), the default list keeps the demo fast.
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    baseline_steps: int = 8  # training steps per baseline; all three train and score in ~5 s within the demo

    def __post_init__(self) -> None:
        for name in ("steps", "diga_steps", "num_train", "num_heldout", "samples_per_caption", "explain_tokens",
                     "baseline_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be >= 1, got {getattr(self, name)}")
        if self.sampling_steps < 2:
            raise ValueError(f"demo sampling_steps must be >= 2, got {self.sampling_steps}")
        known = [*BASELINES, *OPTIONAL_BASELINES]
        unknown = sorted(set(self.baselines) - set(known))
        if unknown:
            raise ValueError(f"demo baselines: unknown detector(s) {unknown}; known: {known}")


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


def stage2_overrides(data, run_dir: Path, init_dir: Path, steps: int, seed: int) -> list[str]:
    """DIGA recipe overrides: start from the stage-1 export, T2I data only."""
    return [
        f"init.path={init_dir}",
        f"data.sources.t2i.data_files=[{data.t2i_parquet}]",
        f"checkpoint.dir={run_dir}",
        "checkpoint.resume=none",
        f"total_steps={steps}",
        f"seed={seed}",
    ]


def _train(recipe: Path, overrides: list[str]):
    """Train one recipe from scratch; returns the TrainState (its ``history`` holds the logged losses)."""
    from unigendet.training.config import load_train_config
    from unigendet.training.trainer import Trainer

    cfg = load_train_config(str(recipe), overrides)
    shutil.rmtree(cfg.checkpoint.dir, ignore_errors=True)  # a demo run always starts fresh
    return cfg, Trainer(cfg).train()


def heldout_accuracy(model_dir: Path, data, cfg, seed: int = 0) -> dict[str, float]:
    from unigendet.checkpoint.export import load_model_directory
    from unigendet.data.encoding import SampleEncoder
    from unigendet.data.fakeclue import FakeClueSource
    from unigendet.data.packing import PackBuilder
    from unigendet.data.tokenizer import special_token_ids
    from unigendet.inference.scoring import head_fake_probabilities
    from unigendet.models.config import pack_geometry

    model, vae, tokenizer = load_model_directory(model_dir)
    geometry = pack_geometry(model.config)
    encoder = SampleEncoder(tokenizer, geometry, cfg.data.vit_transform.build(), cfg.data.vae_transform.build(),
                            smsa=cfg.data.smsa)
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
        "p_fake": [float(p) for p in p_fake],
        "labels": [int(y) for y in labels],
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def score_generated(generator_dirs: dict[str, Path], detector_dir: Path, out_dir: Path, settings: DemoSettings,
                    ) -> dict[str, dict[str, float]]:
    """Generate the demo captions with each generator and score the images with the frozen stage-1
    detector's head; saves a sample grid per generator. Returns ``{name: {mean_p_fake, frac_fake, n}}``."""
    from unigendet.demo.data import demo_captions
    from unigendet.inference.loading import build_detector, build_generator
    from unigendet.utils.images import image_grid

    captions = demo_captions()
    prompts = [c for c in captions for _ in range(settings.samples_per_caption)]
    seeds = [settings.seed + i for i in range(len(prompts))]
    detector = build_detector(detector_dir, device="cpu")
    results = {}
    for name, directory in generator_dirs.items():
        generator = build_generator(directory, device="cpu")
        images = generator.generate(prompts, height=settings.image_size, width=settings.image_size,
                                    num_steps=settings.sampling_steps, seed=seeds)
        grid = image_grid(images[:: settings.samples_per_caption], columns=len(captions))
        grid.save(out_dir / f"generated_{name}.png")
        scores = [r.p_fake for r in detector.detect(images, max_new_tokens=0, seed=settings.seed)]
        results[name] = {"mean_p_fake": _mean(scores), "frac_fake": _mean(p >= 0.5 for p in scores), "n": len(scores),
                         "p_fake": scores}
    return results


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``a[i] - b[i]`` (same prompt and seed in both generators)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = _mean(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
    return mean, (var / len(diffs)) ** 0.5


def _loss_span(state, key: str = "loss") -> tuple[float, float]:
    logged = [h[key] for h in state.history if key in h]
    return logged[0], logged[-1]


def run_demo(out_dir: str | Path = "runs/demo", settings: DemoSettings | None = None,
             overrides: list[str] | None = None, diga_overrides: list[str] | None = None) -> dict:
    """Run the whole demo; returns the figures it prints."""
    from unigendet.evaluation.fakeclue import FakeClueEvalConfig, run_fakeclue_eval
    from unigendet.inference.loading import build_detector

    s = settings or DemoSettings()
    out = Path(out_dir)
    # 64 px images with the demo geometry (8-px ViT patches, 16-px latent tokens): neither transform
    # resamples them, so pixel-level generator artefacts reach both encoders intact.
    data = make_demo_dataset(out / "data", num_train=s.num_train, num_heldout=s.num_heldout,
                             image_size=s.image_size, seed=s.seed)
    logger.info("demo data: %s", data.counts)

    gduf_dir = out / "gduf"
    start = time.perf_counter()
    cfg, gduf = _train(RECIPE, demo_overrides(data, gduf_dir, s.steps, s.seed) + list(overrides or []))
    gduf_seconds = time.perf_counter() - start
    report = {"stage1": heldout_accuracy(gduf_dir / "final", data, cfg, s.seed)}
    report["stage1"].update(steps=s.steps, loss=_loss_span(gduf))
    report["detectors"] = compare_detectors(data, out, s, report["stage1"], gduf_seconds)

    stage2 = {}
    for name, extra in (("diga", []), ("fm_only", ["diga.align_weight=0"])):
        run_dir = out / name
        _, state = _train(DIGA_RECIPE, stage2_overrides(data, run_dir, gduf_dir / "final", s.diga_steps, s.seed)
                          + list(diga_overrides or []) + extra)
        stage2[name] = {"dir": run_dir / "final", "mse": _loss_span(state, "mse"), "align": _loss_span(state, "align")}
    report["stage2"] = {k: {"mse": v["mse"], "align": v["align"]} for k, v in stage2.items()}

    generators = {"stage1": gduf_dir / "final", "fm_only": stage2["fm_only"]["dir"], "diga": stage2["diga"]["dir"]}
    report["generated"] = score_generated(generators, gduf_dir / "final", out, s)
    report["diga_minus_fm_only"] = paired_difference(report["generated"]["diga"]["p_fake"],
                                                     report["generated"]["fm_only"]["p_fake"])

    eval_cfg = FakeClueEvalConfig(json_path=str(data.heldout_json), image_root=str(data.image_root),
                                  out_dir=str(out / "eval"), name="fakeclue_heldout", batch_size=32,
                                  max_new_tokens=s.explain_tokens, seed=s.seed)
    final = stage2["diga"]["dir"]
    report["fakeclue"] = run_fakeclue_eval(build_detector(final, device="cpu"), eval_cfg, model_path=str(final))
    logger.info("\n%s", format_report(report, s, out))
    return report


def compare_detectors(data, out: Path, s: DemoSettings, stage1: dict, gduf_seconds: float) -> dict[str, dict]:
    """The comparison table: UniGenDet's stage-1 head and each baseline on the same held-out images."""
    rows = {"unigendet": detector_row(stage1["p_fake"], stage1["labels"], gduf_seconds)}
    if s.baselines:
        baselines = run_baselines(data, out, s.baselines, s.baseline_steps, s.seed, _train)
        rows.update(baselines)
    return rows


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def format_report(report: dict, s: DemoSettings, out: Path) -> str:
    st1, gen, text, head = report["stage1"], report["generated"], report["fakeclue"]["text"], report["fakeclue"]["head"]
    diga, fm = report["stage2"]["diga"], report["stage2"]["fm_only"]
    return "\n".join([
        "UniGenDet demo (tiny model, CPU): GDUF -> DIGA -> generate -> score",
        f"  stage 1 GDUF        loss {st1['loss'][0]:.3f} -> {st1['loss'][1]:.3f} over {s.steps} steps",
        f"  held-out detection  {_pct(st1['accuracy'])} head accuracy on {st1['heldout_images']} unseen images "
        f"(chance {_pct(st1['chance'])}; fake recall {_pct(st1['fake_recall'])}, real {_pct(st1['real_recall'])})",
        f"  stage 2 DIGA        align {diga['align'][0]:.3f} -> {diga['align'][1]:.3f}, "
        f"flow matching {diga['mse'][0]:.3f} -> {diga['mse'][1]:.3f} over {s.diga_steps} steps",
        f"  control (FM only)   align {fm['align'][0]:.3f} -> {fm['align'][1]:.3f} (not optimised), "
        f"flow matching {fm['mse'][0]:.3f} -> {fm['mse'][1]:.3f}",
        f"  generated images scored by the frozen stage-1 detector ({gen['diga']['n']} per generator):",
        *(f"    {label:<22} mean p(fake) {gen[key]['mean_p_fake']:.4f}   called fake {_pct(gen[key]['frac_fake'])}"
          for key, label in (("stage1", "stage-1 generator"), ("fm_only", f"+{s.diga_steps} FM-only steps"),
                             ("diga", f"+{s.diga_steps} DIGA steps"))),
        "    DIGA - FM-only, same prompts and seeds: p(fake) {:+.4f} +- {:.4f} (mean +- s.e.; lower = more real)"
        .format(*report["diga_minus_fm_only"]),
        f"  FakeClue protocol, final model, held-out split ({head['n']} images, {s.explain_tokens} answer tokens):",
        f"    text Acc {_pct(text['acc'])}  F1 {_pct(text['f1_macro'])}  ROUGE-L {_pct(text['rouge_l'])}  "
        f"CSS {_pct(text['css'])}  ({text['n_unparsed']} unparsed)",
        f"    head Acc {_pct(head['acc'])}  F1 {_pct(head['f1_macro'])}  AUC {_pct(head['auc'])}",
        f"  detectors on the held-out split ({st1['heldout_images']} images; unigendet = stage-1 head, train s = "
        f"GDUF; baselines: {s.baseline_steps} steps on tiny random frozen backbones):",
        *format_table(report["detectors"]),
        f"  outputs             {out} (models: gduf/final, diga/final, baselines/<name>/final; eval/; "
        "generated_*.png)",
    ])
