"""``unigendet`` command line. Sub-commands are added as the project grows; each is a thin wrapper
over library functions."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from unigendet.demo import DemoSettings, run_demo

    report = run_demo(out_dir=args.out, settings=DemoSettings(steps=args.steps, diga_steps=args.diga_steps,
                                                              seed=args.seed))
    # The demo's point is that the model learned: fail loudly if held-out accuracy is near chance.
    stage1 = report["stage1"]
    return 0 if stage1["accuracy"] > stage1["chance"] + 0.1 else 1


def _train(args: argparse.Namespace) -> int:
    from unigendet.training import run_training

    run_training(args.config, args.overrides)
    return 0


# --------------------------------------------------------------------------------------------------
# Inference: detect / generate


def _emit(text: str) -> None:
    """Command results go to stdout (pipeable); diagnostics go through logging to stderr."""
    sys.stdout.write(text + "\n")


def _model_kwargs(args: argparse.Namespace) -> dict:
    return {"model_dir": args.model, "bagel": args.bagel, "weights": args.weights, "device": args.device,
            "dtype": args.dtype}


def _decoding(args: argparse.Namespace):
    from unigendet.inference.detect import DecodingConfig

    decoding = DecodingConfig.paper() if args.sample else DecodingConfig()
    overrides = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty")
                 if getattr(args, k) is not None}
    return DecodingConfig(**{**decoding.__dict__, **overrides}) if overrides else decoding


def _detector(args: argparse.Namespace):
    from unigendet.inference.loading import build_detector

    return build_detector(**_model_kwargs(args), smsa=args.smsa, posterior=args.posterior,
                          pre_resize_vae=args.pre_resize_vae)


def _detect(args: argparse.Namespace) -> int:
    import json
    import math

    from unigendet.data.sources import BadSample, load_image_file

    images = []
    for path in args.images:
        try:
            images.append(load_image_file(path))
        except BadSample as bad:
            sys.exit(f"cannot read {path}: {bad}")
    detector = _detector(args)
    decoding = _decoding(args)
    results = []
    for start in range(0, len(images), args.batch_size):
        chunk = images[start : start + args.batch_size]
        results += detector.detect(chunk, question=args.question, max_new_tokens=args.max_new_tokens,
                                   decoding=decoding, seed=args.seed)
    records = [
        {"image": path, "label": r.label, "p_fake": None if math.isnan(r.p_fake) else r.p_fake,
         "text_label": r.text_label, "explanation": r.text, "stopped": r.stopped}
        for path, r in zip(args.images, results)
    ]
    if args.json:
        _emit(json.dumps(records, indent=2))
    else:
        for rec in records:
            p = "n/a" if rec["p_fake"] is None else f"{rec['p_fake']:.4f}"
            _emit(f"{rec['image']}\t{rec['label']}\tp_fake={p}\n  {rec['explanation']}")
    return 0


def _eval_fakeclue(args: argparse.Namespace) -> int:
    import json

    from unigendet.evaluation.fakeclue import FakeClueEvalConfig, run_fakeclue_eval
    from unigendet.metrics import jsonable

    cfg = FakeClueEvalConfig(json_path=args.json_path, image_root=args.image_root, out_dir=args.out, name=args.name,
                             label_convention=args.label_convention, limit=args.limit, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, seed=args.seed)
    metrics = run_fakeclue_eval(_detector(args), cfg, model_path=args.model, decoding=_decoding(args))
    _emit(json.dumps(jsonable(metrics), indent=2))
    return 0


def _parse_size(text: str | None, side_limit: int) -> tuple[int, int]:
    """"512" or "768x512" (WIDTHxHEIGHT) -> (height, width); default: min(1024, table limit), square."""
    if text is None:
        side = min(1024, side_limit)
        return side, side
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise SystemExit(f"--size must be N or WIDTHxHEIGHT, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[1], values[0]
    raise SystemExit(f"--size must be N or WIDTHxHEIGHT, got {text!r}")


def _generate(args: argparse.Namespace) -> int:
    import json
    import re
    from pathlib import Path

    from unigendet.inference.loading import build_generator

    generator = build_generator(**_model_kwargs(args))
    cfg = generator.model.config
    height, width = _parse_size(args.size, cfg.latent_downsample * cfg.max_latent_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for start in range(0, len(args.prompts), args.batch_size):
        prompts = args.prompts[start : start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(prompts))]
        images = generator.generate(
            prompts, height=height, width=width, num_steps=args.steps, timestep_shift=args.timestep_shift,
            cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale, cfg_interval=tuple(args.cfg_interval),
            cfg_renorm_type=args.cfg_renorm_type, cfg_renorm_min=args.cfg_renorm_min, seed=seeds,
        )
        for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, images)):
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"
            path = out / f"{start + i:04d}_{slug}.png"
            image.save(path)
            manifest.append({"file": path.name, "prompt": prompt, "seed": seed, "height": height, "width": width})
            _emit(str(path))
    (out / "generations.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in (
        "func", "prompts")}, "images": manifest}, indent=2))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported model directory (or a BAGEL/UniGenDet one with --bagel)")
    p.add_argument("--bagel", action="store_true", help="--model is a BAGEL-7B-MoT / UniGenDet checkpoint directory")
    p.add_argument("--weights", default=None, help="with --bagel: fine-tuned weights overriding the base directory's")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model parameter dtype")


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42,
                   help="combined with each image's pixels: its VAE posterior sample and token sampling")
    p.add_argument("--sample", action="store_true",
                   help="nucleus sampling as in the paper (top-p 0.8, top-k 20, T 0.7, penalty 1.05); default greedy")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--posterior", default="sample", choices=["sample", "mean"], help="VAE latent of the context")
    p.add_argument("--pre-resize-vae", action="store_true", help="reference eval: VAE-resize before both transforms")
    p.add_argument("--smsa", action=argparse.BooleanOptionalAction, default=None,
                   help="VAE context block (default: the run's train_config.yaml, else on)")


def _add_eval_parsers(sub) -> None:
    evaluate = sub.add_parser("eval", help="score a model on a benchmark (JSON + Markdown + plots)")
    benchmarks = evaluate.add_subparsers(dest="benchmark", required=True)
    fakeclue = benchmarks.add_parser("fakeclue", help="FakeClue protocol: Acc, F1, ROUGE-L, CSS, head Acc/F1/AUC")
    _add_model_args(fakeclue)
    _add_detector_args(fakeclue)
    fakeclue.add_argument("--json-path", required=True, help="FakeClue-format JSON list (e.g. test.json)")
    fakeclue.add_argument("--image-root", required=True, help="directory the entries' image paths are relative to")
    fakeclue.add_argument("--label-convention", default="fakeclue", choices=["fakeclue", "real0_fake1"],
                          help="fakeclue: 0 = fake, 1 = real (the dataset's own); real0_fake1 for re-labelled sets")
    fakeclue.add_argument("--limit", type=int, default=None, help="first N entries only")
    fakeclue.add_argument("--out", default="runs/eval", help="report directory")
    fakeclue.add_argument("--name", default="fakeclue", help="report file stem")
    fakeclue.set_defaults(func=_eval_fakeclue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigendet", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the tiny model on CPU on embedded synthetic data (no downloads)")
    demo.add_argument("--steps", type=int, default=500, help="GDUF (stage 1) steps")
    demo.add_argument("--diga-steps", type=int, default=100, help="DIGA steps (and FM-only steps of the control)")
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its data, checkpoints and model")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train from a YAML config (GDUF or DIGA); launch with deepspeed for many GPUs")
    train.add_argument("--config", required=True, help="YAML file under configs/train/ (``_base_`` includes allowed)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 total_steps=500")
    train.set_defaults(func=_train)
    detect = sub.add_parser("detect", help="real/fake verdict (detection head) and explanation for images")
    detect.add_argument("images", nargs="+", help="image files")
    _add_model_args(detect)
    detect.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    detect.add_argument("--question", default=None, help="text after <image> in the human turn (default: the demo's)")
    _add_detector_args(detect)
    detect.set_defaults(func=_detect)
    generate = sub.add_parser("generate", help="text-to-image generation, one PNG per prompt")
    generate.add_argument("prompts", nargs="+")
    _add_model_args(generate)
    generate.add_argument("--out", required=True, help="output directory (PNGs + generations.json)")
    generate.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    generate.add_argument("--steps", type=int, default=50, help="schedule points N (N-1 Euler steps)")
    generate.add_argument("--size", default=None, help="N or WIDTHxHEIGHT in px (multiples of 16); default 1024")
    generate.add_argument("--batch-size", type=int, default=4)
    generate.add_argument("--timestep-shift", type=float, default=3.0)
    generate.add_argument("--cfg-text-scale", type=float, default=4.0)
    generate.add_argument("--cfg-img-scale", type=float, default=1.0)
    generate.add_argument("--cfg-interval", type=float, nargs=2, default=[0.4, 1.0], metavar=("LO", "HI"))
    generate.add_argument("--cfg-renorm-type", default="global", choices=["global", "channel", "text_channel", "none"])
    generate.add_argument("--cfg-renorm-min", type=float, default=0.0)
    generate.set_defaults(func=_generate)
    _add_eval_parsers(sub)
    return parser


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    """Entry for train/gduf.py and train/diga.py: ``unigendet train`` pinned to one stage."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    other = {"gduf": "diga", "diga": "gduf"}[stage]
    if f"stage={other}" in args:
        sys.exit(f"this entry point runs stage {stage}; use train/{other}.py for {other.upper()}")
    return main(["train", *args, f"stage={stage}"])


def main(argv: list[str] | None = None) -> int:
    from unigendet.utils.logging import setup_logging

    # deepspeed's launcher appends --local_rank=N; the rank is read from the environment instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
