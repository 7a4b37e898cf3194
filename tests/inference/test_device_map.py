"""Device maps for inference: the layer plan (balance, capacities, explicit ranges, errors), outputs of a split
model equal to the unsplit one (head p(fake), greedy tokens, a short generation) through the split code path, the
Python API and the CLI; real splits over a GPU (with the CPU) and over two GPUs where they exist."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from helpers import tiny_config
from helpers.inference_models import SMALL_VAE, SMALL_VIT, write_model_directory
from PIL import Image

import unigendet.models.mot as mot
from unigendet.config.loader import ConfigError
from unigendet.evaluation.detectors import DetectorSource
from unigendet.inference.detect import DetectorPreprocessing, UniGenDetDetector
from unigendet.inference.device_map import (
    DevicePlan,
    apply_device_map,
    balance_layers,
    check_device_map,
    group_bytes,
    parse_layer_ranges,
    parse_max_memory,
    plan_bytes,
    plan_device_map,
)
from unigendet.inference.generate import Generator, SamplerSettings
from unigendet.inference.loading import ModelSource, build_detector, build_generator, load_for_inference
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE

CFG = tiny_config(**{"llm.num_hidden_layers": 4})
GPU0, GPU1, GPU2 = (torch.device("cuda", i) for i in range(3))
CPU = torch.device("cpu")
# Every layer on the CPU, but in two runs: the split code path (per-layer hops, per-layer cache devices) on CPU.
CPU_SPLIT = "cpu:0-1,cpu:2-3"
GIB = 2**30


# --------------------------------------------------------------------------------------------------
# The plan


def _max_load(placement, devices, layer_bytes, fixed, caps):
    loads = dict.fromkeys(devices, 0)
    for device, size in zip(placement, layer_bytes):
        loads[device] += size
    return max((loads[d] + fixed[i]) / caps[i] for i, d in enumerate(devices))


def test_equal_layers_split_evenly_and_fixed_parts_shift_the_cut():
    assert balance_layers([1] * 28, [GPU0, GPU1]) == (GPU0,) * 14 + (GPU1,) * 14
    assert balance_layers([1] * 28, [GPU0]) == (GPU0,) * 28
    # 4 layer-units of inputs on the first device: it takes 4 fewer layers than the second (12 + 4 = 16 = 16).
    assert balance_layers([1] * 28, [GPU0, GPU1], input_bytes=4) == (GPU0,) * 12 + (GPU1,) * 16
    # Outputs on the last device push layers forward; four devices take contiguous runs in order.
    split = balance_layers([1] * 28, [GPU0, GPU1, GPU2, CPU], input_bytes=2, output_bytes=2)
    assert [len(list(g)) for _, g in itertools.groupby(split)] == [6, 8, 8, 6]


def test_balance_is_the_optimum_of_every_contiguous_split():
    g = torch.Generator().manual_seed(0)
    devices = [GPU0, GPU1, GPU2]
    for trial in range(20):
        layers = torch.randint(1, 50, (9,), generator=g).tolist()
        fixed = [int(torch.randint(0, 80, (1,), generator=g)), 0, int(torch.randint(0, 80, (1,), generator=g))]
        caps = torch.randint(100, 300, (3,), generator=g).tolist() if trial % 2 else [1, 1, 1]
        got = balance_layers(layers, devices, fixed[0], fixed[2], caps if trial % 2 else None)
        assert got == tuple(sorted(got, key=devices.index))  # contiguous runs in device order
        best = min(_max_load([devices[0]] * a + [devices[1]] * (b - a) + [devices[2]] * (9 - b), devices, layers,
                             fixed, caps) for a in range(10) for b in range(a, 10))
        assert math.isclose(_max_load(got, devices, layers, fixed, caps), best)


def test_capacities_balance_by_share_and_refuse_what_does_not_fit():
    # A device with twice the memory takes twice the layers.
    assert balance_layers([1] * 30, [GPU0, GPU1], capacities=[10, 20]) == (GPU0,) * 10 + (GPU1,) * 20
    with pytest.raises(ConfigError, match=r"^max_memory: the weights .* do not fit"):
        balance_layers([GIB] * 4, [GPU0, GPU1], input_bytes=GIB, capacities=[2 * GIB, 2 * GIB])


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = UniGenDet(cfg).eval()
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)  # zero at fresh init: velocities would be 0
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(1)
    return FluxVAE(CFG.vae)


def test_group_bytes_cover_the_model_once_and_tied_heads_stay_with_the_embedding(model, vae):
    inputs, outputs, layers = group_bytes(model, vae)
    every = [*model.parameters(), *model.buffers(), *vae.parameters(), *vae.buffers()]
    assert inputs + outputs + sum(layers) == sum(t.numel() * t.element_size() for t in every)
    assert len(set(layers)) == 1 and len(layers) == 4
    lm_head = model.language_model.lm_head.weight
    assert outputs >= lm_head.numel() * lm_head.element_size()
    tied = _model(tiny_config(**{"llm.tie_word_embeddings": True}))
    t_inputs, t_outputs, _ = group_bytes(tied)
    assert t_outputs == outputs - lm_head.numel() * lm_head.element_size()
    plan = DevicePlan((GPU0, GPU0, GPU1, GPU1))
    assert plan.device_of("language_model.model.embed_tokens") == GPU0 == plan.device_of("vit_model.encoder")
    assert plan.device_of("language_model.lm_head") == GPU1 == plan.device_of("detection_head.fc")
    assert plan.device_of("language_model.model.norm_moe_gen") == GPU1
    assert plan.device_of("language_model.model.layers.1.mlp.up_proj") == GPU0
    assert plan.device_of("language_model.model.layers.2") == GPU1
    assert plan.describe() == "cuda:0 layers 0-1, cuda:1 layers 2-3"


def test_auto_plan_for_given_devices_and_max_memory(model, vae):
    plan = plan_device_map(model, vae, "auto", devices=[GPU0, GPU1])
    assert plan.input_device == GPU0 and plan.output_device == GPU1 and set(plan.layer_devices) <= {GPU0, GPU1}
    sizes = plan_bytes(model, vae, plan)
    assert sum(sizes.values()) == sum(group_bytes(model, vae)[0:2]) + sum(group_bytes(model, vae)[2])
    assert plan_device_map(model, vae, "balanced", devices=[GPU0, GPU1]) == plan
    inputs, outputs, layers = group_bytes(model, vae)
    # Room for the inputs and exactly one layer on the first device: the other three go to the second.
    limits = {GPU0: inputs + layers[0], GPU1: outputs + 3 * layers[0]}
    capped = plan_device_map(model, vae, "auto", limits, devices=[GPU0, GPU1])
    assert capped.layer_devices == (GPU0, GPU1, GPU1, GPU1)
    with pytest.raises(ConfigError, match="^max_memory: cuda:2 is not one of the devices"):
        plan_device_map(model, vae, "auto", "2:1GiB", devices=[GPU0, GPU1])
    with pytest.raises(ConfigError, match="^max_memory: give a limit for every device"):
        plan_device_map(model, vae, "auto", {GPU0: GIB}, devices=[GPU0, GPU1])
    if not torch.cuda.is_available():
        assert plan_device_map(model, vae, "auto").layer_devices == (CPU,) * 4  # no visible GPU: the CPU


@pytest.mark.parametrize("spec, message", [
    ("cpu:0-2,cpu:2-3", "^device_map: layer 2 is assigned twice"),
    ("cpu:0-1,cpu:3", r"^device_map: layer\(s\) 2 are on no device \(the model has 4 decoder layers"),
    ("cpu:0-4", "^device_map: layer 4 does not exist"),
    ("cpu:0-3", None),
])
def test_explicit_ranges_must_name_every_layer_once(model, spec, message):
    if message is None:
        assert plan_device_map(model, None, spec).layer_devices == (CPU,) * 4
        return
    with pytest.raises(ConfigError, match=message):
        plan_device_map(model, None, spec)


def test_spelling_errors_name_the_key():
    assert parse_layer_ranges("0:0-13,cuda:1:14-27, cpu:28") == [(GPU0, 0, 13), (GPU1, 14, 27), (CPU, 28, 28)]
    assert parse_max_memory("0:20GiB,1:1.5GB,cpu:512") == {GPU0: 20 * GIB, GPU1: 1_500_000_000, CPU: 512}
    for bad, message in [("0-13", "is not DEVICE:FIRST-LAST"), ("npu:0-3", "unknown device 'npu'"),
                         ("0:5-2", "ends before it starts"), ("0:a-b", "is not DEVICE:FIRST-LAST")]:
        with pytest.raises(ConfigError, match=f"^device_map: .*{message}"):
            parse_layer_ranges(bad)
    with pytest.raises(ConfigError, match="^max_memory: '20 apples' is not a size"):
        parse_max_memory("0:20 apples")
    with pytest.raises(ConfigError, match="^max_memory: cuda:0 is given twice"):
        parse_max_memory("0:1GB,cuda:0:2GB")


def test_check_device_map_devices_device_and_max_memory():
    check_device_map("0:0-1,1:2-3", gpu_count=2)
    with pytest.raises(ConfigError, match=r"^device_map: cuda:2 is not a visible device \(2 CUDA"):
        check_device_map("0:0-1,2:2-3", gpu_count=2)
    with pytest.raises(ConfigError, match="^max_memory: cuda:3 is not a visible device"):
        check_device_map("auto", "3:10GiB", gpu_count=2)
    with pytest.raises(ConfigError, match="^max_memory applies to device_map auto/balanced only"):
        check_device_map("0:0-3", "0:10GiB", gpu_count=1)
    with pytest.raises(ConfigError, match="^max_memory: cpu is not one of the devices auto balances over"):
        check_device_map("auto", "cpu:10GiB", gpu_count=1)
    check_device_map("auto", "cpu:10GiB", gpu_count=0)
    check_device_map("auto", device="cuda", gpu_count=2)
    check_device_map("auto", device="cuda:0", gpu_count=2)
    check_device_map("auto", device="cpu", gpu_count=0)  # no GPU: auto is the CPU
    with pytest.raises(ConfigError, match="^device: 'gpu' is not a device"):
        check_device_map("auto", device="gpu", gpu_count=0)
    for device_map, device, count in [("auto", "cpu", 2), ("auto", "cuda:1", 2), ("cpu:0-3", "cuda", 1),
                                      ("1:0-1,0:2-3", "cuda:0", 2)]:
        with pytest.raises(ConfigError, match=f"^device: '{device}' disagrees with device_map"):
            check_device_map(device_map, device=device, gpu_count=count)


def test_model_source_validation_names_the_key():
    ModelSource("m", device_map=CPU_SPLIT, device="cpu").validate()
    with pytest.raises(ConfigError, match="^device_map: cannot be combined with quantize: 8bit"):
        ModelSource("m", device_map="auto", quantize="8bit").validate()
    with pytest.raises(ConfigError, match="^max_memory applies with device_map"):
        ModelSource("m", max_memory="0:1GiB").validate()
    with pytest.raises(ConfigError, match="^device_map: unknown device"):
        ModelSource("m", device_map="tpu:0-3").validate()
    with pytest.raises(ConfigError, match="^device_map applies to unigendet only, not 'ltd'"):
        DetectorSource("m", detector="ltd", device_map="auto").validate()


# --------------------------------------------------------------------------------------------------
# A split model gives the unsplit model's outputs


@pytest.fixture(scope="module")
def tokenizer():
    from unigendet.data.tokenizer import build_tiny_tokenizer

    corpus = ["This is a real image. Natural light and sharp texture.",
              "This is a fake image. Smooth skin and odd hands.", "a red square on a blue background"] * 4
    return build_tiny_tokenizer(corpus, vocab_size=400)


def _images():
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
            for w, h in ((40, 40), (64, 40))]


class HopCounter:
    """Counts the decoder's device hops (``mot._to_device``) and the devices they went to."""

    def __init__(self, monkeypatch):
        self.devices: list[torch.device] = []
        original = mot._to_device

        def counted(device, *tensors):
            self.devices.append(torch.device(device))
            return original(device, *tensors)

        monkeypatch.setattr(mot, "_to_device", counted)


def _split(model, vae, spec=CPU_SPLIT):
    model, vae = copy.deepcopy(model), copy.deepcopy(vae)
    apply_device_map(model, vae, plan_device_map(model, vae, spec))
    return model, vae


def test_split_detection_equals_unsplit_through_the_split_path(model, vae, tokenizer, monkeypatch):
    prep = DetectorPreprocessing(SMALL_VIT, SMALL_VAE)
    reference = UniGenDetDetector(model, vae, tokenizer, prep).detect(_images(), max_new_tokens=5)
    split_model, split_vae = _split(model, vae)
    assert split_model.language_model.model.layer_devices == [CPU] * 4
    detector = UniGenDetDetector(split_model, split_vae, tokenizer, prep)
    hops = HopCounter(monkeypatch)
    result = detector.detect(_images(), max_new_tokens=5)
    # Every forward hops before each of the 4 layers and before the final norms.
    calls = detector.cached_forward.stats.forward_calls
    assert calls >= 2 and len(hops.devices) == 5 * calls
    assert [r.token_ids for r in result] == [r.token_ids for r in reference]
    assert [r.p_fake for r in result] == [r.p_fake for r in reference]
    cache = detector.cached_forward.new_cache(2)
    assert [k.device for k in cache.keys] == [CPU] * 4
    with pytest.raises(ValueError, match="split over several devices"):
        split_model.language_model.model.layer_devices = [CPU, CPU, GPU1, GPU1]
        split_model(None)


def test_split_generation_equals_unsplit(model, vae, tokenizer, monkeypatch):
    settings = SamplerSettings(num_steps=3, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0))
    prompts = ["a red square"]
    reference = Generator(model, vae, tokenizer).generate_latents(prompts, 32, 32, seed=3, settings=settings)
    hops = HopCounter(monkeypatch)
    split = Generator(*_split(model, vae), tokenizer).generate_latents(prompts, 32, 32, seed=3, settings=settings)
    assert hops.devices and all(torch.equal(a, b) for a, b in zip(split, reference))


# --------------------------------------------------------------------------------------------------
# Python API and command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, vae, tokenizer):
    return write_model_directory(tmp_path_factory.mktemp("device_map") / "model", model, vae, tokenizer)


@pytest.fixture(scope="module")
def plain(model_dir):
    """The exported model on one device: the first image's result with 3 answer tokens (the CLI's default seed)."""
    return build_detector(model_dir, device="cpu").detect(_images()[:1], max_new_tokens=3)[0]


def test_build_detector_and_generator_with_a_device_map(model_dir, plain):
    detector = build_detector(model_dir, device_map=CPU_SPLIT)
    assert detector.model.language_model.model.layer_devices == [CPU] * 4
    split = detector.detect(_images()[:1], max_new_tokens=3)[0]
    assert (split.p_fake, split.token_ids) == (plain.p_fake, plain.token_ids)
    generator = build_generator(model_dir, device_map="cpu:0,cpu:1-3")
    assert generator.model.language_model.model.layer_devices == [CPU] * 4
    with pytest.raises(ConfigError, match="^device_map: layer 4 does not exist"):
        load_for_inference(model_dir, device_map="cpu:0-4")
    with pytest.raises(ConfigError, match="^device_map: cannot be combined with quantize"):
        load_for_inference(model_dir, device_map="auto", quantize="8bit")
    with pytest.raises(ConfigError, match="^max_memory applies with device_map"):
        load_for_inference(model_dir, max_memory="0:1GiB")


def test_cli_detect_generate_and_serve_take_the_device_map(model_dir, plain, tmp_path, capsys):
    from unigendet.cli import main

    path = str(tmp_path / "a.png")
    _images()[0].save(path)
    assert main(["detect", path, "--model", str(model_dir), "--json", "--max-new-tokens", "3",
                 "--device-map", CPU_SPLIT]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert math.isclose(record["p_fake"], plain.p_fake, rel_tol=1e-6) and record["explanation"] == plain.text
    out = tmp_path / "gen"
    assert main(["generate", "a red square", "--model", str(model_dir), "--out", str(out), "--steps", "2",
                 "--size", "32", "--device-map", CPU_SPLIT]) == 0
    assert len(list(out.glob("*.png"))) == 1
    capsys.readouterr()
    memory = "0:10GiB" if torch.cuda.is_available() else "cpu:10GiB"  # auto without a GPU is the CPU
    assert main(["serve", "--model", str(model_dir), "--device-map", "auto", "--max-memory", memory,
                 "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "device_map: auto" in printed and f"max_memory: {memory}" in printed
    if torch.cuda.device_count() < 6:
        assert main(["detect", path, "--model", str(model_dir), "--device-map", "5:0-3", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "device_map: cuda:5 is not a visible device" in err


# --------------------------------------------------------------------------------------------------
# Real splits (GPU)


def _near(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_between_cpu_and_gpu_equals_cpu(model, vae, tokenizer):
    """Layers 0-1 and the inputs on the CPU, layers 2-3 and the heads on the GPU: every hop crosses devices."""
    prep = DetectorPreprocessing(SMALL_VIT, SMALL_VAE)
    reference = UniGenDetDetector(model, vae, tokenizer, prep).detect(_images(), max_new_tokens=4)
    split_model, split_vae = _split(model, vae, "cpu:0-1,0:2-3")
    assert split_model.language_model.lm_head.weight.device.type == "cuda"
    detector = UniGenDetDetector(split_model, split_vae, tokenizer, prep)
    assert [k.device.type for k in detector.cached_forward.new_cache(1).keys] == ["cpu", "cpu", "cuda", "cuda"]
    result = detector.detect(_images(), max_new_tokens=4)
    for r, ref in zip(result, reference):
        assert math.isclose(r.p_fake, ref.p_fake, rel_tol=1e-4)
    settings = SamplerSettings(num_steps=3, cfg_interval=(0.0, 1.0))
    a = Generator(model, vae, tokenizer).generate_latents(["a red square"], 32, 32, settings=settings)[0]
    b = Generator(split_model, split_vae, tokenizer).generate_latents(["a red square"], 32, 32, settings=settings)[0]
    _near(b.cpu(), a)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_split_over_two_gpus_equals_one_gpu(model, vae, tokenizer):
    prep = DetectorPreprocessing(SMALL_VIT, SMALL_VAE)
    one_model, one_vae = copy.deepcopy(model).to(GPU0), copy.deepcopy(vae).to(GPU0)
    reference = UniGenDetDetector(one_model, one_vae, tokenizer, prep).detect(_images(), max_new_tokens=4)
    split_model, split_vae = _split(model, vae, "0:0-1,1:2-3")
    detector = UniGenDetDetector(split_model, split_vae, tokenizer, prep)
    assert [k.device for k in detector.cached_forward.new_cache(1).keys] == [GPU0, GPU0, GPU1, GPU1]
    result = detector.detect(_images(), max_new_tokens=4)
    for r, ref in zip(result, reference):
        assert math.isclose(r.p_fake, ref.p_fake, rel_tol=1e-4)
    auto = plan_device_map(model, vae, "auto")
    assert auto.input_device == GPU0 and len(auto.devices) == torch.cuda.device_count()
