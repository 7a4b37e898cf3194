"""FLUX VAE wrapper: BFL checkpoint loading, latent scaling, variable-size encoding, sampling, save/load."""

from __future__ import annotations

import pytest
import torch
from helpers.bfl_layout import diffusers_to_bfl, write_bfl_vae
from safetensors.torch import load_file, save_file

from unigendet.models.config import VAEConfig
from unigendet.models.vae import (
    FluxVAE,
    VAEStateDictError,
    build_autoencoder,
    diffusers_key_to_bfl,
)

# Non-default scale/shift so the test proves they come from the config.
CFG = VAEConfig(
    block_out_channels=[8, 16, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    scaling_factor=0.5,
    shift_factor=0.25,
)


def images(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "ae.safetensors"
    source = write_bfl_vae(path, CFG, seed=0)
    return path, source


def test_build_autoencoder_geometry():
    ae = build_autoencoder(CFG)
    assert ae.quant_conv is None and ae.post_quant_conv is None
    assert len(ae.encoder.down_blocks) == 4 and len(ae.decoder.up_blocks) == 4
    assert ae.config.scaling_factor == 0.5 and ae.config.shift_factor == 0.25
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in ae.state_dict())


def test_bfl_file_uses_real_bfl_names(bfl_file):
    path, _ = bfl_file
    sd = load_file(str(path))
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",  # 8 -> 16 channels
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.block_2.norm2.bias",
        "encoder.norm_out.weight",
        "decoder.up.3.upsample.conv.weight",  # diffusers up_blocks.0
        "decoder.up.0.block.0.nin_shortcut.weight",  # diffusers up_blocks.3: 16 -> 8 channels
        "decoder.up.0.block.1.conv2.weight",  # layers_per_block + 1 resnets per decoder level
        "decoder.mid.attn_1.proj_out.weight",
        "decoder.norm_out.bias",
    ):
        assert key in sd, key
    assert "decoder.up.0.upsample.conv.weight" not in sd  # lowest level has no upsampler in BFL numbering
    assert "encoder.down.3.downsample.conv.weight" not in sd
    for name in ("q", "k", "v", "proj_out"):
        assert sd[f"encoder.mid.attn_1.{name}.weight"].shape == (16, 16, 1, 1)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in sd)


def test_library_key_names_agree_with_helper():
    # Two independent implementations of the BFL key naming must agree on every key.
    sd = build_autoencoder(CFG).state_dict()
    helper = diffusers_to_bfl(sd)
    assert sorted(helper) == sorted(diffusers_key_to_bfl(k, 4) for k in sd)


def test_from_bfl_file_matches_source(bfl_file):
    path, source = bfl_file
    loaded = FluxVAE.from_bfl_file(path, CFG)
    src_sd, new_sd = source.autoencoder.state_dict(), loaded.autoencoder.state_dict()
    assert set(src_sd) == set(new_sd)
    for k in src_sd:
        assert torch.equal(src_sd[k], new_sd[k]), k
    x = images(2, 32, 24, 1)
    torch.testing.assert_close(loaded.encode(x, sample=False), source.encode(x, sample=False), rtol=0, atol=0)
    z = torch.randn(2, 16, 4, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded.decode(z), source.decode(z), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_from_bfl_accepts_prefixes(bfl_file, prefix):
    path, source = bfl_file
    sd = {prefix + k: v for k, v in load_file(str(path)).items()}
    loaded = FluxVAE.from_bfl_state_dict(sd, CFG)
    for k, v in source.autoencoder.state_dict().items():
        assert torch.equal(v, loaded.autoencoder.state_dict()[k]), k


def test_from_bfl_rejects_extra_and_missing_keys(bfl_file, tmp_path):
    path, _ = bfl_file
    sd = load_file(str(path))

    extra = dict(sd, **{"encoder.down.0.block.0.bogus.weight": torch.zeros(3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(VAEStateDictError, match=r"unexpected keys \(1\): encoder\.down\.0\.block\.0\.bogus\.weight"):
        FluxVAE.from_bfl_file(tmp_path / "extra.safetensors", CFG)

    missing = {k: v for k, v in sd.items() if k != "decoder.up.2.block.1.norm1.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(VAEStateDictError, match=r"missing keys \(1\): decoder\.up\.2\.block\.1\.norm1\.weight"):
        FluxVAE.from_bfl_file(tmp_path / "missing.safetensors", CFG)

    # A quant_conv (SD-style VAE) is not part of FLUX and must be reported, not silently dropped.
    quant = dict(sd, **{"quant_conv.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(VAEStateDictError, match="quant_conv.weight"):
        FluxVAE.from_bfl_state_dict(quant, CFG)

    # Non-strict loading tolerates both.
    FluxVAE.from_bfl_state_dict(dict(missing, **{"extra": torch.zeros(1)}), CFG, strict=False)


def test_from_bfl_rejects_wrong_geometry(bfl_file):
    path, _ = bfl_file
    # Same key set, different tensor shapes: the error names the BFL key and both shapes.
    other = VAEConfig(block_out_channels=[8, 16, 16, 16], layers_per_block=1, latent_channels=8, norm_num_groups=4)
    with pytest.raises(VAEStateDictError, match=r"shapes .*encoder\.conv_out\.weight"):
        FluxVAE.from_bfl_file(path, other)
    # A deeper/wider geometry changes the key set (extra nin_shortcut convs): reported as missing keys.
    wider = VAEConfig(block_out_channels=[8, 16, 16, 32], layers_per_block=1, norm_num_groups=4)
    with pytest.raises(VAEStateDictError, match=r"missing keys \(4\): decoder\.up\.2\.block\.0\.nin_shortcut"):
        FluxVAE.from_bfl_file(path, wider)


def test_encode_shape_and_scaling(bfl_file):
    _, vae = bfl_file
    x = images(2, 32, 48, 3)
    z = vae.encode(x, sample=False)
    assert z.shape == (2, 16, 4, 6)
    mean = vae.autoencoder.encode(x).latent_dist.mean
    torch.testing.assert_close(z, (mean - 0.25) * 0.5, rtol=0, atol=0)
    # decode inverts the scaling before the decoder.
    manual = vae.autoencoder.decode(z / 0.5 + 0.25).sample
    torch.testing.assert_close(vae.decode(z), manual, rtol=0, atol=0)
    assert vae.decode(z).shape == (2, 3, 32, 48)


def test_encode_list_matches_single_encodes(bfl_file):
    _, vae = bfl_file
    a, b, c = images(1, 32, 24, 4)[0], images(1, 16, 40, 5)[0], images(1, 32, 24, 6)[0]
    listed = vae.encode_list([a, b, c], sample=False)
    for img, z in zip((a, b, c), listed, strict=True):
        torch.testing.assert_close(z, vae.encode(img[None], sample=False)[0], rtol=1e-5, atol=1e-5)
    # With sampling, noise is drawn per image in input order: equal to encoding one by one on the same stream.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sampled = vae.encode_list([a, b, c], generator=g1)
    one_by_one = [vae.encode(img[None], generator=g2)[0] for img in (a, b, c)]
    for s, o in zip(sampled, one_by_one, strict=True):
        torch.testing.assert_close(s, o, rtol=1e-5, atol=1e-5)
    # One generator per image: each image's noise comes from its own, wherever it sits in a group.
    seeds = (11, 12, 13)
    own = vae.encode_list([a, b, c], generator=[torch.Generator().manual_seed(s) for s in seeds])
    for img, s, z in zip((a, b, c), seeds, own, strict=True):
        torch.testing.assert_close(z, vae.encode(img[None], generator=torch.Generator().manual_seed(s))[0],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        vae.encode_list([a, b, c], generator=[torch.Generator(), torch.Generator()])
    # Batch-padding (the reference's behaviour) would change the small image's latents everywhere.
    padded = torch.zeros(2, 3, 32, 40)
    padded[0, :, :32, :24], padded[1, :, :16, :40] = a, b
    z_pad = vae.encode(padded, sample=False)[0, :, :4, :3]
    assert not torch.allclose(z_pad, listed[0], atol=1e-4)


def test_kept_posteriors_encode_each_image_once(bfl_file, monkeypatch):
    path, source = bfl_file
    vae = FluxVAE.from_bfl_file(path, CFG)
    a, b, c = images(1, 32, 24, 4)[0], images(1, 16, 40, 5)[0], images(1, 32, 24, 6)[0]
    expected = source.encode_list([a, b, c, a], generator=torch.Generator().manual_seed(3))
    encoded = []
    real_posterior = vae._posterior
    monkeypatch.setattr(vae, "_posterior", lambda x: encoded.append(x.shape[0]) or real_posterior(x))
    vae.keep_posteriors(8)
    first = vae.encode_list([a, b, c, a], generator=torch.Generator().manual_seed(3))
    assert sum(encoded) == 4  # the repeated image is encoded twice on its first call (both in one group)
    again = vae.encode_list([a, b, c, a], generator=torch.Generator().manual_seed(3))
    assert sum(encoded) == 4  # nothing encoded: every posterior was kept
    for got in (first, again):
        for z, e in zip(got, expected, strict=True):
            torch.testing.assert_close(z, e, rtol=1e-5, atol=1e-5)
    # Fresh noise from the caller's generator, not a kept sample.
    assert not torch.allclose(vae.encode_list([a], generator=torch.Generator().manual_seed(4))[0], expected[0])
    # Least recently used first out: with room for two, ``b`` (stored first) goes when ``a`` arrives; ``c`` and
    # ``a`` stay, and after they are used again, ``b`` coming back pushes out ``a``, the older of the two.
    vae.keep_posteriors(2)
    vae.encode_list([b, c, a], sample=False)
    encoded.clear()
    vae.encode_list([a, c], sample=False)
    assert encoded == []
    vae.encode_list([b], sample=False)
    assert encoded == [1]
    # Loading weights, directly or through a parent module, empties the cache.
    vae.load_state_dict(vae.state_dict())
    encoded.clear()
    vae.encode_list([a], sample=False)
    assert encoded == [1]
    torch.nn.Sequential(vae).load_state_dict(torch.nn.Sequential(vae).state_dict())
    encoded.clear()
    vae.encode_list([a], sample=False)
    assert encoded == [1]
    vae.keep_posteriors(0)
    vae.encode_list([a], sample=False)
    assert encoded == [1, 1]
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        vae.keep_posteriors(-1)


def test_posterior_sampling_seeded(bfl_file):
    _, vae = bfl_file
    x = images(1, 16, 16, 8)
    z1 = vae.encode(x, generator=torch.Generator().manual_seed(1))
    z1b = vae.encode(x, generator=torch.Generator().manual_seed(1))
    z2 = vae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(z1, z1b)
    assert not torch.allclose(z1, z2)
    assert not torch.allclose(z1, vae.encode(x, sample=False))


def test_frozen_and_eval(bfl_file):
    _, vae = bfl_file
    assert not any(p.requires_grad for p in vae.parameters())
    parent = torch.nn.Sequential(vae).train()
    assert not parent[0].training and not vae.autoencoder.training


def test_save_load_round_trip(bfl_file, tmp_path):
    _, vae = bfl_file
    vae.save(tmp_path / "vae.safetensors")
    back = FluxVAE.load(tmp_path / "vae.safetensors", CFG)
    a, b = vae.autoencoder.state_dict(), back.autoencoder.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not any(p.requires_grad for p in back.parameters())


def test_input_validation(bfl_file):
    _, vae = bfl_file
    with pytest.raises(ValueError, match="multiple"):
        vae.encode(images(1, 20, 16, 0))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 4, 2, 2))


def test_bfl_writer_matches_independent_layout(bfl_file, tmp_path):
    """The library's BFL writer agrees tensor for tensor with the helper's independent renaming, and what it
    writes loads back into a VAE with identical weights."""
    _, source = bfl_file
    expected = diffusers_to_bfl(source.autoencoder.state_dict())
    written = source.bfl_state_dict()
    assert set(written) == set(expected)
    for key, value in expected.items():
        assert written[key].shape == value.shape, key
        assert torch.equal(written[key], value), key
    path = tmp_path / "ae.safetensors"
    source.save_bfl(path)
    again = FluxVAE.from_bfl_file(path, CFG)
    for key, value in source.autoencoder.state_dict().items():
        assert torch.equal(again.autoencoder.state_dict()[key], value), key
