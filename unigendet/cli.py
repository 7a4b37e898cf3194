"""``unigendet`` command line. Sub-commands are added as the project grows; each is a thin wrapper
over library functions."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from unigendet.demo import run_demo

    report = run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    # The demo's point is that the model learned: fail loudly if held-out accuracy is near chance.
    return 0 if report["accuracy"] > report["chance"] + 0.1 else 1


def _train(args: argparse.Namespace) -> int:
    from unigendet.training import run_training

    run_training(args.config, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigendet", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the tiny model on CPU on embedded synthetic data (no downloads)")
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--out", default="runs/demo", help="where the demo writes its data, checkpoints and model")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train from a YAML config (GDUF or DIGA); launch with deepspeed for many GPUs")
    train.add_argument("--config", required=True, help="YAML file under configs/train/ (``_base_`` includes allowed)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 total_steps=500")
    train.set_defaults(func=_train)
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
