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
    from unigendet.evaluation.fakeclue import run_fakeclue_eval

    metrics = run_fakeclue_eval(_eval_detector(args), _fakeclue_config(args, args.name), model_path=args.model,
                                decoding=_decoding(args))
    return _emit_metrics(metrics)


# Detection benchmarks (DMimage, ARForensics), robustness and report merging. Every scoring job is sharded
# (--shard I/N, or RANK/WORLD_SIZE) and resumable; the process that completes the last shard writes the report.


def _eval_detector(args: argparse.Namespace):
    """The model's detector, or None with --gather-only (gathering reads the shards, not the model)."""
    return None if args.gather_only else _detector(args)


def _emit_metrics(metrics) -> int:
    import json

    from unigendet.metrics import jsonable

    if metrics is not None:  # None: this shard is done, others are not (the job logged which)
        _emit(json.dumps(jsonable(metrics), indent=2))
    return 0


def _harness_kwargs(args: argparse.Namespace) -> dict:
    return {"setting": getattr(args, "setting", "none"), "perturb_seed": args.perturb_seed, "shard": args.shard,
            "overwrite": args.overwrite, "gather_only": args.gather_only}


def _fakeclue_config(args: argparse.Namespace, name: str):
    from unigendet.evaluation.fakeclue import FakeClueEvalConfig

    if not (args.json_path and args.image_root):
        sys.exit("FakeClue needs --json-path and --image-root")
    return FakeClueEvalConfig(json_path=args.json_path, image_root=args.image_root, out_dir=args.out, name=name,
                              label_convention=args.label_convention, limit=args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, **_harness_kwargs(args))


def _detection_config(args: argparse.Namespace, benchmark: str, name: str | None):
    from unigendet.evaluation.jobs import DetectionEvalConfig

    if not args.root:
        sys.exit(f"{benchmark} needs --root")
    return DetectionEvalConfig(benchmark=benchmark, root=args.root, out_dir=args.out, name=name,
                               generators=getattr(args, "generators", None), limit_per_group=args.limit_per_group,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                               question=args.question, **_harness_kwargs(args))


def _eval_folder_benchmark(args: argparse.Namespace) -> int:
    from unigendet.evaluation.jobs import run_detection_eval

    cfg = _detection_config(args, args.benchmark, args.name)
    return _emit_metrics(run_detection_eval(_eval_detector(args), cfg, model_path=args.model,
                                            decoding=_decoding(args)))


def _eval_robustness(args: argparse.Namespace) -> int:
    from unigendet.evaluation.jobs import RobustnessConfig, run_robustness_eval

    if args.on == "fakeclue":
        base = _fakeclue_config(args, args.on)
    else:
        base = _detection_config(args, args.on, None)
    cfg = RobustnessConfig(base=base, settings=args.settings, name=args.name)
    return _emit_metrics(run_robustness_eval(_eval_detector(args), cfg, model_path=args.model,
                                             decoding=_decoding(args)))


def _eval_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from unigendet.metrics import merge_reports

    table = merge_reports(args.reports, columns=args.columns)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
    _emit(table.rstrip("\n"))
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


def _add_harness_args(p: argparse.ArgumentParser, setting: bool = True) -> None:
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="score shard I of N (default: RANK/WORLD_SIZE from the launcher, else everything)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard shard outputs written with different settings instead of stopping")
    p.add_argument("--gather-only", action="store_true",
                   help="score nothing: write the report from the complete shards (the model is not loaded)")
    p.add_argument("--perturb-seed", type=int, default=0, help="base seed of the random-crop positions")
    if setting:
        p.add_argument("--setting", default="none",
                       help="perturbation before preprocessing: none, jpeg<Q> (e.g. jpeg70), crop<R> (e.g. crop0.7)")


def _add_folder_data_args(p: argparse.ArgumentParser, arforensics: bool) -> None:
    p.add_argument("--root", default=None, help="DMimage test directory (one folder per source, folders named "
                   "*real* are real) or ARForensics root (or its test/ directory)")
    if arforensics:
        p.add_argument("--generators", nargs="+", default=None, help="only these generator folders (default: all)")
    p.add_argument("--limit-per-group", type=int, default=None, help="first N images per folder")
    p.add_argument("--question", default=None, help="question asked about every image (default: the model's)")


def _add_detection_eval_parsers(benchmarks) -> None:
    for name, arforensics, text in (
        ("dmimage", False, "DMimage: Real/Fake/Overall Acc + F1, per generator (head and parsed text)"),
        ("arforensics", True, "ARForensics: accuracy per AR generator and mean (head and parsed text)"),
    ):
        p = benchmarks.add_parser(name, help=text)
        _add_model_args(p)
        _add_detector_args(p)
        _add_folder_data_args(p, arforensics)
        _add_harness_args(p)
        p.add_argument("--out", default="runs/eval", help="report directory")
        p.add_argument("--name", default=None, help=f"report file stem (default {name})")
        p.set_defaults(func=_eval_folder_benchmark)

    from unigendet.evaluation.robustness import PAPER_SETTINGS

    robust = benchmarks.add_parser("robustness", help="metrics per JPEG / crop setting in one table, with curves")
    _add_model_args(robust)
    _add_detector_args(robust)
    robust.add_argument("--benchmark", dest="on", default="fakeclue", choices=["fakeclue", "dmimage", "arforensics"])
    robust.add_argument("--settings", nargs="+", default=list(PAPER_SETTINGS), help="e.g. none jpeg90 crop0.5")
    robust.add_argument("--json-path", default=None, help="FakeClue: JSON list")
    robust.add_argument("--image-root", default=None, help="FakeClue: image root")
    robust.add_argument("--label-convention", default="fakeclue", choices=["fakeclue", "real0_fake1"])
    robust.add_argument("--limit", type=int, default=None, help="FakeClue: first N entries only")
    _add_folder_data_args(robust, arforensics=True)
    _add_harness_args(robust, setting=False)
    robust.add_argument("--out", default="runs/eval", help="report directory")
    robust.add_argument("--name", default=None, help="report file stem (default robustness_<benchmark>)")
    robust.set_defaults(func=_eval_robustness)

    merge = benchmarks.add_parser("merge", help="one Markdown table from several JSON reports")
    merge.add_argument("reports", nargs="+", help="report JSON files")
    merge.add_argument("--out", default=None, help="also write the table to this file")
    merge.add_argument("--columns", nargs="+", default=None,
                       help="dotted metric keys (default: each report's headline)")
    merge.set_defaults(func=_eval_merge)


# Generation benchmarks (FID on held-out prompts, GenEval, diversity). Generation is sharded (--shard I/N, or
# RANK/WORLD_SIZE) and resumable; scoring runs in one process once every shard has finished.


def _generation_settings(args: argparse.Namespace):
    from unigendet.evaluation.generation import GenerationSettings

    height, width = _parse_size(args.size, 1024)
    return GenerationSettings(
        height=height, width=width, num_steps=args.steps, timestep_shift=args.timestep_shift,
        cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale, cfg_interval=tuple(args.cfg_interval),
        cfg_renorm_type=args.cfg_renorm_type, cfg_renorm_min=args.cfg_renorm_min, seed=args.seed,
        batch_size=args.batch_size, crop_black_borders=not args.keep_borders)


def _generation_shard(args: argparse.Namespace, single_process: bool):
    from unigendet.evaluation.harness import resolve_shard

    try:
        shard = resolve_shard(args.shard)
    except ValueError as err:
        sys.exit(str(err))
    if single_process and shard.count > 1:
        sys.exit("--stage all runs in one process; with several shards run --stage generate on each, then score")
    return shard


def _prompt_selection(args: argparse.Namespace):
    from unigendet.evaluation.generation import PromptSelection, PromptTable

    if not args.data_files:
        sys.exit("choosing prompts needs --data-files (e.g. LAION final_metadata.json)")
    table = PromptTable(args.data_files, image_column=args.image_column, caption_column=args.caption_column,
                        key_column=args.key_column, data_format=args.data_format, image_root=args.image_root,
                        cache_dir=args.cache_dir)
    return PromptSelection(table, rule=args.selection.replace("-", "_"), heldout_fraction=args.heldout_fraction,
                           heldout_salt=args.heldout_salt, slice_start=args.slice[0], slice_stop=args.slice[1],
                           limit=args.limit)


def _generator(args: argparse.Namespace):
    from unigendet.inference.loading import build_generator

    return build_generator(**_model_kwargs(args))


def _eval_fid(args: argparse.Namespace) -> int:
    import json

    from unigendet.evaluation.generation import FIDConfig, run_fid, run_fid_generation
    from unigendet.metrics.fid import require_inception_weights

    scoring = args.stage in ("score", "all")
    if scoring:
        require_inception_weights(args.inception_weights)  # fail before hours of generation, not after
    if args.stage in ("generate", "all"):
        shard = _generation_shard(args, single_process=args.stage == "all")
        counts = run_fid_generation(_generator(args), _prompt_selection(args), args.gen_dir,
                                    _generation_settings(args), shard, model_path=args.model)
        _emit(json.dumps(counts))
    if not scoring:
        return 0
    cfg = FIDConfig(gen_dir=args.gen_dir, inception_weights=args.inception_weights, out_dir=args.out, name=args.name,
                    real_root=args.real_root, batch_size=args.fid_batch_size, dims=args.dims, device=args.device)
    return _emit_metrics(run_fid(cfg, model_path=args.model))


def _eval_geneval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from unigendet.evaluation import geneval

    if args.stage == "generate":
        if not (args.metadata_file and args.prompt_set):
            sys.exit("--stage generate needs --metadata-file and --prompt-set short|long")
        counts = geneval.run_geneval_generation(
            _generator(args), args.metadata_file, args.prompt_set, args.gen_dir, _generation_settings(args),
            samples=args.samples, shard=_generation_shard(args, single_process=False), model_path=args.model)
        _emit(json.dumps(counts))
        return 0
    out = args.out or args.gen_dir
    if args.stage == "score":
        from unigendet.inference.loading import resolve_device

        device = resolve_device(args.device)
        detector = geneval.TransformersMask2FormerDetector(args.detector_dir, device)
        colour = geneval.ClipColorClassifier.from_pretrained(args.clip_dir, device)
        results = args.results or str(Path(out) / f"{args.name}_results.jsonl")
        rules = geneval.RuleConfig()
        rows = geneval.score_folder(args.gen_dir, detector, colour, results, rules, scorer=geneval.APPROXIMATE_SCORER)
        backend = {"detector_dir": args.detector_dir, "clip_dir": args.clip_dir}
        cfg = geneval.GenEvalReportConfig(out, args.name, backend="transformers", results_file=results,
                                          gen_dir=args.gen_dir, rules=rules, backend_details=backend)
    else:
        if not args.results:
            sys.exit("--stage summarise needs --results (a GenEval results.jsonl)")
        rows = geneval.read_results(args.results)
        cfg = geneval.GenEvalReportConfig(out, args.name, backend=geneval.results_backend(rows),
                                          results_file=args.results, gen_dir=args.gen_dir)
    return _emit_metrics(geneval.write_geneval_report(rows, cfg, model_path=args.model))


def _eval_diversity(args: argparse.Namespace) -> int:
    import json

    from unigendet.evaluation.diversity import (
        DiversityConfig,
        run_diversity,
        run_diversity_generation,
    )

    if args.stage in ("generate", "all"):
        shard = _generation_shard(args, single_process=args.stage == "all")
        counts = run_diversity_generation(_generator(args), _prompt_selection(args), args.gen_dir, args.samples,
                                          _generation_settings(args), shard, model_path=args.model)
        _emit(json.dumps(counts))
    if args.stage == "generate":
        return 0
    cfg = DiversityConfig(gen_dir=args.gen_dir, out_dir=args.out, name=args.name, lpips_alexnet=args.lpips_alexnet,
                          lpips_lin=args.lpips_lin, clip_dir=args.clip_dir, lpips_size=args.lpips_size,
                          device=args.device)
    return _emit_metrics(run_diversity(cfg, model_path=args.model))


def _add_sampler_args(p: argparse.ArgumentParser, cfg_interval: tuple[float, float]) -> None:
    """Euler sampler and guidance settings (BAGEL's defaults except the CFG interval, which differs
    between ``gen_image`` (0.4, 1) and the FID / GenEval scripts (0, 1))."""
    p.add_argument("--size", default=None, help="N or WIDTHxHEIGHT in px (multiples of 16); default 1024")
    p.add_argument("--steps", type=int, default=50, help="schedule points N (N-1 Euler steps)")
    p.add_argument("--timestep-shift", type=float, default=3.0)
    p.add_argument("--cfg-text-scale", type=float, default=4.0)
    p.add_argument("--cfg-img-scale", type=float, default=1.0)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=list(cfg_interval), metavar=("LO", "HI"))
    p.add_argument("--cfg-renorm-type", default="global", choices=["global", "channel", "text_channel", "none"])
    p.add_argument("--cfg-renorm-min", type=float, default=0.0)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampler settings; defaults are the official FID / GenEval generation scripts'."""
    _add_sampler_args(p, cfg_interval=(0.0, 1.0))
    p.add_argument("--seed", type=int, default=42, help="base seed (see each benchmark's per-image seed rule)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (results do not depend on it)")
    p.add_argument("--keep-borders", action="store_true", help="do not crop black borders (Image.getbbox)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="generate shard I of N (default: RANK/WORLD_SIZE from the launcher, else everything)")
    p.add_argument("--gen-dir", required=True, help="folder of generated images (resumed if it exists)")


def _add_prompt_table_args(p: argparse.ArgumentParser, default_limit: int) -> None:
    p.add_argument("--data-files", nargs="+", default=None,
                   help="the training recipe's T2I table(s): LAION final_metadata.json, parquet shards, ...")
    p.add_argument("--image-column", default="image_path")
    p.add_argument("--caption-column", default="prompt")
    p.add_argument("--key-column", default=None, help="as in the training recipe (default keys: <file>:<row>)")
    p.add_argument("--data-format", default=None, help="json, parquet, ... (default: from the suffix)")
    p.add_argument("--image-root", default=None, help="relative image paths resolve here (default: the file's dir)")
    p.add_argument("--cache-dir", default=None, help="datasets' Arrow cache")
    p.add_argument("--selection", default="heldout", choices=["heldout", "official-slice"],
                   help="heldout: the training loader's held-out rows; official-slice: rows [START:STOP] (--slice)")
    p.add_argument("--heldout-fraction", type=float, default=0.06, help="must equal the training recipe's")
    p.add_argument("--heldout-salt", default="unigendet", help="must equal the training recipe's")
    p.add_argument("--slice", type=int, nargs=2, default=[10000, 15000], metavar=("START", "STOP"))
    p.add_argument("--limit", type=int, default=default_limit, help="first N selected prompts")


def _add_generation_eval_parsers(benchmarks) -> None:
    fid = benchmarks.add_parser("fid", help="FID on held-out prompts vs their real images (pytorch-fid Inception)")
    _add_model_args(fid)
    fid.add_argument("--stage", default="all", choices=["generate", "score", "all"])
    _add_prompt_table_args(fid, default_limit=5000)
    _add_sampling_args(fid)
    fid.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth (needed to score)")
    fid.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048], help="feature block (pool3: 2048)")
    fid.add_argument("--fid-batch-size", type=int, default=50)
    fid.add_argument("--real-root", default=None,
                     help="folders made by the official script (no selection.json): real images' root")
    fid.add_argument("--out", default=None, help="report directory (default: --gen-dir)")
    fid.add_argument("--name", default="fid", help="report file stem")
    fid.set_defaults(func=_eval_fid)

    gen = benchmarks.add_parser("geneval", help="GenEval: generate 4 images per prompt, score, summarise")
    _add_model_args(gen)
    gen.add_argument("--stage", required=True, choices=["generate", "score", "summarise"],
                     help="score: approximate transformers backend; summarise: an (official) results.jsonl")
    gen.add_argument("--metadata-file", default=None,
                     help="evaluation_metadata.jsonl (short) or evaluation_metadata_long.jsonl (long)")
    gen.add_argument("--prompt-set", default=None, choices=["short", "long"], help="which of the two files it is")
    gen.add_argument("--samples", type=int, default=4, help="images per prompt")
    _add_sampling_args(gen)
    gen.add_argument("--detector-dir", default=None, help="score: local transformers Mask2Former COCO-instance dir")
    gen.add_argument("--clip-dir", default=None, help="score: local transformers CLIP ViT-L/14 dir")
    gen.add_argument("--results", default=None, help="results.jsonl to summarise (score: where to write it)")
    gen.add_argument("--out", default=None, help="report directory (default: --gen-dir)")
    gen.add_argument("--name", default="geneval", help="report file stem")
    gen.set_defaults(func=_eval_geneval)

    div = benchmarks.add_parser("diversity", help="intra-prompt LPIPS and CLIP similarity over K samples per prompt")
    _add_model_args(div)
    div.add_argument("--stage", default="all", choices=["generate", "score", "all"])
    _add_prompt_table_args(div, default_limit=500)
    div.add_argument("--samples", type=int, default=16, help="samples per prompt (sample k uses seed + k)")
    _add_sampling_args(div)
    div.add_argument("--lpips-alexnet", default=None, help="torchvision alexnet-owt-7be5be79.pth")
    div.add_argument("--lpips-lin", default=None, help="lpips weights/v0.1/alex.pth")
    div.add_argument("--clip-dir", default=None, help="local transformers CLIP directory")
    div.add_argument("--lpips-size", type=int, default=256)
    div.add_argument("--out", default=None, help="report directory (default: --gen-dir)")
    div.add_argument("--name", default="diversity", help="report file stem")
    div.set_defaults(func=_eval_diversity)


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
    _add_harness_args(fakeclue)
    fakeclue.set_defaults(func=_eval_fakeclue)
    _add_detection_eval_parsers(benchmarks)
    _add_generation_eval_parsers(benchmarks)


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
    generate.add_argument("--batch-size", type=int, default=4)
    _add_sampler_args(generate, cfg_interval=(0.4, 1.0))
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
