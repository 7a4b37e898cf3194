"""DIGA variants on the demo: does the alignment weight or the aligned layer change what the generator draws?

Runs after ``./run.sh demo`` (reads its data, stage-0 autoencoder and round-1 GDUF export):

    python benchmarks/diga_variants.py --demo runs/demo --steps 100 \
        --variants control:align_weight=0 w0.5:align_weight=0.5 w2:align_weight=2 l1:student_layer=1,teacher_layer=1

Each variant trains the demo's DIGA recipe from the round-1 GDUF export with its ``diga.*`` overrides, draws the
demo prompts with the same seeds, and is scored by the frozen stage-1 detector (mean p(fake)), caption consistency
and KID to the held-out views. Differences are paired against the first variant (mean +- standard error).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="runs/demo", help="output folder of a finished demo run")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=["control:align_weight=0", "w0.5:align_weight=0.5",
                                                     "w2:align_weight=2", "l1:student_layer=1,teacher_layer=1"])
    p.add_argument("--out", default=None, help="where the variants' runs go (default <demo>/diga_variants)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _variant(spec: str) -> tuple[str, list[str]]:
    name, _, assignments = spec.partition(":")
    if not name or not assignments:
        raise SystemExit(f"variant {spec!r}: expected NAME:key=value[,key=value]")
    return name, [f"diga.{a}" for a in assignments.split(",")]


def main(argv=None) -> dict:
    from unigendet.coevolution.report import generator_quality, head_scores
    from unigendet.coevolution.rounds import RoundPaths, load_prompt_set, prompt_images
    from unigendet.demo.data import make_demo_dataset
    from unigendet.demo.run import (
        DIGA_RECIPE,
        DemoSettings,
        _stage0,
        _train,
        coevolution_config,
        paired_difference,
        stage2_overrides,
    )
    from unigendet.evaluation.fid import generate_fid_images
    from unigendet.inference.loading import build_detector, build_generator

    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    demo, s = Path(args.demo), DemoSettings(diga_steps=args.steps)
    out = Path(args.out) if args.out else demo / "diga_variants"
    data = make_demo_dataset(demo / "data", num_train=s.num_train, num_heldout=s.num_heldout,
                             image_size=s.image_size, seed=s.seed, t2i_per_photo=s.t2i_per_photo,
                             artefact_strength=s.artefact_strength)
    vae = _stage0(data, demo, s)
    cc = coevolution_config(data, demo, s, vae.model_overrides(), [], [])
    round1 = RoundPaths.of(cc.out_dir, 1)
    if not (round1.detector / "config.json").is_file():
        raise SystemExit(f"{round1.detector} is missing: run ./run.sh demo first")
    prompt_set = load_prompt_set(cc.prompts)
    detector = build_detector(round1.detector, device="cpu")
    results = {}
    for spec in args.variants:
        name, overrides = _variant(spec)
        run_dir = out / name
        _, state = _train(DIGA_RECIPE, [*stage2_overrides(data, args.steps, s.seed), *vae.model_overrides(),
                                        f"init.path={round1.detector}", f"checkpoint.dir={run_dir}", *overrides])
        generate_fid_images(build_generator(run_dir / "final", device="cpu"), prompt_set.prompts, run_dir / "images",
                            cc.generation)
        images = prompt_images(run_dir / "images", prompt_set.prompts)
        scores = head_scores(detector, images, s.seed)
        quality = generator_quality(cc, images, prompt_set.groups)
        align = [h["align"] for h in state.history if "align" in h]
        results[name] = {"overrides": overrides, "p_fake": scores, "align": [align[0], align[-1]], **quality}
    base = args.variants[0].partition(":")[0]
    print(f"DIGA variants, {args.steps} steps each from {round1.detector}; {len(prompt_set.prompts)} images each; "
          f"differences paired against {base!r} (mean +- s.e.)")
    print(f"{'variant':<10} {'align first->last':>18} {'p(fake)':>8} {'consistency':>12} {'KID':>8} "
          f"{'d p(fake)':>18} {'d consistency':>18}")
    for name, r in results.items():
        dp = paired_difference(r["p_fake"], results[base]["p_fake"])
        dc = paired_difference([float(m) for m in r["consistent"]], [float(m) for m in results[base]["consistent"]])
        mean_p = sum(r["p_fake"]) / len(r["p_fake"])
        print(f"{name:<10} {r['align'][0]:>8.3f} -> {r['align'][1]:.3f} {mean_p:>8.4f} {r['consistency']:>12.3f} "
              f"{r['kid']:>8.4f} {dp[0]:>+9.4f} +- {dp[1]:.4f} {dc[0]:>+9.3f} +- {dc[1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
