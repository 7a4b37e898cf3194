"""``unigendet`` command line: a table of commands, each one config dataclass and one run function.

``unigendet <command> [--config FILE] [flags] [key=value ...]``: settings from FILE (YAML), then the short flags
(aliases of config keys: ``--model`` is ``model.path``), then dotted ``key=value`` overrides, validated as one
config. ``--print-config`` prints it with every default; ``--dry-run`` validates it and checks the inputs.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass, field, fields
from typing import Any

from unigendet.config.command_line import (
    SETTINGS_HELP,
    Command,
    Flag,
    opt,
    parse_command_line,
    prepare,
    resolve,
    switch,
)
from unigendet.config.loader import ConfigError
from unigendet.demo.run import DemoSettings
from unigendet.utils.errors import RunError


class CommandFailed(RunError):
    """The command ran but its outcome is a failure (exit status 1)."""


def _size(text: str, height_key: str, width_key: str) -> dict[str, int]:
    """``--size N`` (square) or ``WIDTHxHEIGHT``."""
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise ConfigError(f"--size must be N or WIDTHxHEIGHT, got {text!r}")
    return {width_key: values[0], height_key: values[-1]}


def _paper_decoding(_: None) -> dict[str, Any]:
    from unigendet.inference.detect import DecodingConfig

    return {f"decoding.{f.name}": getattr(DecodingConfig.paper(), f.name) for f in fields(DecodingConfig)}


def named(at: str, *names: str) -> tuple[Flag, ...]:
    """One flag per key, named after it: ``--max-new-tokens`` sets ``<at>.max_new_tokens``."""
    return tuple(opt(f"--{name.replace('_', '-')}", f"{at}.{name}" if at else name) for name in names)


def model_flags(*device_keys: str) -> tuple[Flag, ...]:
    return (opt("--model", "model.path", help="model directory (ours, or BAGEL/UniGenDet with --bagel)"),
            switch("--bagel", "model.bagel", help="--model is a BAGEL-7B-MoT / UniGenDet directory"),
            opt("--weights", "model.weights", help="with --bagel: fine-tuned weights over the directory's"),
            opt("--device", "model.device", *device_keys), opt("--dtype", "model.dtype", help="fp32, bf16, fp16 or auto"),
            opt("--quantize", "model.quantize", help="8bit or 4bit decoder weights (bitsandbytes, CUDA only)"),
            opt("--device-map", "model.device_map", help="split the model over devices: auto (every visible GPU, "
                "balanced by bytes) or layer ranges such as 0:0-13,1:14-27"),
            opt("--max-memory", "model.max_memory", help="with --device-map auto: weight bytes per device, "
                "e.g. 0:20GiB,1:40GiB"))


def detector_choice_flags(at: str = "model") -> tuple[Flag, ...]:
    return (opt("--detector", f"{at}.detector", help="unigendet, or a baseline saved in --model (ltd, corit, spectral, "
                "...): p(fake) only, or cascade (a directory written by 'unigendet cascade')"),
            opt("--backbone", f"{at}.backbone_path", help="a baseline saved without its frozen backbone: its directory"))


def detector_flags(job: str) -> tuple[Flag, ...]:
    return (*named(job, "max_new_tokens", "batch_size", "seed"),
            Flag("--sample", help="the paper's nucleus sampling (top-p 0.8, top-k 20, T 0.7, penalty 1.05)",
                 value=None, expand=_paper_decoding),
            *named("decoding", "temperature", "top_k", "top_p", "repetition_penalty"), *named("detector", "posterior"),
            switch("--pre-resize-vae", "detector.pre_resize_vae"), switch("--smsa", "detector.smsa", True),
            switch("--no-smsa", "detector.smsa", False))


def harness_flags(job: str, *more: str) -> tuple[Flag, ...]:
    return (opt("--shard", f"{job}.shard", help="I/N: score shard I of N (default RANK/WORLD_SIZE)"),
            switch("--overwrite", f"{job}.overwrite"), switch("--gather-only", f"{job}.gather_only"),
            *named(job, "perturb_seed", *more))


def report_flags(at: str, name_at: str | None = None) -> tuple[Flag, ...]:
    return opt("--out", f"{at}.out_dir", help="report directory"), opt("--name", f"{name_at or at}.name")


def sampler_flags(at: str, height: str, width: str) -> tuple[Flag, ...]:
    return (Flag("--size", help="N or WIDTHxHEIGHT in px", expand=lambda text: _size(text, height, width)),
            opt("--steps", f"{at}.num_steps"), opt("--cfg-interval", f"{at}.cfg_interval", nargs=2),
            *named(at, "timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_type", "cfg_renorm_min"))


def generation_flags(job: str) -> tuple[Flag, ...]:
    return (*sampler_flags("generation", "generation.height", "generation.width"),
            *named("generation", "seed", "batch_size"), switch("--keep-borders", "generation.crop_black_borders", False),
            opt("--shard", "shard", help="I/N: generate shard I of N (default RANK/WORLD_SIZE)"),
            opt("--gen-dir", f"{job}.gen_dir"))


def prompt_flags() -> tuple[Flag, ...]:
    return (opt("--data-files", "prompts.table.data_files", nargs="+"),
            *named("prompts.table", "image_column", "caption_column", "key_column", "data_format", "image_root",
                   "cache_dir"),
            Flag("--selection", help="heldout or official-slice",
                 expand=lambda rule: {"prompts.rule": rule.replace("-", "_")}),
            Flag("--slice", help="START STOP", nargs=2,
                 expand=lambda span: {"prompts.slice_start": span[0], "prompts.slice_stop": span[1]}),
            *named("prompts", "heldout_fraction", "heldout_salt", "limit"))


# The flag that selects each benchmark's groups (all set ``groups``), and the keys only one benchmark reads.
GROUP_FLAGS = {"arforensics": "--generators", "genimage": "--generators", "drct2m": "--generators",
               "diffusionforensics": "--generators",
               "ufd": "--subsets", "deepfakebench": "--datasets"}
BENCHMARK_KEYS = {"drct2m": ("real_root",), "deepfakebench": ("json_path", "compression", "frames_per_video")}


def folder_flags(at: str, benchmark: str) -> tuple[Flag, ...]:
    """The flags of one detection benchmark's keys under ``at``."""
    flags = [*named(at, "root", "limit_per_group", "question")]
    if benchmark in GROUP_FLAGS:
        flags.append(opt(GROUP_FLAGS[benchmark], f"{at}.groups", nargs="+", help="score only these groups"))
    if benchmark not in ("dmimage", "arforensics"):
        flags.append(opt("--split", f"{at}.split"))
    flags += named(at, *BENCHMARK_KEYS.get(benchmark, ()))
    if benchmark == "drct2m":
        flags.append(switch("--no-pair-reals", f"{at}.pair_reals", False, help="score the reals once, as a group"))
    if benchmark == "diffusionforensics":
        flags.append(switch("--pair-reals", f"{at}.pair_reals", True, help="give each generator its domain's reals"))
    return tuple(flags)


def split_flags(at: str, benchmark_help: str) -> tuple[Flag, ...]:
    """The flags of a split that is FakeClue (default) or any detection benchmark (``--benchmark``), under ``at``."""
    return (Flag("--benchmark", help=benchmark_help,
                 expand=lambda b: {} if b == "fakeclue" else {f"{at}.benchmark": b}),
            *named(at, *FAKECLUE, "root", "limit_per_group", "question", "split"),
            opt("--generators", f"{at}.groups", nargs="+", help="score only these groups (generators, subsets, "
                "datasets)"))


def _detector_entries(words: list[str]) -> dict[str, list[dict]]:
    """``--detectors [NAME=]DETECTOR:PATH ...`` -> the ``compare.detectors`` list (NAME defaults to DETECTOR)."""
    entries = []
    for word in words:
        head, colon, path = word.partition(":")
        name, _, detector = head.rpartition("=")
        if not colon or not detector or not path:
            raise ConfigError(f"--detectors: {word!r} is not [NAME=]DETECTOR:PATH (e.g. ltd:runs/ltd/final)")
        entries.append({"name": name or detector, "model": {"detector": detector, "path": path}})
    return {"compare.detectors": entries}


EVAL = "unigendet.evaluation.commands"
FAKECLUE = ("json_path", "image_root", "label_convention", "limit")
DETECTION = (*model_flags(), *detector_choice_flags(), *detector_flags("detection"),
             *harness_flags("detection", "setting"), *report_flags("detection"))
BENCHMARK_HELP = "fakeclue (default), dmimage, arforensics, genimage, ufd, drct2m, deepfakebench or diffusionforensics"
LAYOUT_COMMANDS = (
    ("genimage", "GenImage (<generator>/{train,val}/{ai,nature}): Acc, AUC, AP per generator and mean"),
    ("ufd", "UniversalFakeDetect / ForenSynths (<subset>/{0_real,1_fake}): Acc, AUC, AP per subset and mean"),
    ("drct2m", "DRCT-2M (MSCOCO reals, DRCT-2M/<generator> fakes): Acc, AUC, AP per generator and mean"),
    ("deepfakebench", "DeepfakeBench face frames (dataset JSON + frames): Acc, AUC, AP per dataset and mean"),
    ("diffusionforensics", "DiffusionForensics (images/<split>/<domain>/<generator>; 'real' = real): Acc, AUC, AP "
     "per domain/generator and mean"),
)


def detection_command(benchmark: str, help: str) -> Command:
    """``eval <benchmark>``: one detection benchmark through the harness, with any detector."""
    return Command(f"eval {benchmark}", f"{EVAL}:DetectionCommand", f"{EVAL}:run_detection_command", help,
                   (*DETECTION, *folder_flags("detection", benchmark)),
                   preset=(("detection.benchmark", benchmark),))


COMMANDS = (
    Command("demo", f"{__name__}:DemoCommand", f"{__name__}:run_demo_command",
            "train the tiny model on CPU on embedded synthetic data (no downloads)",
            (*named("demo", "steps", "diga_steps", "rounds", "seed"), opt("--out", "out_dir"))),
    Command("export", "unigendet.checkpoint.commands:ExportCommand", "unigendet.checkpoint.commands:run_export_command",
            "re-write a model as a sharded bf16 unigendet export or a BAGEL/UniGenDet directory (--to bagel), "
            "with a model card; optionally push it to the Hugging Face hub",
            (opt("--source", "source", help="model directory or hub id (BAGEL/UniGenDet with --bagel)"),
             switch("--bagel", "bagel", help="--source is a BAGEL-7B-MoT / UniGenDet directory"),
             opt("--weights", "weights", help="with --bagel: fine-tuned weights over the directory's"),
             opt("--out", "out"), opt("--to", "to", help="unigendet (default) or bagel"),
             opt("--dtype", "dtype", help="bf16 (default), fp16 or fp32"),
             opt("--max-shard-size", "max_shard_size", help="e.g. 5GB, 500MB; none: one file"),
             opt("--license", "card.license"), opt("--base-model", "card.base_model"),
             opt("--reports", "card.reports", nargs="+", help="evaluation report JSON files for the model card"),
             opt("--push-to-hub", "push_to_hub", help="hub repo id to upload to"),
             switch("--public", "private", False))),
    Command("convert-data", "unigendet.data.bagel_formats:ConvertDataCommand",
            "unigendet.data.bagel_formats:run_convert_data_command",
            "BAGEL's dataset_info.py + data YAML -> our data: section (t2i parquet with JSON captions, JSONL VLM sets)",
            (opt("--dataset-info", "dataset_info"), opt("--data-yaml", "data_yaml"), opt("--out", "out"))),
    Command("train", "unigendet.training.config:TrainConfig", f"{__name__}:run_train_command",
            "train from a YAML recipe (GDUF, DIGA or a baseline detector); launch with deepspeed for many GPUs",
            needs_file=True),
    Command("coevolve", "unigendet.coevolution.config:CoevolutionConfig", f"{__name__}:run_coevolve_command",
            "co-evolution rounds: GDUF with the previous generator's images as fakes, then DIGA against the new "
            "detector, repeated; resumable; launch with torchrun/deepspeed to shard generation over ranks",
            (opt("--rounds", "rounds"), opt("--out", "out_dir")), needs_file=True),
    Command("plan", "unigendet.training.plan:PlanCommand", "unigendet.training.plan:run_plan_command",
            "memory plan of a training recipe per GPU and per host (model states, activations with and without "
            "checkpointing, disk) and whether it fits",
            (opt("--recipe", "recipe", help="a training recipe (configs/train/*.yaml)"),
             opt("--set", "set", nargs="+", help="KEY=VALUE overrides of the recipe"),
             opt("--gpus", "cluster.gpus_per_node", help="GPUs per node"), opt("--nodes", "cluster.nodes"),
             opt("--gpu", "cluster.gpu", help="a100-40gb, a100-80gb, h100-80gb, h200, ..."),
             *named("cluster", "gpu_memory_gib", "host_memory_gib"), opt("--probe-tokens", "probe.tokens"),
             switch("--json", "json"))),
    Command("cascade", f"{EVAL}:CascadeCommand", f"{EVAL}:run_cascade_command",
            "assemble a tiered cascade (binary -> spectral -> verifier) from saved stages; calibrate its thresholds "
            "on a validation split",
            (opt("--out", "out", help="cascade directory to write"), opt("--binary", "cascade.binary"),
             opt("--spectral", "cascade.spectral"), opt("--binary-backbone", "cascade.binary_backbone"),
             opt("--verifier", "cascade.verifier.kind", help="unigendet or stub_spectral_peak (tests, tiny runs)"),
             opt("--verifier-model", "cascade.verifier.model.path"), opt("--mapping", "cascade.mllm_mapping"),
             opt("--device", "cascade.device"), switch("--copy-stages", "copy_stages"),
             *split_flags("validation", BENCHMARK_HELP),
             *named("calibration", "binary_fnr", "spectral_fnr", "block_fpr", "cleared_fnr"))),
    Command("detect", f"{EVAL}:DetectCommand", f"{EVAL}:run_detect_command",
            "real/fake verdict (detection head) and explanation for images",
            (*model_flags(), *detector_choice_flags(), switch("--json", "json"), opt("--question", "question"),
             *detector_flags("")),
            positional="images"),
    Command("serve", "unigendet.serving.config:ServeConfig", "unigendet.serving.server:run_serve_command",
            "HTTP detection service over any detector (/detect, /info, /health, /metrics, web page at /)",
            (*model_flags(), *detector_choice_flags(), opt("--question", "question"),
             *(f for f in detector_flags("") if f.keys != ("batch_size",)),  # --max-batch-size batches here
             *named("server", "host", "port"), *named("batching", "max_batch_size", "max_wait_ms", "queue_size"),
             opt("--max-images", "limits.max_images_per_request"),
             *named("limits", "max_request_bytes", "max_image_bytes", "max_pixels", "request_timeout_s"))),
    Command("generate", f"{EVAL}:GenerateCommand", f"{EVAL}:run_generate_command",
            "text-to-image generation, one PNG per prompt",
            (*model_flags(), *named("", "out", "seed", "batch_size"), *sampler_flags("sampler", "height", "width")),
            positional="prompts"),
    Command("eval fakeclue", f"{EVAL}:FakeClueCommand", f"{EVAL}:run_fakeclue_command",
            "FakeClue protocol: Acc, F1, ROUGE-L, CSS, head Acc/F1/AUC",
            (*model_flags(), *detector_choice_flags(), *detector_flags("fakeclue"), *named("fakeclue", *FAKECLUE),
             *harness_flags("fakeclue", "setting"), *report_flags("fakeclue"))),
    detection_command("dmimage", "DMimage: Real/Fake/Overall Acc + F1, per generator (head and parsed text)"),
    detection_command("arforensics", "ARForensics: accuracy per AR generator and mean (head and parsed text)"),
    *(detection_command(benchmark, help) for benchmark, help in LAYOUT_COMMANDS),
    Command("eval robustness", f"{EVAL}:RobustnessCommand", f"{EVAL}:run_robustness_command",
            "metrics per JPEG / crop setting in one table, with curves",
            (*model_flags(), *detector_choice_flags(), *detector_flags("robustness.base"),
             *split_flags("robustness.base", BENCHMARK_HELP), opt("--settings", "robustness.settings", nargs="+"),
             *harness_flags("robustness.base"), *report_flags("robustness.base", "robustness"))),
    Command("eval compare", f"{EVAL}:CompareCommand", f"{EVAL}:run_compare_command",
            "several detectors on one split: Acc, real/fake Acc, AP, AUC, images/s, peak memory, published figures; "
            "one ROC plot",
            (Flag("--detectors", ("compare.detectors",), nargs="+", expand=_detector_entries,
                  help="[NAME=]DETECTOR:PATH ... (e.g. ltd:runs/ltd unigendet:runs/ours); options per detector "
                       "in --config"),
             opt("--device", "compare.device", help="where detectors without their own model.device run"),
             *split_flags("compare.base", BENCHMARK_HELP),
             *named("compare.base", "batch_size", "max_new_tokens", "seed"),
             *harness_flags("compare.base", "setting"), *report_flags("compare.base", "compare"))),
    Command("eval merge", f"{EVAL}:MergeCommand", f"{EVAL}:run_merge_command",
            "one Markdown table from several JSON reports",
            (opt("--out", "out"), opt("--columns", "columns", nargs="+")), positional="reports"),
    Command("eval fid", f"{EVAL}:FIDCommand", f"{EVAL}:run_fid_command",
            "FID on held-out prompts vs their real images (pytorch-fid Inception)",
            (*model_flags("fid.device"), opt("--stage", "stage"), *prompt_flags(), *generation_flags("fid"),
             *named("fid", "inception_weights", "dims", "real_root"), opt("--fid-batch-size", "fid.batch_size"),
             *report_flags("fid"))),
    Command("eval geneval", f"{EVAL}:GenEvalCommand", f"{EVAL}:run_geneval_command",
            "GenEval: generate 4 images per prompt, score (approximate backend), summarise results.jsonl",
            (*model_flags("geneval.device"), opt("--stage", "stage"), *generation_flags("geneval"),
             *named("geneval", "metadata_file", "prompt_set", "samples", "detector_dir", "clip_dir", "results"),
             *report_flags("geneval"))),
    Command("eval diversity", f"{EVAL}:DiversityCommand", f"{EVAL}:run_diversity_command",
            "intra-prompt LPIPS and CLIP similarity over K samples per prompt",
            (*model_flags("diversity.device"), opt("--stage", "stage"), opt("--samples", "samples"),
             *prompt_flags(), *generation_flags("diversity"),
             *named("diversity", "lpips_alexnet", "lpips_lin", "clip_dir", "lpips_size"), *report_flags("diversity"))),
)


@dataclass
class DemoCommand:
    """``demo``: the whole GDUF -> DIGA -> generate -> score loop at tiny size, writing under ``out_dir``."""

    out_dir: str = "runs/demo"
    demo: DemoSettings = field(default_factory=DemoSettings)


def run_demo_command(cfg: DemoCommand) -> None:
    from unigendet.demo.run import run_demo

    stage1 = run_demo(out_dir=cfg.out_dir, settings=cfg.demo)["rounds"][0]["detector"]["sets"]["heldout"]
    # The demo's point is that the model learned: fail loudly if held-out accuracy is near chance (balanced: 0.5).
    if not stage1["balanced_accuracy"] > 0.6:
        raise CommandFailed(f"held-out balanced accuracy {stage1['balanced_accuracy']:.3f} is not 10 points above "
                            "chance")


def run_coevolve_command(cfg) -> None:
    from unigendet.coevolution.rounds import run_coevolution

    run_coevolution(cfg)


def run_train_command(cfg) -> None:
    from unigendet.distributed import close_process_group
    from unigendet.training.trainer import Trainer

    Trainer(cfg).train()
    close_process_group()  # every rank leaves together (see close_process_group)


# --------------------------------------------------------------------------------------------------
# The driver


def _emit(result: Any) -> None:
    """Command results go to stdout (pipeable); diagnostics go through logging to stderr."""
    from unigendet.metrics import jsonable

    if result is not None:
        text = result if isinstance(result, str) else json.dumps(jsonable(result), indent=2)
        sys.stdout.write(text + "\n")


def execute(command: Command, argv: list[str]) -> int:
    from unigendet.utils.logging import setup_logging

    ns = parse_command_line(command, argv)
    setup_logging(ns.log_level or "INFO")
    try:
        cfg = prepare(command, ns)
        if cfg is not None:
            _emit(resolve(command.run)(cfg))
    except (ConfigError, FileNotFoundError, RunError) as err:
        if ns.debug:
            raise
        sys.stderr.write(f"unigendet: error: {err}\n")
        return 1 if isinstance(err, RunError) else 2
    return 0


def _usage(prefix: str) -> str:
    names = [c for c in COMMANDS if c.name.startswith(prefix)]
    width = max(len(c.name) for c in names)
    lines = "\n".join(f"  {c.name.ljust(width)}  {c.help}" for c in names)
    return (f"usage: unigendet [--log-level LEVEL] <command> [--config FILE] [flags] [key=value ...]\n\n"
            f"{textwrap.fill(SETTINGS_HELP, 100)}\n\ncommands:\n{lines}\n\n"
            "'unigendet <command> --help' lists a command's flags.\n")


def main(argv: list[str] | None = None) -> int:
    # deepspeed's launcher appends --local_rank=N; the rank is read from the environment instead.
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    level: list[str] = []  # --log-level is accepted before the command too
    if argv[:1] == ["--log-level"]:
        level, argv = argv[:2], argv[2:]
    for words in (2, 1):
        command = next((c for c in COMMANDS if c.name == " ".join(argv[:words])), None)
        if command is not None:
            return execute(command, [*argv[words:], *level])
    prefix = "eval" if argv[:1] == ["eval"] else ""
    rest = argv[1:] if prefix else argv
    if rest[:1] in (["-h"], ["--help"]):
        sys.stdout.write(_usage(prefix))
        return 0
    problem = f"unknown command {' '.join(argv[:2])!r}" if rest else "which command?"
    sys.stderr.write(f"{_usage(prefix)}\nunigendet: error: {problem}\n")
    return 2


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    """Entry for train/gduf.py and train/diga.py: ``unigendet train`` pinned to one stage."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    other = {"gduf": "diga", "diga": "gduf"}[stage]
    if f"stage={other}" in args:
        sys.exit(f"this entry point runs stage {stage}; use train/{other}.py for {other.upper()}")
    return main(["train", *args, f"stage={stage}"])


def entry() -> None:
    """The ``unigendet`` program and ``python -m unigendet.cli``: ``main``, then ``exit_process``, which ends a
    process that started a process group without the interpreter teardown that could abort it."""
    from unigendet.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
