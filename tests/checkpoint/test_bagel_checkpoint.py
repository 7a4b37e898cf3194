"""Loading BAGEL / UniGenDet checkpoint directories.

The tiny checkpoint is written from a key list typed in from the released BAGEL-7B-MoT and UniGenDet
checkpoints' key names, not from our model's state dict, so a naming drift between our
modules and the released files shows up here. Shapes follow configs/model/tiny.yaml.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import builder, tiny_config
from helpers.bfl_layout import write_bfl_vae
from safetensors.torch import load_file, save_file

from unigendet.checkpoint.bagel import (
    BagelCheckpointError,
    adapt_bagel_state_dict,
    bagel_model_config,
    llm_config_from_json,
    load_bagel_checkpoint,
    read_safetensors_weights,
    vit_config_from_json,
)
from unigendet.checkpoint.export import save_model_directory
from unigendet.config.loader import ConfigError, to_dict
from unigendet.data.tokenizer import build_tiny_tokenizer
from unigendet.models.bridges import sincos_2d_table
from unigendet.models.config import LLMConfig, ViTConfig
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import prepare_latents

CFG = tiny_config()
# What the tiny geometry needs beyond the JSON files: BAGEL hard-codes the FLUX VAE and max_latent_size 64.
TINY = {"vae": to_dict(CFG.vae), "max_latent_size": CFG.max_latent_size}
LOG = "unigendet.checkpoint.bagel"


# ------------------------------------------------------------------------------------------------
# A tiny BAGEL-format directory, written by hand


def bagel_shapes(fake_cls_head: bool = True, latent_to_vit: bool = True, diga_mlp: bool = False) -> dict:
    """File key -> shape, spelled as in the released files (BAGEL's keys, then UniGenDet's extras)."""
    llm, vit = CFG.llm, CFG.vit
    D, F, V = llm.hidden_size, llm.intermediate_size, llm.vocab_size
    hd = D // llm.num_attention_heads
    kv = llm.num_key_value_heads * hd
    Dv, Fv = vit.hidden_size, vit.intermediate_size
    patch_dim = vit.patch_size**2 * 3
    n_patch = vit.max_num_patch_per_side**2
    latent_dim = CFG.latent_patch_size**2 * CFG.vae.latent_channels
    s = {"language_model.model.embed_tokens.weight": (V, D)}
    for i in range(llm.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        for g in ("", "_moe_gen"):
            s[f"{p}input_layernorm{g}.weight"] = (D,)
            s[f"{p}post_attention_layernorm{g}.weight"] = (D,)
            s[f"{p}self_attn.q_proj{g}.weight"], s[f"{p}self_attn.q_proj{g}.bias"] = (D, D), (D,)
            s[f"{p}self_attn.k_proj{g}.weight"], s[f"{p}self_attn.k_proj{g}.bias"] = (kv, D), (kv,)
            s[f"{p}self_attn.v_proj{g}.weight"], s[f"{p}self_attn.v_proj{g}.bias"] = (kv, D), (kv,)
            s[f"{p}self_attn.o_proj{g}.weight"] = (D, D)
            s[f"{p}self_attn.q_norm{g}.weight"] = s[f"{p}self_attn.k_norm{g}.weight"] = (hd,)
            s[f"{p}mlp{g}.gate_proj.weight"] = s[f"{p}mlp{g}.up_proj.weight"] = (F, D)
            s[f"{p}mlp{g}.down_proj.weight"] = (D, F)
    s["language_model.model.norm.weight"] = s["language_model.model.norm_moe_gen.weight"] = (D,)
    s["language_model.lm_head.weight"] = (V, D)
    s["time_embedder.mlp.0.weight"], s["time_embedder.mlp.0.bias"] = (D, 256), (D,)
    s["time_embedder.mlp.2.weight"], s["time_embedder.mlp.2.bias"] = (D, D), (D,)
    s["vae2llm.weight"], s["vae2llm.bias"] = (D, latent_dim), (D,)
    s["llm2vae.weight"], s["llm2vae.bias"] = (latent_dim, D), (latent_dim,)
    s["latent_pos_embed.pos_embed"] = (CFG.max_latent_size**2, D)
    s["vit_pos_embed.pos_embed"] = (n_patch, D)
    s["connector.fc1.weight"], s["connector.fc1.bias"] = (D, Dv), (D,)
    s["connector.fc2.weight"], s["connector.fc2.bias"] = (D, D), (D,)
    v = "vit_model.vision_model."
    s[f"{v}embeddings.patch_embedding.weight"], s[f"{v}embeddings.patch_embedding.bias"] = (Dv, patch_dim), (Dv,)
    s[f"{v}embeddings.position_embedding.weight"] = (n_patch, Dv)
    for j in range(vit.num_hidden_layers):
        p = f"{v}encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"], s[f"{p}self_attn.{proj}.bias"] = (Dv, Dv), (Dv,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[f"{p}{ln}.weight"] = s[f"{p}{ln}.bias"] = (Dv,)
        s[f"{p}mlp.fc1.weight"], s[f"{p}mlp.fc1.bias"] = (Fv, Dv), (Fv,)
        s[f"{p}mlp.fc2.weight"], s[f"{p}mlp.fc2.bias"] = (Dv, Fv), (Dv,)
    s[f"{v}post_layernorm.weight"] = s[f"{v}post_layernorm.bias"] = (Dv,)
    if fake_cls_head:
        s["fake_cls_head.0.weight"] = s["fake_cls_head.0.bias"] = (D,)
        s["fake_cls_head.1.weight"], s["fake_cls_head.1.bias"] = (D // 4, D), (D // 4,)
        s["fake_cls_head.3.weight"], s["fake_cls_head.3.bias"] = (2, D // 4), (2,)
    if latent_to_vit:
        s["latent_to_vit_connector.0.weight"], s["latent_to_vit_connector.0.bias"] = (D, latent_dim), (D,)
        s["latent_to_vit_connector.2.weight"], s["latent_to_vit_connector.2.bias"] = (D, D), (D,)
    if diga_mlp:
        s["diga_mlp.0.weight"], s["diga_mlp.0.bias"] = (4 * D, D), (4 * D,)
        s["diga_mlp.2.weight"], s["diga_mlp.2.bias"] = (D, 4 * D), (D,)
    return s


def bagel_state(seed: int = 0, **which) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in bagel_shapes(**which).items():
        if key.endswith("pos_embed"):
            state[key] = torch.from_numpy(sincos_2d_table(shape[1], int(shape[0] ** 0.5))).float()
        elif "norm" in key and key.endswith("weight") or key == "fake_cls_head.0.weight":
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)  # norm gains near 1
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def llm_json(llm: LLMConfig) -> dict:
    """Same fields as Qwen2.5-7B's config.json, which BAGEL ships as llm_config.json."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": llm.num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": llm.vocab_size,
    }


def vit_json(vit: ViTConfig) -> dict:
    """BAGEL's vit_config.json fields; the file lists one layer more than is built (select layer -2)."""
    return {
        "hidden_size": vit.hidden_size,
        "image_size": vit.patch_size * vit.max_num_patch_per_side,
        "intermediate_size": vit.intermediate_size,
        "model_type": "siglip_vision_model",
        "num_attention_heads": vit.num_attention_heads,
        "num_hidden_layers": vit.num_hidden_layers + 1,
        "patch_size": vit.patch_size,
    }


CORPUS = ["a photo of a cat", "is this image real or fake?", "this is a fake image", "this is a real image"] * 4


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A UniGenDet GDUF-style directory: BAGEL keys + fake_cls_head + latent_to_vit_connector."""
    root = tmp_path_factory.mktemp("bagel") / "UniGenDet-tiny"
    root.mkdir()
    (root / "llm_config.json").write_text(json.dumps(llm_json(CFG.llm), indent=2))
    (root / "vit_config.json").write_text(json.dumps(vit_json(CFG.vit), indent=2))
    save_file(bagel_state(), str(root / "ema.safetensors"))
    write_bfl_vae(root / "ae.safetensors", CFG.vae, seed=3)
    build_tiny_tokenizer(CORPUS, vocab_size=CFG.llm.vocab_size).save_pretrained(str(root))
    return root


def make_dir(template: Path, dest: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Copy the template; replace its ema.safetensors with ``state`` if given."""
    shutil.copytree(template, dest)
    if state is not None:
        save_file(state, str(dest / "ema.safetensors"))
    return dest


def file_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key mapping, spelled out independently of the loader."""
    out = {}
    for k, v in state.items():
        if k.endswith("pos_embed") or k.startswith("latent_to_vit_connector."):
            continue
        k = k.replace("fake_cls_head.", "detection_head.", 1) if k.startswith("fake_cls_head.") else k
        k = k.replace("diga_mlp.", "diga_projector.", 1) if k.startswith("diga_mlp.") else k
        out[k] = v
    return out


def run(model, vae, samples):
    batch = builder(model.config).build(samples)
    lat = prepare_latents(batch, vae, model.config.latent_patch_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(batch, lat.tokens, lat.timesteps)


# ------------------------------------------------------------------------------------------------
# Config files


def test_config_from_tiny_directory_equals_tiny_yaml(template):
    assert bagel_model_config(template, **TINY) == CFG


def test_config_from_real_bagel_json_equals_7b_defaults(tmp_path):
    (tmp_path / "llm.json").write_text(json.dumps(llm_json(LLMConfig())))
    (tmp_path / "vit.json").write_text(json.dumps(vit_json(ViTConfig())))
    assert llm_config_from_json(tmp_path / "llm.json") == LLMConfig()
    vit = vit_config_from_json(tmp_path / "vit.json")
    assert vit == ViTConfig() and vit.num_hidden_layers == 26 and vit.max_num_patch_per_side == 70
    assert vit_config_from_json(tmp_path / "vit.json", select_layer=-1).num_hidden_layers == 27


def test_llm_config_variants_and_errors(tmp_path):
    base = llm_json(CFG.llm)
    path = tmp_path / "llm.json"

    def load(**changes):
        path.write_text(json.dumps({**base, **changes}))
        return llm_config_from_json(path)

    # Newer files keep RoPE settings in a dict; BAGEL's entry points force these three flags.
    cfg = load(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5}, tie_word_embeddings=True)
    assert cfg.rope_theta == 5e5 and not cfg.tie_word_embeddings and cfg.qk_norm and cfg.layer_module == "mot"
    assert load(layer_module="Qwen2MoEDecoderLayer").layer_module == "moe"
    assert load(layer_module="Qwen2DecoderLayer").layer_module == "dense"
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        load(rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="layer_module"):
        load(layer_module="Qwen2FancyLayer")
    path.write_text(json.dumps({k: v for k, v in base.items() if k != "vocab_size"}))
    with pytest.raises(ConfigError, match="vocab_size"):
        llm_config_from_json(path)


# ------------------------------------------------------------------------------------------------
# Loading


def test_load_unigendet_directory(template, mixed_samples, caplog):
    with caplog.at_level(logging.INFO, logger=LOG):
        model, vae, tokenizer = load_bagel_checkpoint(template, **TINY)
    assert "latent_to_vit_connector" in caplog.text and "never called" in caplog.text
    assert isinstance(vae, FluxVAE) and len(tokenizer) <= CFG.llm.vocab_size
    assert model.config.detection_head and not model.config.diga_projector

    file_state = load_file(str(template / "ema.safetensors"))
    expected = file_to_ours(file_state)
    own = model.state_dict()
    assert set(own) == set(expected)  # zero missing, zero unexpected
    for key, value in expected.items():
        assert torch.equal(own[key], value), key
    assert torch.equal(model.detection_head[3].bias, file_state["fake_cls_head.3.bias"])

    out = run(model, vae, mixed_samples)
    for t in (out.hidden, out.ce_logits, out.velocity, out.det_logits):
        assert t is not None and torch.isfinite(t).all()


def test_adapter_is_lossless(template, mixed_samples):
    """Same logits as our model loaded, through its own strict loader, with the hand-mapped weights."""
    loaded, vae, _ = load_bagel_checkpoint(template, **TINY)
    direct = UniGenDet(tiny_config())
    direct.load_state_dict_strict(file_to_ours(load_file(str(template / "ema.safetensors"))))
    a, b = run(loaded, vae, mixed_samples), run(direct.eval(), vae, mixed_samples)
    for field in ("hidden", "ce_logits", "velocity", "det_logits"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_plain_bagel_keeps_a_fresh_detection_head(template, tmp_path, caplog):
    root = make_dir(template, tmp_path / "BAGEL", bagel_state(fake_cls_head=False, latent_to_vit=False))
    assert not bagel_model_config(root, **TINY).detection_head  # decided by the weights
    with caplog.at_level(logging.INFO, logger=LOG):
        model, _, _ = load_bagel_checkpoint(root, detection_head=True, **TINY)
    assert "detection_head is not in the checkpoint" in caplog.text
    head = model.detection_head
    assert torch.equal(head[0].weight, torch.ones_like(head[0].weight)) and head[1].bias.abs().sum() == 0
    assert head[1].weight.std() > 0


def test_finetuned_weights_override_base_and_diga_mlp_loads(template, tmp_path):
    base = bagel_state(fake_cls_head=False, latent_to_vit=False)
    root = make_dir(template, tmp_path / "BAGEL", base)
    # A DIGA-style fine-tune: only some keys, plus the heads; written as a directory with model.safetensors.
    tuned_full = bagel_state(seed=7, diga_mlp=True)
    tuned_keys = [k for k in tuned_full if "_moe_gen" in k or k.startswith(("fake_cls_head.", "diga_mlp.", "llm2vae."))]
    tuned = {k: tuned_full[k] for k in tuned_keys}
    (tmp_path / "ft").mkdir()
    save_file(tuned, str(tmp_path / "ft" / "model.safetensors"))

    model, _, _ = load_bagel_checkpoint(root, weights=tmp_path / "ft", **TINY)
    assert model.config.detection_head and model.config.diga_projector and model.config.diga_projector_mult == 4
    own = model.state_dict()
    expected = file_to_ours({**base, **tuned})
    assert set(own) == set(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), key
    assert torch.equal(model.diga_projector[2].weight, tuned["diga_mlp.2.weight"])
    up = "language_model.model.layers.0.mlp.up_proj.weight"  # not in the fine-tune: from the base
    assert torch.equal(model.language_model.model.layers[0].mlp.up_proj.weight, base[up])
    assert not torch.equal(model.llm2vae.weight, base["llm2vae.weight"])


MISSING = "language_model.model.layers.1.mlp.up_proj.weight"
BOGUS = "language_model.model.layers.0.self_attn.bogus.weight"


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s.pop(MISSING), MISSING),
        (lambda s: s.__setitem__(BOGUS, torch.zeros(2)), BOGUS),
        (lambda s: s.__setitem__("connector.fc1.weight", torch.zeros(3, 3)), "connector.fc1.weight"),
        (lambda s: s.__setitem__("fake_cls_head.1.weight", torch.zeros(5, 64)), "fake_cls_head.1.weight"),
        (lambda s: s.pop("fake_cls_head.0.bias"), "fake_cls_head.0.bias"),
    ],
    ids=["missing", "unexpected", "shape", "head-shape", "partial-head"],
)
def test_mismatches_name_the_key(template, tmp_path, edit, key):
    state = bagel_state()
    edit(state)
    root = make_dir(template, tmp_path / "bad", state)
    with pytest.raises(BagelCheckpointError, match=key.replace(".", r"\.")):
        load_bagel_checkpoint(root, **TINY)


def test_corrupted_pos_embed_warns_with_max_difference(template, tmp_path, caplog):
    state = bagel_state()
    state["latent_pos_embed.pos_embed"][3, 5] += 0.25
    root = make_dir(template, tmp_path / "pos", state)
    with caplog.at_level(logging.WARNING, logger=LOG):
        model, _, _ = load_bagel_checkpoint(root, **TINY)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "latent_pos_embed.pos_embed" in warnings[0] and "0.25" in warnings[0]
    # Our recomputed table is what the model uses.
    expected = torch.from_numpy(sincos_2d_table(CFG.llm.hidden_size, CFG.max_latent_size)).float()
    assert torch.equal(model.latent_pos_embed.pos_embed, expected)


def test_adapter_compares_tables_in_the_file_dtype_and_reports_drops(caplog):
    keep = ("vit_model.", "latent_to_vit_connector.", "latent_pos_embed.", "vit_pos_embed.")
    state = {k: v for k, v in bagel_state().items() if k.startswith(keep)}
    state["vit_pos_embed.pos_embed"] = state["vit_pos_embed.pos_embed"].bfloat16()  # a bf16 release is not "corrupted"
    with caplog.at_level(logging.WARNING, logger=LOG):
        out, report = adapt_bagel_state_dict(state, tiny_config(visual_und=False))
    assert not caplog.records
    assert report.pos_embed_max_diff == {"latent_pos_embed.pos_embed": 0.0, "vit_pos_embed.pos_embed": 0.0}
    assert not out  # ViT keys dropped because visual_und is off; tables and dead connector always
    assert "never called" in report.dropped["latent_to_vit_connector.0.weight"]
    assert "visual_und" in report.dropped["vit_model.vision_model.post_layernorm.bias"]
    with pytest.raises(BagelCheckpointError, match="vit_pos_embed.pos_embed"):
        adapt_bagel_state_dict({"vit_pos_embed.pos_embed": torch.zeros(10, CFG.llm.hidden_size)}, CFG)


def test_missing_files_are_named(template, tmp_path):
    no_vae = make_dir(template, tmp_path / "no_vae")
    (no_vae / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        load_bagel_checkpoint(no_vae, **TINY)
    no_ema = make_dir(template, tmp_path / "no_ema")
    (no_ema / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        load_bagel_checkpoint(no_ema, **TINY)
    with pytest.raises(FileNotFoundError, match="not_there"):
        read_safetensors_weights(tmp_path / "not_there")


def test_sharded_checkpoints(template, tmp_path):
    state = load_file(str(template / "ema.safetensors"))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    root = make_dir(template, tmp_path / "sharded")
    (root / "ema.safetensors").unlink()
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(root / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))

    model, _, _ = load_bagel_checkpoint(root, **TINY)  # the directory resolves to its index
    own = model.state_dict()
    for key, value in file_to_ours(state).items():
        assert torch.equal(own[key], value), key
    shards = ",".join(str(root / name) for name in halves)
    for source in (root / "model.safetensors.index.json", shards):
        loaded = read_safetensors_weights(source)
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    # An index that lists a key no shard holds, and a key stored twice, are both errors naming the key.
    bad = dict(index, weight_map={**index["weight_map"], "extra.weight": "model-00001-of-00002.safetensors"})
    (root / "bad.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(BagelCheckpointError, match=r"extra\.weight"):
        read_safetensors_weights(root / "bad.safetensors.index.json")
    first = root / "model-00001-of-00002.safetensors"
    with pytest.raises(BagelCheckpointError, match=keys[0].replace(".", r"\.")):
        read_safetensors_weights(f"{first},{first}")


def test_dtype_casts_parameters_only(template):
    model, _, _ = load_bagel_checkpoint(template, dtype=torch.bfloat16, **TINY)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.latent_pos_embed.pos_embed.dtype == torch.float32
    assert model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_detect_and_generate_cli_read_a_bagel_directory(template, tmp_path, capsys, monkeypatch):
    """`--bagel`: inference loads a BAGEL/UniGenDet directory directly, with the detection head's verdict."""
    from functools import partial

    from PIL import Image

    from unigendet.checkpoint import bagel
    from unigendet.cli import main
    from unigendet.inference.loading import build_detector

    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    detector = build_detector(template, bagel=True, device="cpu", overrides=TINY)
    [expected] = detector.detect([Image.open(image).convert("RGB")], max_new_tokens=2, seed=42)
    # BAGEL directories imply the FLUX VAE geometry; the tiny template's VAE is smaller.
    monkeypatch.setattr(bagel, "load_bagel_checkpoint", partial(bagel.load_bagel_checkpoint, **TINY))
    args = ["--model", str(template), "--bagel", "--device", "cpu"]
    assert main(["detect", str(image), *args, "--json", "--max-new-tokens", "2"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert record["p_fake"] == pytest.approx(expected.p_fake, rel=1e-5) and record["label"] == expected.label_name
    assert record["explanation"] == expected.text
    assert main(["generate", "a photo of a cat", *args, "--out", str(tmp_path / "gen"), "--steps", "3",
                 "--size", "32"]) == 0
    assert Image.open(next((tmp_path / "gen").glob("*.png"))).size == (32, 32)


@pytest.mark.parametrize("kind", ["bagel", "unigendet"])
def test_a_bf16_run_loads_its_checkpoint_straight_into_bf16_with_the_values_of_a_cast(template, tmp_path, kind):
    """The trainer builds a checkpoint-initialised model in its training dtype: bit for bit what casting the float32
    build gives (fresh heads included), at half the parameter memory and with no float32 copy kept."""
    from unigendet.training.builders import InitConfig, build_model_and_vae

    if kind == "bagel":  # plain BAGEL: the detection head is fresh, drawn from the global RNG
        path = make_dir(template, tmp_path / "BAGEL", bagel_state(fake_cls_head=False, latent_to_vit=False))
    else:
        path = tmp_path / "export"
        torch.manual_seed(5)
        model = UniGenDet(CFG)
        save_model_directory(path, model, model.state_dict(), FluxVAE(CFG.vae),
                             build_tiny_tokenizer(CORPUS, vocab_size=CFG.llm.vocab_size))
    init = InitConfig(kind=kind, path=str(path), tokenizer=str(path))
    built = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        if kind == "bagel":  # what build_model_and_vae calls, with the tiny VAE geometry BAGEL's files do not state
            built[dtype] = load_bagel_checkpoint(path, detection_head=True, dtype=dtype, **TINY)[0]
        else:
            built[dtype] = build_model_and_vae(init, CFG, dtype)[0]
    full, half = (dict(built[d].named_parameters()) for d in (torch.float32, torch.bfloat16))
    assert full.keys() == half.keys() and all(p.dtype == torch.bfloat16 for p in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full), kind
    nbytes = {d: sum(p.numel() * p.element_size() for p in m.parameters()) for d, m in built.items()}
    assert nbytes[torch.bfloat16] * 2 == nbytes[torch.float32]
