"""Numerical parity of our model with the official BAGEL / UniGenDet code (training forward, fp32, CPU).

    python benchmarks/reference_parity.py --reference refs/Bagel [--unigendet-reference refs/UniGenDet]

``--reference`` is a checkout of github.com/ByteDance-Seed/Bagel and ``--unigendet-reference`` one of
github.com/Zhangyr2022/UniGenDet. Their code is imported from those paths at run time; nothing of it is
copied into this repository.

What happens:

1. The reference ``Bagel`` (Qwen2 MoT LLM with qk-norm, SigLIP NaViT, connector, time embedder,
   vae2llm/llm2vae, sin-cos tables) is built exactly as ``train/pretrain_unified_navit.py`` builds it
   (``finetune_from_hf`` path: configs read from ``llm_config.json`` / ``vit_config.json``), at the
   geometry of ``configs/model/tiny.yaml`` (except the VAE: 32/64 channels, because the reference
   hard-codes ``GroupNorm(32, ...)``). Every parameter is then redrawn from a seeded generator
   (norm gains near 1, und and gen experts independent, ``llm2vae`` non-zero) so that a swapped or
   mis-routed weight cannot hide behind identical copies.
2. With ``--unigendet-reference``, UniGenDet's ``Bagel`` (same weights plus ``fake_cls_head`` and
   ``latent_to_vit_connector``) is built the same way.
3. Its state dict is written as a BAGEL-format directory (``ema.safetensors``, ``llm_config.json``,
   ``vit_config.json``, a tiny BFL-layout ``ae.safetensors``, a tokenizer) and loaded with our
   ``load_bagel_checkpoint``.
4. One pack -- SMSA detection (fake), text-to-image, SMSA detection (real), text-to-image of another
   size -- is laid out by the reference's own ``PackedDataset.pack_sequence`` / ``to_tensor`` and by
   our ``PackBuilder``; the fields are compared one by one.
5. Both models run the training forward on identical inputs: the same clean latents (zero-padded for
   the reference, as its loop feeds ``padded_latent``), the reference's own logit-normal draws
   (``np.random.randn`` inside ``pack_sequence``; ours get ``sigmoid(z)``) and the same flow noise
   (the reference's single ``torch.randn_like`` inside ``forward`` returns our tensor).
6. Compared: input embeddings, ViT features, final hidden states (all positions), CE logits and
   per-token CE, velocity predictions and per-element MSE, ``fake_cls_head`` logits; plus the VAE
   (posterior mean, posterior sample with shared noise, decode) against the reference
   ``AutoEncoder`` on the same ``ae.safetensors``. Max abs difference per output, PASS/FAIL at
   ``--tolerance`` (default 1e-5; the two loss terms, which square / log the outputs, are held to
   tolerance * max(1, |value|)). Everything runs for two packs: as above, and with both T2I captions
   CFG-dropped (their noised images then sit at RoPE 0).
7. Negative control: a 1e-3 shift of one parameter of ours at a time (gen and und experts, q/k norms,
   final norms, lm_head, time embedder, vae2llm, connector, ViT, detection head) must make the
   comparison fail; a perturbation that goes unnoticed fails the run.

Runtime patches applied to the reference (each one only makes its CUDA/bf16 code run on CPU in fp32 or
bridges a transformers 4.x -> 5.x API change; none changes the math of the training forward):

* ``flash_attn``: a stub module whose ``flash_attn_varlen_func`` is a pure-PyTorch varlen attention
  (per-segment SDPA, default scale, bottom-right causal). Only the SigLIP encoder calls it in training.
* ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["default"]``: transformers 5 removed the
  entry; the transformers 4.x function is re-added verbatim.
* ``transformers.modeling_attn_mask_utils``: removed in later transformers 5.x; the reference's SigLIP
  module imports ``_prepare_4d_attention_mask`` from it at import time but its packed NaViT path never
  calls it, so a stub that raises if called stands in when the module is missing.
* ``Qwen2Config.pad_token_id = None``: transformers 4.x's ``PretrainedConfig`` default, gone in 5.x
  (the reference reads it for ``nn.Embedding(padding_idx=...)``).
* ``torch.bfloat16`` seen by ``modeling/bagel/qwen2_navit.py`` and ``modeling/bagel/siglip_navit.py``
  is ``torch.float32``: their training path hard-casts q/k/v and the mask to bf16 before SDPA /
  flash-attn; run in fp32 instead, the training forward is otherwise unchanged.
* ``qwen2_navit.sdpa_kernel``: a no-op. It pins SDPA to ``EFFICIENT_ATTENTION``, which does not
  exist on CPU; the CPU kernel computes the same function.
* ``torch.randn_like`` during the forward (and during the reference VAE's posterior sampling) returns
  the noise tensor we pass to our side.
* ``data.dataset_info`` / ``data.transforms`` / ``data.video_utils``: empty stub modules (they import
  cv2 / decord / pyarrow for the dataset classes; ``pack_sequence`` and ``to_tensor`` do not use them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import json
import random
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
from safetensors.torch import save_file

from unigendet.checkpoint.bagel import adapt_bagel_state_dict, load_bagel_checkpoint
from unigendet.config.loader import load_config, to_dict
from unigendet.data.packing import (
    CFGDropout,
    PackBuilder,
    detection_sample,
    text_to_image_sample,
)
from unigendet.data.tokenizer import (
    build_tiny_tokenizer,
    encode_text,
    special_token_ids,
)
from unigendet.data.transforms import patchify_latent
from unigendet.labels import LABEL_FAKE, LABEL_REAL
from unigendet.losses import noised_latents
from unigendet.losses.core import detection_loss, flow_matching_loss, token_ce_loss
from unigendet.models.config import ModelConfig, VAEConfig, pack_geometry
from unigendet.models.vae import FluxVAE
from unigendet.ops.attention import dense_mask

# The reference VAE hard-codes GroupNorm(32, ...), so the tiny VAE needs channel counts that are
# multiples of 32 (tiny.yaml's 8/16-channel VAE with 4 groups cannot be built by the reference).
REF_VAE = VAEConfig(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=32)

CORPUS = [
    "a photo of a cat on a red sofa",
    "a watercolor painting of mountains at dawn",
    "\nIs this image real or fake? Explain.",
    "This is a fake image. The fur texture is smeared and the shadows disagree.",
    "This is a real image. Lighting and perspective are consistent.",
] * 4


# ==================================================================================================
# Importing the reference


class _TorchFP32(types.ModuleType):
    """``torch`` as seen by the patched reference modules, except that ``bfloat16`` is ``float32``."""

    bfloat16 = torch.float32

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                      dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """Pure-PyTorch ``flash_attn_varlen_func``: q/k/v ``[total, heads, dim]``; causal is bottom-right aligned."""
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].transpose(0, 1)
        ks = k[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1)
        vs = v[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1)
        mask = None
        if causal:
            nq, nk = qs.shape[1], ks.shape[1]
            mask = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)


def _default_rope_init(config=None, device=None, seq_len=None, **rope_kwargs):
    """transformers 4.x ``_compute_default_rope_parameters``, verbatim in effect."""
    if len(rope_kwargs) > 0:
        base, dim = rope_kwargs["base"], rope_kwargs["dim"]
    else:
        base = config.rope_theta
        partial_rotary_factor = getattr(config, "partial_rotary_factor", 1.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * partial_rotary_factor)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv_freq, 1.0


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _never_called(*args, **kwargs):
    raise RuntimeError("the reference's packed training path was expected not to build 4-D attention masks")


def _purge_reference_modules() -> None:
    for name in list(sys.modules):
        if name in ("modeling", "data") or name.startswith(("modeling.", "data.")):
            del sys.modules[name]


def restore_globals() -> None:
    """Undo the process-wide patches once the reference models are built and have run."""
    _purge_reference_modules()
    if getattr(sys.modules.get("flash_attn"), "flash_attn_varlen_func", None) is _varlen_attention:
        del sys.modules["flash_attn"]
    from transformers import modeling_rope_utils

    if modeling_rope_utils.ROPE_INIT_FUNCTIONS.get("default") is _default_rope_init:
        del modeling_rope_utils.ROPE_INIT_FUNCTIONS["default"]


class Reference(types.SimpleNamespace):
    """Handles to one imported reference tree."""


def import_reference(root: Path, unigendet: bool) -> Reference:
    """Import ``modeling`` / ``data`` from ``root`` with the runtime patches of the module docstring."""
    root = root.resolve()
    if not (root / "modeling" / "bagel" / "bagel.py").is_file():
        raise SystemExit(f"{root} does not look like a Bagel/UniGenDet checkout (no modeling/bagel/bagel.py)")
    import transformers.modeling_utils  # noqa: F401  (import transformers before a spec-less stub exists)
    from transformers import modeling_rope_utils

    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401
    except ModuleNotFoundError:
        sys.modules["transformers.modeling_attn_mask_utils"] = _stub(
            "transformers.modeling_attn_mask_utils", _prepare_4d_attention_mask=_never_called)
    if "flash_attn" not in sys.modules:
        sys.modules["flash_attn"] = _stub("flash_attn", flash_attn_varlen_func=_varlen_attention)
    if "default" not in modeling_rope_utils.ROPE_INIT_FUNCTIONS:
        modeling_rope_utils.ROPE_INIT_FUNCTIONS["default"] = _default_rope_init

    _purge_reference_modules()
    sys.path.insert(0, str(root))
    try:
        data_pkg = importlib.import_module("data")
        for sub, attrs in {
            "dataset_info": {"DATASET_INFO": {}, "DATASET_REGISTRY": {}},
            "transforms": {"ImageTransform": None},
            "video_utils": {"FrameSampler": None},
        }.items():
            sys.modules[f"data.{sub}"] = _stub(f"data.{sub}", **attrs)
            setattr(data_pkg, sub, sys.modules[f"data.{sub}"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bagel_pkg = importlib.import_module("modeling.bagel")
            qwen2_navit = importlib.import_module("modeling.bagel.qwen2_navit")
            siglip_navit = importlib.import_module("modeling.bagel.siglip_navit")
            autoencoder = importlib.import_module("modeling.autoencoder")
            dataset_base = importlib.import_module("data.dataset_base")
            data_utils = importlib.import_module("data.data_utils")
    finally:
        sys.path.remove(str(root))
    qwen2_navit.torch = _TorchFP32()
    siglip_navit.torch = _TorchFP32()
    qwen2_navit.sdpa_kernel = lambda *a, **k: contextlib.nullcontext()
    return Reference(root=root, unigendet=unigendet, bagel=bagel_pkg, qwen2_navit=qwen2_navit,
                     autoencoder=autoencoder, dataset_base=dataset_base, data_utils=data_utils)


@contextlib.contextmanager
def fixed_randn_like(*tensors: torch.Tensor):
    """Make the next ``torch.randn_like`` calls return ``tensors`` in order (shape-checked)."""
    queue = list(tensors)
    original = torch.randn_like

    def fake(x, *args, **kwargs):
        if not queue:
            raise AssertionError("the reference drew more torch.randn_like tensors than expected")
        t = queue.pop(0)
        if tuple(x.shape) != tuple(t.shape):
            raise AssertionError(f"randn_like shape {tuple(x.shape)} but the prepared noise is {tuple(t.shape)}")
        return t.clone().to(dtype=x.dtype, device=x.device)

    torch.randn_like = fake
    try:
        yield
    finally:
        torch.randn_like = original
    if queue:
        raise AssertionError(f"the reference drew {len(tensors) - len(queue)} of {len(tensors)} prepared noise tensors")


# ==================================================================================================
# Geometry, configs, weights


def tiny_model_config() -> ModelConfig:
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / "tiny.yaml")
    cfg.vae = REF_VAE
    return cfg


def llm_config_json(cfg: ModelConfig) -> dict:
    llm = cfg.llm
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": llm.hidden_act,
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": llm.num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": llm.vocab_size,
    }


def vit_config_json(cfg: ModelConfig) -> dict:
    vit = cfg.vit
    return {
        "hidden_size": vit.hidden_size,
        "image_size": vit.patch_size * vit.max_num_patch_per_side,
        "intermediate_size": vit.intermediate_size,
        "model_type": "siglip_vision_model",
        "num_attention_heads": vit.num_attention_heads,
        # The file lists one layer more than is built (BAGEL trains with vit_select_layer = -2).
        "num_hidden_layers": vit.num_hidden_layers + 1,
        "patch_size": vit.patch_size,
        "hidden_act": vit.hidden_act,
        "layer_norm_eps": vit.layer_norm_eps,
    }


def ref_vae_params(ref: Reference, vae: VAEConfig):
    ch = vae.block_out_channels[0]
    return ref.autoencoder.AutoEncoderParams(
        resolution=256, in_channels=3, downsample=vae.downsample, ch=ch, out_ch=3,
        ch_mult=[c // ch for c in vae.block_out_channels], num_res_blocks=vae.layers_per_block,
        z_channels=vae.latent_channels, scale_factor=vae.scaling_factor, shift_factor=vae.shift_factor,
    )


def build_reference_model(ref: Reference, ckpt: Path, cfg: ModelConfig):
    """As ``train/pretrain_unified_navit.py`` (finetune_from_hf, visual_gen and visual_und on)."""
    b = ref.bagel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm_config = b.Qwen2Config.from_json_file(str(ckpt / "llm_config.json"))
        llm_config.layer_module = "Qwen2MoTDecoderLayer"
        llm_config.qk_norm = True
        llm_config.tie_word_embeddings = False
        llm_config.freeze_und = False
        llm_config.pad_token_id = None  # transformers 4.x PretrainedConfig default (runtime shim)
        language_model = b.Qwen2ForCausalLM(llm_config)
        vit_config = b.SiglipVisionConfig.from_json_file(str(ckpt / "vit_config.json"))
        vit_config.num_hidden_layers = vit_config.num_hidden_layers + 1 + (-2)  # vit_select_layer
        vit_config.rope = False  # vit_rope
        vit_model = b.SiglipVisionModel(vit_config)
        config = b.BagelConfig(
            visual_gen=True,
            visual_und=True,
            llm_config=llm_config,
            vit_config=vit_config,
            vae_config=ref_vae_params(ref, cfg.vae),
            latent_patch_size=cfg.latent_patch_size,
            max_latent_size=cfg.max_latent_size,
            vit_max_num_patch_per_side=cfg.vit.max_num_patch_per_side,
            connector_act=cfg.connector_act,
            interpolate_pos=False,
            timestep_shift=1.0,
        )
        model = b.Bagel(language_model, vit_model, config)
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    return model


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int, prefix: str = "") -> None:
    """Seeded random values for every parameter (except the fixed sin-cos tables), scaled so that
    activations stay O(1): weights ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.1²), biases ~ N(0, 0.05²)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
        if name.endswith("pos_embed"):
            continue
        is_norm = "norm" in name.split(".")[-2] or name.startswith("fake_cls_head.0.")
        if p.ndim == 1:
            base = 1.0 if (is_norm and name.endswith("weight")) else 0.0
            p.copy_(base + (0.1 if is_norm else 0.05) * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name or "position_embedding" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)


def random_vae(cfg: ModelConfig, seed: int) -> FluxVAE:
    """A tiny VAE with diffusers' seeded default init, its GroupNorm gains and biases perturbed so that a
    swapped norm mapping between the BFL and diffusers layouts would show up."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = FluxVAE(cfg.vae)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.autoencoder.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return vae


# ==================================================================================================
# Data


class Inputs(types.SimpleNamespace):
    pass


def make_inputs(tokenizer, cfg: ModelConfig, seed: int) -> Inputs:
    """Token ids and images of the four samples (detection fake, t2i, detection real, t2i)."""
    g = torch.Generator().manual_seed(seed)

    def img(h, w):
        return torch.rand(3, h, w, generator=g) * 2 - 1

    ids = lambda text: encode_text(tokenizer, text)
    question = ids("\nIs this image real or fake? Explain.")
    return Inputs(
        samples=[
            {
                "kind": "det", "vae": img(64, 48), "vit": img(56, 42), "question": question, "label": LABEL_FAKE,
                "answer": ids("This is a fake image. The fur texture is smeared and the shadows disagree."),
            },
            {"kind": "t2i", "vae": img(48, 48), "caption": ids("a photo of a cat on a red sofa")},
            {
                "kind": "det", "vae": img(48, 64), "vit": img(42, 56), "question": question, "label": LABEL_REAL,
                "answer": ids("This is a real image. Lighting and perspective are consistent."),
            },
            {"kind": "t2i", "vae": img(32, 64), "caption": ids("a watercolor painting of mountains at dawn")},
        ]
    )


def reference_samples(inputs: Inputs) -> list[dict]:
    """The samples as the reference datasets yield them (UniGenDet ``detection_json_dataset`` SMSA layout,
    Bagel ``t2i_dataset``); both image-list conventions are filled so either ``pack_sequence`` works."""
    out = []

    def item(kind, loss, enable_cfg=0):
        return {"type": kind, "loss": loss, "enable_cfg": enable_cfg, "special_token_loss": 0, "special_token_label": None}

    for i, s in enumerate(inputs.samples):
        if s["kind"] == "det":
            out.append({
                "image_tensor_list": [s["vae"], s["vit"]],  # Bagel: one list in plan order
                "vit_image_tensor_list": [s["vit"]],
                "gen_image_tensor_list": [s["vae"]],
                "text_ids_list": [list(s["question"]), list(s["answer"])],
                "sequence_plan": [item("vae_image", 0), item("vit_image", 0), item("text", 0), item("text", 1)],
                "data_indexes": {"data_indexes": [i], "worker_id": 0, "dataset_name": "vlm_sft"},
                # FakeClue convention: 1 = real, 0 = fake.
                "label": 1 if s["label"] == LABEL_REAL else 0,
            })
        else:
            out.append({
                "image_tensor_list": [s["vae"]],
                "gen_image_tensor_list": [s["vae"]],
                "text_ids_list": [list(s["caption"])],
                "sequence_plan": [item("text", 0, enable_cfg=1), item("vae_image", 1)],
                "data_indexes": {"data_indexes": [i], "worker_id": 0, "dataset_name": "t2i_pretrain"},
                "generation_auth_explanation_list": ["response"],
                "gt_vit_list": [None],
                "gt_prompt_list": ["caption"],
            })
    return out


def reference_pack(ref: Reference, inputs: Inputs, cfg: ModelConfig, special: dict, use_flex: bool,
                   np_seed: int, text_dropout: float) -> dict:
    """Run the reference's ``PackedDataset.pack_sequence`` + ``to_tensor`` on our samples."""
    PD = ref.dataset_base.PackedDataset
    ds = PD.__new__(PD)  # skip __init__: it builds the real datasets from YAML / parquet files
    ds.data_config = ref.dataset_base.DataConfig(
        grouped_datasets={},
        # 0: nothing dropped; 1: every enable_cfg item (the T2I captions) dropped. Ours uses the same
        # probabilities, so both sides drop exactly the same items.
        text_cond_dropout_prob=text_dropout,
        vit_cond_dropout_prob=0.0,
        vae_cond_dropout_prob=0.0,
        vae_image_downsample=cfg.latent_downsample,
        max_latent_size=cfg.max_latent_size,
        vit_patch_size=cfg.vit.patch_size,
        max_num_patch_per_side=cfg.vit.max_num_patch_per_side,
    )
    ds.use_flex = use_flex
    ds.interpolate_pos = False
    ds.get_flattened_position_ids = ref.data_utils.get_flattened_position_ids_extrapolate
    for k, v in special.items():
        setattr(ds, k, v)
    samples = reference_samples(inputs)
    np.random.seed(np_seed)  # the logit-normal timestep draws of noised images
    status = ds.set_sequence_status()
    for sample in samples:
        status = ds.pack_sequence(sample, status)
    ds.max_num_tokens = sum(status["sample_lens"])  # flex mode pads to max_num_tokens: no padding
    return ds.to_tensor(status)


def our_samples(inputs: Inputs):
    out = []
    for s in inputs.samples:
        if s["kind"] == "det":
            out.append(detection_sample(s["question"], s["answer"], s["vae"], s["vit"], s["label"]))
        else:
            out.append(text_to_image_sample(s["caption"], s["vae"]))
    return out


# ==================================================================================================
# Comparison helpers


class Report:
    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.rows: list[dict] = []

    def numeric(self, name: str, ours: torch.Tensor | None, theirs: torch.Tensor | None, relative: bool = False):
        """Max |ours - theirs| <= tolerance. ``relative``: |ours - theirs| <= tolerance * max(1, |theirs|)
        elementwise -- used for the loss terms, which are squares / logs of the compared outputs, so their
        fp32 rounding grows with their magnitude (e.g. |a² - b²| = |a - b|·|a + b|)."""
        tol = self.tolerance
        if ours is None or theirs is None:
            self.rows.append({"name": name, "diff": None, "scale": None, "ok": False, "detail": "missing output"})
            return
        ours, theirs = ours.detach().float(), theirs.detach().float()
        if ours.shape != theirs.shape:
            self.rows.append({"name": name, "diff": None, "scale": None, "ok": False,
                              "detail": f"shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"})
            return
        finite = torch.isfinite(theirs)
        same_inf = bool(torch.equal(finite, torch.isfinite(ours)))
        diff = float((ours[finite] - theirs[finite]).abs().max()) if finite.any() else 0.0
        scale = float(theirs[finite].abs().max()) if finite.any() else 0.0
        detail = f"shape {tuple(ours.shape)}"
        if relative:
            rel = float(((ours[finite] - theirs[finite]).abs() / theirs[finite].abs().clamp(min=1.0)).max()) if finite.any() else 0.0
            ok = same_inf and rel <= tol
            detail += f", max |diff|/max(1,|ref|) = {rel:.2e}"
        else:
            ok = same_inf and diff <= tol
        self.rows.append({"name": name, "diff": diff, "scale": scale, "ok": ok, "detail": detail})

    def exact(self, name: str, ours, theirs):
        if isinstance(ours, torch.Tensor) or isinstance(theirs, torch.Tensor):
            ours_t, theirs_t = torch.as_tensor(ours), torch.as_tensor(theirs)
            ok = ours_t.shape == theirs_t.shape and bool(torch.equal(ours_t.to(theirs_t.dtype), theirs_t))
            detail = "" if ok else f"ours {ours_t.tolist()} vs reference {theirs_t.tolist()}"
        else:
            ok = ours == theirs
            detail = "" if ok else f"ours {ours!r} vs reference {theirs!r}"
        self.rows.append({"name": name, "diff": None, "scale": None, "ok": ok, "detail": detail[:400]})

    @property
    def passed(self) -> bool:
        return all(r["ok"] for r in self.rows)

    def print(self) -> None:
        width = max(len(r["name"]) for r in self.rows)
        for r in self.rows:
            status = "PASS" if r["ok"] else "FAIL"
            if r["diff"] is None:
                print(f"  {r['name']:<{width}}  {'equal' if r['ok'] else 'DIFFERS':>12}  {'':>10}  {status}  {r['detail']}")
            else:
                print(f"  {r['name']:<{width}}  {r['diff']:12.3e}  {r['scale']:10.3g}  {status}  {r['detail']}")


def compare_packs(report: Report, prefix: str, batch, ref_data: dict, ref_flex: dict, label_key: bool) -> None:
    """Field-by-field comparison of our PackedBatch with the reference's packed dict."""
    report.exact(prefix + "sequence_length", batch.sequence_length, ref_data["sequence_length"])
    report.exact(prefix + "sample_lens", list(batch.sample_lens), list(ref_data["sample_lens"]))
    # flex mode appends one padding pseudo-split/sample of length max_num_tokens - L (0 here).
    report.exact(prefix + "split_lens", list(batch.split_lens), list(ref_flex["split_lens"][:-1]))
    report.exact(prefix + "attn_modes", list(batch.attn_modes), list(ref_flex["attn_modes"][:-1]))
    report.exact(prefix + "position_ids", batch.position_ids, ref_data["packed_position_ids"])
    report.exact(prefix + "text_ids", batch.text_ids, ref_data["packed_text_ids"])
    report.exact(prefix + "text_indexes", batch.text_indexes, ref_data["packed_text_indexes"])
    report.exact(prefix + "vit_tokens", batch.vit_tokens, ref_data["packed_vit_tokens"])
    report.exact(prefix + "vit_position_ids", batch.vit_position_ids, ref_data["packed_vit_position_ids"])
    report.exact(prefix + "vit_token_indexes", batch.vit_token_indexes, ref_data["packed_vit_token_indexes"])
    report.exact(prefix + "vit_seqlens", batch.vit_seqlens, ref_data["vit_token_seqlens"])
    report.exact(prefix + "latent_shapes", [tuple(s) for s in batch.latent_shapes],
                 [tuple(s) for s in ref_data["patchified_vae_latent_shapes"]])
    report.exact(prefix + "latent_position_ids", batch.latent_position_ids, ref_data["packed_latent_position_ids"])
    report.exact(prefix + "vae_token_indexes", batch.vae_token_indexes, ref_data["packed_vae_token_indexes"])
    report.exact(prefix + "noised tokens (timestep finite)", batch.mse_token_mask,
                 torch.isfinite(ref_data["packed_timesteps"]))
    report.exact(prefix + "mse_loss_indexes", batch.mse_loss_indexes, ref_data["mse_loss_indexes"])
    report.exact(prefix + "ce_loss_indexes", batch.ce_loss_indexes, ref_data["ce_loss_indexes"])
    report.exact(prefix + "ce_label_ids", batch.ce_label_ids, ref_data["packed_label_ids"])
    # The reference zero-pads its VAE images to the batch maximum; crop them back and compare.
    padded = ref_data["padded_images"]
    same_images = len(batch.vae_images) == padded.shape[0] and all(
        torch.equal(padded[i, :, : img.shape[1], : img.shape[2]], img) for i, img in enumerate(batch.vae_images)
    )
    report.exact(prefix + "vae_images (reference padded, cropped)", same_images, True)
    # Attention: the reference's per-sample float masks (0 / -inf) against our rule.
    ours_mask = dense_mask(batch.layout)
    start, same = 0, True
    for n, m in zip(batch.sample_lens, ref_data["nested_attention_masks"]):
        same &= bool(torch.equal(ours_mask[start : start + n, start : start + n], m == 0))
        start += n
    report.exact(prefix + "attention masks (per sample)", same, True)
    # Detection head rows: UniGenDet reads the first index of each run of consecutive CE positions.
    ce = ref_data["ce_loss_indexes"].tolist()
    runs = [ce[0]] + [ce[i] for i in range(1, len(ce)) if ce[i] - ce[i - 1] != 1] if ce else []
    report.exact(prefix + "det_indexes (first CE index of each run)", batch.det_indexes.tolist(), runs)
    if label_key:
        # UniGenDet packs FakeClue labels (1 = real, 0 = fake); ours are 1 = fake, 0 = real.
        report.exact(prefix + "det_labels (FakeClue 1=real -> ours 1=fake)", batch.det_labels, 1 - ref_data["label"])


# ==================================================================================================
# Main

# (name, probability of dropping enable_cfg text items): the second scenario drops both T2I captions,
# so their noised image blocks start at RoPE 0 (the unconditional CFG branch).
SCENARIOS = (("full", 0.0), ("captions dropped", 1.0))

# Negative control: each of these parameters of OUR model is shifted by NEGATIVE_DELTA in turn; the
# comparison must then fail, which shows that the part is exercised and the tolerance is discriminating.
NEGATIVE_CONTROL = (
    "language_model.model.layers.0.self_attn.q_norm_moe_gen.weight",
    "language_model.model.layers.0.self_attn.k_norm.weight",
    "language_model.model.layers.1.self_attn.v_proj_moe_gen.bias",
    "language_model.model.layers.1.mlp_moe_gen.down_proj.weight",
    "language_model.model.layers.1.post_attention_layernorm.weight",
    "language_model.model.norm_moe_gen.weight",
    "language_model.lm_head.weight",
    "time_embedder.mlp.0.bias",
    "vae2llm.weight",
    "connector.fc2.bias",
    "vit_model.vision_model.encoder.layers.0.mlp.fc1.bias",
    "vit_model.vision_model.post_layernorm.bias",
    "detection_head.1.bias",
)
NEGATIVE_DELTA = 1e-3


def run_reference(ref: Reference, cfg: ModelConfig, ckpt: Path, state: dict | None, seed: int,
                  inputs: Inputs, special: dict, latents: dict, np_seed: int) -> dict:
    """Build (or load) the reference model; per scenario pack and run the training forward; run its VAE."""
    model = build_reference_model(ref, ckpt, cfg)
    if state is None:
        randomize(model, seed)
        extra_state = {}
    else:
        # Same weights as the Bagel run; UniGenDet's extra modules get their own seeded values.
        result = model.load_state_dict(state, strict=False)
        extra = sorted({k.split(".")[0] for k in result.missing_keys})
        if result.unexpected_keys or not set(extra) <= {"fake_cls_head", "latent_to_vit_connector"}:
            raise RuntimeError(f"unexpected key mismatch loading the Bagel weights: {result}")
        for i, name in enumerate(extra):
            randomize(getattr(model, name), seed + 1000 + i, prefix=name + ".")
        extra_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.split(".")[0] in extra}
    model.train()  # the training forward (forward_train) is the path under test; dropout is 0 everywhere

    # The clean latents zero-padded to the batch maximum, as the reference's loop feeds `padded_latent`.
    x0 = latents["x0"]
    max_c, max_h, max_w = (max(int(lat.shape[i]) for lat in x0) for i in range(3))
    padded_latent = torch.zeros(len(x0), max_c, max_h, max_w)
    for i, lat in enumerate(x0):
        padded_latent[i, :, : lat.shape[1], : lat.shape[2]] = lat

    scenarios = {}
    for name, text_dropout in SCENARIOS:
        data = reference_pack(ref, inputs, cfg, special, False, np_seed, text_dropout)
        flex = reference_pack(ref, inputs, cfg, special, True, np_seed, text_dropout)
        kwargs = {k: v for k, v in data.items() if k not in (
            "padded_images", "ce_loss_weights", "batch_data_indexes", "label",
            "generation_auth_explanation_list", "gt_vit_list", "gt_prompt_list")}
        kwargs["padded_latent"] = padded_latent
        captured = {}

        def keep(key, store=captured):
            return lambda module, args, output: store.__setitem__(key, output)

        hooks = [
            model.language_model.register_forward_pre_hook(
                lambda m, a, kw, store=captured: store.__setitem__("inputs_embeds", kw["packed_sequence"].clone()),
                with_kwargs=True,
            ),
            model.language_model.model.register_forward_hook(keep("hidden")),  # final-normed states
            model.language_model.lm_head.register_forward_hook(keep("ce_logits")),
            model.llm2vae.register_forward_hook(keep("velocity")),
            model.vit_model.register_forward_hook(keep("vit")),
        ]
        try:
            # The forward noises the latents itself: its one torch.randn_like returns our noise.
            with torch.no_grad(), fixed_randn_like(latents["noise"]):
                out = model(**kwargs)
        finally:
            for h in hooks:
                h.remove()
        losses, det_logits = out if ref.unigendet else (out, None)
        scenarios[name] = {
            "data": data, "flex": flex, "captured": captured, "ce": losses["ce"], "mse": losses["mse"], "det_logits": det_logits,
            # The reference's t: sigmoid of its own draws (timestep_shift = 1 is the identity); 0 when clean.
            "t": torch.sigmoid(data["packed_timesteps"]),
            "label": data.get("label"),  # UniGenDet only: FakeClue labels (1 = real) in pack order
        }

    # The reference VAE on the same ae.safetensors: posterior mean, posterior sample, decode.
    from safetensors.torch import load_file

    vae = ref.autoencoder.AutoEncoder(ref_vae_params(ref, cfg.vae))
    vae.load_state_dict(load_file(str(ckpt / "ae.safetensors")), strict=True)
    vae.eval()
    with torch.no_grad():
        img = latents["vae_probe_images"]
        vae.reg.sample = False
        vae_mean = vae.encode(img)
        vae.reg.sample = True
        with fixed_randn_like(latents["vae_probe_eps"]):
            vae_sample = vae.encode(img)
        vae_decoded = vae.decode(latents["vae_probe_latents"])

    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()} if state is None else None,
        "extra_state": extra_state,
        "scenarios": scenarios,
        "vae_mean": vae_mean,
        "vae_sample": vae_sample,
        "vae_decoded": vae_decoded,
    }


def our_forward(model, batch, x_t, t_tok, target):
    with torch.no_grad():
        out = model(batch, x_t, t_tok)
        return {
            "out": out,
            "inputs_embeds": model.embed(batch, x_t, t_tok),
            "vit": model.vit_model(batch.vit_tokens, batch.vit_position_ids, batch.vit_seqlens),
            "ce": F.cross_entropy(out.ce_logits, batch.ce_label_ids, reduction="none"),
            "mse": (out.velocity - target[batch.mse_token_mask]) ** 2,
            "target": target,
        }


def compare_outputs(report: Report, prefix: str, ours: dict, r: dict) -> None:
    c, out = r["captured"], ours["out"]
    report.numeric(f"{prefix} input embeddings [L, D]", ours["inputs_embeds"], c["inputs_embeds"])
    report.numeric(f"{prefix} ViT features (post_layernorm)", ours["vit"], c["vit"])
    report.numeric(f"{prefix} final hidden states [L, D]", out.hidden, c["hidden"])
    report.numeric(f"{prefix} CE logits at ce_loss_indexes", out.ce_logits, c["ce_logits"])
    report.numeric(f"{prefix} per-token CE", ours["ce"], r["ce"], relative=True)
    report.numeric(f"{prefix} velocity at mse_loss_indexes", out.velocity, c["velocity"])
    report.numeric(f"{prefix} per-element MSE", ours["mse"], r["mse"], relative=True)
    if r["det_logits"] is not None:
        report.numeric(f"{prefix} fake_cls_head logits", out.det_logits, r["det_logits"])


def compare_losses(report: Report, prefix: str, batch, ours: dict, r: dict, detection_kind: str) -> None:
    """Loss reductions: the reference's training loop (world size 1) applied to its own outputs, against
    our loss functions on ours. Loop formulas (Bagel ``train/pretrain_unified_navit.py``, UniGenDet
    ``train/pretrain_unified_navit_gduf.py``): ``ce.sum() / n_ce``, ``mse.mean(-1).sum() / n_mse``,
    ``nn.CrossEntropyLoss()(fake_predicted, label)`` with FakeClue labels (1 = real, 0 = fake)."""
    out = ours["out"]
    n_ce, n_mse = len(r["ce"]), len(r["mse"])
    report.numeric(f"{prefix} CE loss (reduced)", token_ce_loss(out.ce_logits, batch.ce_label_ids, n_ce),
                   r["ce"].sum() / n_ce, relative=True)
    report.numeric(f"{prefix} MSE loss (reduced)",
                   flow_matching_loss(out.velocity, ours["target"][batch.mse_token_mask], n_mse),
                   r["mse"].mean(dim=-1).sum() / n_mse, relative=True)
    if r["det_logits"] is not None:
        report.numeric(f"{prefix} detection loss (reduced, label mapping)",
                       detection_loss(out.det_logits, batch.det_labels, detection_kind, len(batch.det_labels)),
                       F.cross_entropy(r["det_logits"], r["label"]), relative=True)


def output_diff(ours: dict, r: dict) -> float:
    c, out = r["captured"], ours["out"]
    pairs = [(out.hidden, c["hidden"]), (out.ce_logits, c["ce_logits"]), (out.velocity, c["velocity"])]
    if r["det_logits"] is not None and out.det_logits is not None:
        pairs.append((out.det_logits, r["det_logits"]))
    return max(float((a - b).abs().max()) for a, b in pairs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="checkout of ByteDance-Seed/Bagel")
    p.add_argument("--unigendet-reference", type=Path, default=None, help="checkout of Zhangyr2022/UniGenDet")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the BAGEL-format directory (default: a temp dir)")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flex", "varlen"],
                   help="our LLM attention backend; 'varlen' is the flash-attn decomposition run with the "
                        "pure-PyTorch kernel (runs on CPU)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    cfg = tiny_model_config()
    report = Report(args.tolerance)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config validation chatter about Qwen's real bos/eos ids in a 512-token vocab

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            ckpt = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reference_parity_"))) / "BAGEL-tiny"
        else:
            ckpt = args.workdir
        ckpt.mkdir(parents=True, exist_ok=True)
        passed = run(args, cfg, ckpt, report)
    return 0 if passed else 1


def run(args, cfg: ModelConfig, ckpt: Path, report: Report) -> bool:
    # ---- checkpoint pieces that do not depend on the reference: configs, tokenizer, VAE
    (ckpt / "llm_config.json").write_text(json.dumps(llm_config_json(cfg), indent=2))
    (ckpt / "vit_config.json").write_text(json.dumps(vit_config_json(cfg), indent=2))
    tokenizer = build_tiny_tokenizer(CORPUS, vocab_size=cfg.llm.vocab_size)
    tokenizer.save_pretrained(str(ckpt))
    source_vae = random_vae(cfg, seed=args.seed + 3)
    source_vae.save_bfl(ckpt / "ae.safetensors")
    ours_special = special_token_ids(tokenizer)

    # ---- inputs shared by both sides
    inputs = make_inputs(tokenizer, cfg, args.seed)
    g = torch.Generator().manual_seed(args.seed + 11)
    x0 = source_vae.encode_list([s["vae"] for s in inputs.samples], generator=g)  # clean latents [16, 2h, 2w]
    x0_tokens = torch.cat([patchify_latent(z, cfg.latent_patch_size) for z in x0])
    noise = torch.randn(x0_tokens.shape, generator=g)
    probe = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    eps_seed = args.seed + 21
    probe_eps = torch.randn(2, cfg.vae.latent_channels, 4, 6, generator=torch.Generator().manual_seed(eps_seed))
    probe_latents = torch.randn(2, cfg.vae.latent_channels, 4, 6, generator=g)
    latents = {"x0": x0, "noise": noise, "vae_probe_images": probe, "vae_probe_eps": probe_eps, "vae_probe_latents": probe_latents}
    np_seed = args.seed + 5

    # ---- reference runs
    ref = import_reference(args.reference, unigendet=False)
    ref_special = ref.data_utils.add_special_tokens(tokenizer)[1]
    report.exact("tokenizer special ids (reference add_special_tokens vs ours)",
                 [ours_special.bos, ours_special.eos, ours_special.start_of_image, ours_special.end_of_image],
                 [ref_special["bos_token_id"], ref_special["eos_token_id"], ref_special["start_of_image"],
                  ref_special["end_of_image"]])
    refs = {"Bagel": run_reference(ref, cfg, ckpt, None, args.seed, inputs, ref_special, latents, np_seed)}
    state = refs["Bagel"]["state"]
    if args.unigendet_reference is not None:
        uref = import_reference(args.unigendet_reference, unigendet=True)
        refs["UniGenDet"] = run_reference(uref, cfg, ckpt, state, args.seed, inputs, ref_special, latents, np_seed)
        state = {**state, **refs["UniGenDet"]["extra_state"]}
    restore_globals()
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "ema.safetensors"))

    # ---- ours, loaded from the BAGEL-format directory
    model, vae, _ = load_bagel_checkpoint(ckpt, vae=to_dict(cfg.vae), max_latent_size=cfg.max_latent_size)
    model.eval()
    if args.attn_backend != "sdpa":
        from unigendet.ops.attention import (
            FlexAttention,
            VarlenAttention,
            reference_varlen_kernel,
        )

        backend = FlexAttention() if args.attn_backend == "flex" else VarlenAttention(kernel=reference_varlen_kernel)
        # The attention object is shared by every layer; swap it in place.
        model.attention = backend
        for layer in model.language_model.model.layers:
            layer.self_attn.attention = backend
    _, adapt = adapt_bagel_state_dict(state, model.config)
    for key, diff in adapt.pos_embed_max_diff.items():
        report.numeric(f"sin-cos table {key} (reference vs recomputed)", torch.tensor([diff]), torch.tensor([0.0]))

    ours_by_scenario = {}
    for name, text_dropout in SCENARIOS:
        builder = PackBuilder(ours_special, pack_geometry(model.config), CFGDropout(text_dropout, 0.0, 0.0))
        batch = builder.build(our_samples(inputs))
        for tag, r in refs.items():
            sc = r["scenarios"][name]
            compare_packs(report, f"[{name}] {tag} pack.", batch, sc["data"], sc["flex"], label_key=r["scenarios"][name]["det_logits"] is not None)
        first = refs["Bagel"]["scenarios"][name]
        t = torch.where(torch.isfinite(first["data"]["packed_timesteps"]), first["t"], torch.zeros_like(first["t"]))
        x_t, target = noised_latents(x0_tokens, t, noise)
        ours = our_forward(model, batch, x_t, t, target)
        ours_by_scenario[name] = (batch, x_t, t, target)
        for tag, r in refs.items():
            compare_outputs(report, f"[{name}] {tag}:", ours, r["scenarios"][name])
            compare_losses(report, f"[{name}] {tag}:", batch, ours, r["scenarios"][name], model.config.detection_loss)

    with torch.no_grad():
        report.numeric("VAE: posterior mean (scaled)", vae.encode(probe, sample=False), refs["Bagel"]["vae_mean"])
        report.numeric("VAE: posterior sample (shared eps)",
                       vae.encode(probe, generator=torch.Generator().manual_seed(eps_seed)), refs["Bagel"]["vae_sample"])
        report.numeric("VAE: decode", vae.decode(probe_latents), refs["Bagel"]["vae_decoded"])

    # ---- negative control: a 1e-3 shift of one of our parameters must be detected
    batch, x_t, t, target = ours_by_scenario["full"]
    last = list(refs.values())[-1]["scenarios"]["full"]
    params = dict(model.named_parameters())
    controls = []
    for name in NEGATIVE_CONTROL:
        if name not in params:
            continue
        with torch.no_grad():
            params[name].add_(NEGATIVE_DELTA)
            diff = output_diff(our_forward(model, batch, x_t, t, target), last)
            params[name].sub_(NEGATIVE_DELTA)
        controls.append((name, diff))
    baseline = output_diff(our_forward(model, batch, x_t, t, target), last)

    print(f"reference: {args.reference}" + (f" + {args.unigendet_reference}" if args.unigendet_reference else "")
          + f"; our attention backend: {args.attn_backend}")
    for name, _ in SCENARIOS:
        b = ours_by_scenario[name][0]
        print(f"pack [{name}]: {b.sequence_length} tokens, samples {b.sample_lens}, {len(b.vae_images)} VAE images, "
              f"{len(b.vit_seqlens)} ViT images, {b.ce_loss_indexes.numel()} CE, {b.mse_loss_indexes.numel()} MSE tokens")
    print(f"tolerance {args.tolerance:g} (fp32, CPU); columns: max |ours - reference|, max |reference|")
    report.print()
    print(f"negative control (+{NEGATIVE_DELTA:g} on one parameter of ours; max diff of hidden/logits/velocity/head, "
          f"unperturbed {baseline:.3e}):")
    controls_ok = True
    for name, diff in controls:
        detected = diff > args.tolerance
        controls_ok &= detected
        print(f"  {name:<64} {diff:10.3e}  {'detected' if detected else 'MISSED'}")
    passed = report.passed and controls_ok
    print("PASS" if passed else "FAIL")
    if args.json:
        print(json.dumps({"passed": passed, "tolerance": args.tolerance, "rows": report.rows,
                          "negative_control": dict(controls)}))
    return passed


if __name__ == "__main__":
    sys.exit(main())
