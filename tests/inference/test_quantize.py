"""Optional 8-/4-bit loading through bitsandbytes: clear errors without it; outputs near bf16 with it (CUDA)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import tiny_config

from unigendet.checkpoint.export import save_model_directory
from unigendet.cli import main
from unigendet.data.tokenizer import build_tiny_tokenizer
from unigendet.inference.loading import load_for_inference
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
CFG = tiny_config()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = UniGenDet(CFG)
    with torch.no_grad():  # a fresh model's velocity head is zero, which would make every velocity equal
        torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    directory = tmp_path_factory.mktemp("quantize") / "model"
    tokenizer = build_tiny_tokenizer(["a photo of a cat", "this is a real image"] * 4, vocab_size=CFG.llm.vocab_size)
    save_model_directory(directory, model, model.state_dict(), FluxVAE(CFG.vae), tokenizer)
    return directory


def test_unknown_mode_and_missing_package_are_clear_errors(model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_for_inference(model_dir, device="cpu", quantize="3bit")
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["detect", str(tmp_path / "a.png"), "--model", str(model_dir), "--quantize", "4bit",
                 "--device", "cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "quantize" in err
    assert ("pip install bitsandbytes" in err) if not HAS_BNB else ("CUDA only" in err)
    if not HAS_BNB:
        with pytest.raises(ImportError, match="pip install bitsandbytes"):
            load_for_inference(model_dir, device="cpu", quantize="8bit")


@pytest.mark.skipif(not (HAS_BNB and torch.cuda.is_available()), reason="needs bitsandbytes and a CUDA GPU")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_decoder_stays_near_bf16(model_dir, mixed_samples, mode):
    from helpers import builder

    from unigendet.objectives import prepare_latents

    reference, vae, _ = load_for_inference(model_dir, device="cuda", dtype="bf16")
    quantized, _, _ = load_for_inference(model_dir, device="cuda", dtype="bf16", quantize=mode)
    linears = [m for m in quantized.language_model.model.layers.modules() if type(m) is torch.nn.Linear]
    assert not linears  # every decoder projection was replaced
    batch = builder(CFG).build(mixed_samples).to("cuda")
    lat = prepare_latents(batch, vae, CFG.latent_patch_size, torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = reference(batch, lat.tokens, lat.timesteps)
        b = quantized(batch, lat.tokens, lat.timesteps)
    for field in ("hidden", "velocity", "ce_logits"):
        x, y = getattr(a, field).float().flatten(), getattr(b, field).float().flatten()
        assert x.abs().max() > 0, field  # a zero reference would make any result look equal
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 0.9, field
