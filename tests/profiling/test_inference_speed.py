"""The inference benchmark runs end to end at a tiny size and lays out the detector's context as training did."""

from __future__ import annotations

import importlib.util

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "inference_speed.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("inference_speed_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_transforms_set_the_context_and_every_figure_is_printed(capsys):
    bench = _benchmark()
    common = ["--model-config", str(REPO / "configs/model/demo.yaml"), "--batch", "2", "--tokens", "3",
              "--steps", "2", "--repeats", "1", "--threads", "1"]
    with_recipe = bench.main([*common, "--recipe", str(REPO / "configs/train/gduf_demo.yaml")])
    printed = capsys.readouterr().out
    # The demo recipe keeps 64-px images at 64 px: 8x8 ViT patches and 8x8 latent patches, plus the question.
    assert 128 < with_recipe["context_tokens_per_image"] < 128 + 40
    # Without it the model's default transforms upscale them to 128 px: four times the image tokens.
    default = bench.main(common)
    assert default["context_tokens_per_image"] - 512 == with_recipe["context_tokens_per_image"] - 128
    for key in ("head_only_images_per_s", "explained_images_per_s", "head_only_speedup",
                "head_only_speedup_median_pair", "cached_forward_ms",
                "generate_2_steps_cfg_images_per_s", "generate_2_steps_no_cfg_images_per_s"):
        assert with_recipe[key] > 0 and key in printed, key
    # A difference of two timings: at 3 tokens it may drown in their noise, and is then nan rather than negative.
    for key in ("decode_ms_per_token_step", "decode_tokens_per_s"):
        assert key in printed and not with_recipe[key] <= 0, key
    assert with_recipe["explanation_tokens_per_image"] <= 3
