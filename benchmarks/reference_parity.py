"""Numerical parity of our model with the official BAGEL / UniGenDet code (training forward, fp32, CPU).

    python benchmarks/reference_parity.py --reference /tmp/ref_bagel [--unigendet-reference /tmp/ref_unigendet]

``--reference`` is a checkout of github.com/ByteDance-Seed/Bagel and ``--unigendet-reference`` one of
github.com/Zhangyr2022/UniGenDet. Their code is imported from those paths at run time; nothing of it is
copied into this repository.

What happens:

1. The reference ``Bagel`` (Qwen2 MoT LLM with qk-norm, SigLIP NaViT, connector, time embedder,
   vae2llm/llm2vae, sin-cos tables) is built exactly as ``train/pretrain_unified_navit.py`` builds it
   (``finetune_from_hf`` path: configs read from ``llm_config.json`` / ``vit_config.json``), at the
   geometry of ``configs/model/tiny.yaml``. Every parameter is then redrawn from a seeded generator
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
   ``--tolerance`` (default 1e-5).

Runtime patches applied to the reference (each one only makes its CUDA/bf16 code run on CPU in fp32 or
bridges a transformers 4.x -> 5.x API change; none changes the math of the training forward):

* ``flash_attn``: a stub module whose ``flash_attn_varlen_func`` is a pure-PyTorch varlen attention
  (per-segment SDPA, default scale, bottom-right causal). Only the SigLIP encoder calls it in training.
* ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["default"]``: transformers 5 removed the
  entry; the transformers 4.x function is re-added verbatim.
* ``Qwen2Config.pad_token_id = None``: transformers 4.x's ``PretrainedConfig`` default, gone in 5.x
  (the reference reads it for ``nn.Embedding(padding_idx=...)``).
* ``torch.bfloat16`` seen by ``modeling/bagel/qwen2_navit.py`` and ``modeling/bagel/siglip_navit.py``
  is ``torch.float32``: their training path hard-casts q/k/v and the mask to bf16 before SDPA /
  flash-attn (design doc §9: the reference was run in fp32).
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
import math
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
sys.path.insert(0, str(REPO / "tests"))  # bfl_layout.write_bfl_vae: writes a tiny VAE in the BFL layout

from safetensors.torch import save_file  # noqa: E402

from unigendet.checkpoint.bagel import adapt_bagel_state_dict, load_bagel_checkpoint  # noqa: E402
from unigendet.config.loader import load_config, to_dict  # noqa: E402
from unigendet.data.packing import (  # noqa: E402
    LABEL_FAKE,
    LABEL_REAL,
    PackBuilder,
    detection_sample,
    text_to_image_sample,
)
from unigendet.data.synthetic import pack_geometry  # noqa: E402
from unigendet.data.tokenizer import build_tiny_tokenizer, encode_text, special_token_ids  # noqa: E402
from unigendet.data.transforms import patchify_latent  # noqa: E402
from unigendet.losses import noised_latents  # noqa: E402
from unigendet.models.config import ModelConfig, VAEConfig  # noqa: E402
from unigendet.models.vae import FluxVAE  # noqa: E402
from unigendet.ops.attention import dense_mask  # noqa: E402

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


def _purge_reference_modules() -> None:
    for name in list(sys.modules):
        if name in ("modeling", "data") or name.startswith(("modeling.", "data.")):
            del sys.modules[name]


class Reference(types.SimpleNamespace):
    """Handles to one imported reference tree."""


def import_reference(root: Path, unigendet: bool) -> Reference:
    """Import ``modeling`` / ``data`` from ``root`` with the runtime patches of the module docstring."""
    root = root.resolve()
    if not (root / "modeling" / "bagel" / "bagel.py").is_file():
        raise SystemExit(f"{root} does not look like a Bagel/UniGenDet checkout (no modeling/bagel/bagel.py)")
    import transformers.modeling_utils  # noqa: F401  (import transformers before a spec-less stub exists)
    from transformers import modeling_rope_utils

    sys.modules["flash_attn"] = _stub("flash_attn", flash_attn_varlen_func=_varlen_attention)
    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", _default_rope_init)

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


# ==================================================================================================
# Data


class Inputs(types.SimpleNamespace):
    pass


def make_inputs(tokenizer, cfg: ModelConfig, seed: int) -> Inputs:
    """Token ids and images of the four samples (detection fake, t2i, detection real, t2i)."""
    g = torch.Generator().manual_seed(seed)

    def img(h, w):
        return torch.rand(3, h, w, generator=g) * 2 - 1

    ids = lambda text: encode_text(tokenizer, text)  # noqa: E731
    question = ids("\nIs this image real or fake? Explain.")
    return Inputs(
        samples=[
            dict(kind="det", vae=img(64, 48), vit=img(56, 42), question=question, label=LABEL_FAKE,
                 answer=ids("This is a fake image. The fur texture is smeared and the shadows disagree.")),
            dict(kind="t2i", vae=img(48, 48), caption=ids("a photo of a cat on a red sofa")),
            dict(kind="det", vae=img(48, 64), vit=img(42, 56), question=question, label=LABEL_REAL,
                 answer=ids("This is a real image. Lighting and perspective are consistent.")),
            dict(kind="t2i", vae=img(32, 64), caption=ids("a watercolor painting of mountains at dawn")),
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
            out.append(dict(
                image_tensor_list=[s["vae"], s["vit"]],  # Bagel: one list in plan order
                vit_image_tensor_list=[s["vit"]],
                gen_image_tensor_list=[s["vae"]],
                text_ids_list=[list(s["question"]), list(s["answer"])],
                sequence_plan=[item("vae_image", 0), item("vit_image", 0), item("text", 0), item("text", 1)],
                data_indexes={"data_indexes": [i], "worker_id": 0, "dataset_name": "vlm_sft"},
                # FakeClue convention: 1 = real, 0 = fake.
                label=1 if s["label"] == LABEL_REAL else 0,
            ))
        else:
            out.append(dict(
                image_tensor_list=[s["vae"]],
                gen_image_tensor_list=[s["vae"]],
                text_ids_list=[list(s["caption"])],
                sequence_plan=[item("text", 0, enable_cfg=1), item("vae_image", 1)],
                data_indexes={"data_indexes": [i], "worker_id": 0, "dataset_name": "t2i_pretrain"},
                generation_auth_explanation_list=["response"],
                gt_vit_list=[None],
                gt_prompt_list=["caption"],
            ))
    return out


def reference_pack(ref: Reference, inputs: Inputs, cfg: ModelConfig, special: dict, use_flex: bool, np_seed: int) -> dict:
    """Run the reference's ``PackedDataset.pack_sequence`` + ``to_tensor`` on our samples."""
    PD = ref.dataset_base.PackedDataset
    ds = PD.__new__(PD)  # skip __init__: it builds the real datasets from YAML / parquet files
    ds.data_config = ref.dataset_base.DataConfig(
        grouped_datasets={},
        text_cond_dropout_prob=0.0,  # no CFG dropout: ours runs with CFGDropout(0, 0, 0)
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
        self.notes: list[str] = []

    def numeric(self, name: str, ours: torch.Tensor | None, theirs: torch.Tensor | None, tolerance: float | None = None):
        tol = self.tolerance if tolerance is None else tolerance
        if ours is None or theirs is None:
            self.rows.append(dict(name=name, diff=None, scale=None, ok=False, detail="missing output"))
            return
        ours, theirs = ours.detach().float(), theirs.detach().float()
        if ours.shape != theirs.shape:
            self.rows.append(dict(name=name, diff=None, scale=None, ok=False,
                                  detail=f"shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"))
            return
        finite = torch.isfinite(theirs)
        same_inf = bool(torch.equal(finite, torch.isfinite(ours)))
        diff = float((ours[finite] - theirs[finite]).abs().max()) if finite.any() else 0.0
        scale = float(theirs[finite].abs().max()) if finite.any() else 0.0
        ok = same_inf and diff <= tol
        self.rows.append(dict(name=name, diff=diff, scale=scale, ok=ok, detail=f"shape {tuple(ours.shape)}"))

    def exact(self, name: str, ours, theirs):
        if isinstance(ours, torch.Tensor) or isinstance(theirs, torch.Tensor):
            ours_t, theirs_t = torch.as_tensor(ours), torch.as_tensor(theirs)
            ok = ours_t.shape == theirs_t.shape and bool(torch.equal(ours_t.to(theirs_t.dtype), theirs_t))
            detail = "" if ok else f"ours {ours_t.tolist()} vs reference {theirs_t.tolist()}"
        else:
            ok = ours == theirs
            detail = "" if ok else f"ours {ours!r} vs reference {theirs!r}"
        self.rows.append(dict(name=name, diff=None, scale=None, ok=ok, detail=detail[:400]))

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
        for n in self.notes:
            print(f"  note: {n}")


def compare_packs(report: Report, batch, ref_data: dict, ref_flex: dict, label_key: bool) -> None:
    """Field-by-field comparison of our PackedBatch with the reference's packed dict."""
    report.exact("pack.sequence_length", batch.sequence_length, ref_data["sequence_length"])
    report.exact("pack.sample_lens", list(batch.sample_lens), list(ref_data["sample_lens"]))
    # flex mode appends one padding pseudo-split/sample of length max_num_tokens - L (0 here).
    report.exact("pack.split_lens", list(batch.split_lens), list(ref_flex["split_lens"][:-1]))
    report.exact("pack.attn_modes", list(batch.attn_modes), list(ref_flex["attn_modes"][:-1]))
    report.exact("pack.position_ids", batch.position_ids, ref_data["packed_position_ids"])
    report.exact("pack.text_ids", batch.text_ids, ref_data["packed_text_ids"])
    report.exact("pack.text_indexes", batch.text_indexes, ref_data["packed_text_indexes"])
    report.exact("pack.vit_tokens", batch.vit_tokens, ref_data["packed_vit_tokens"])
    report.exact("pack.vit_position_ids", batch.vit_position_ids, ref_data["packed_vit_position_ids"])
    report.exact("pack.vit_token_indexes", batch.vit_token_indexes, ref_data["packed_vit_token_indexes"])
    report.exact("pack.vit_seqlens", batch.vit_seqlens, ref_data["vit_token_seqlens"])
    report.exact("pack.latent_shapes", [tuple(s) for s in batch.latent_shapes],
                 [tuple(s) for s in ref_data["patchified_vae_latent_shapes"]])
    report.exact("pack.latent_position_ids", batch.latent_position_ids, ref_data["packed_latent_position_ids"])
    report.exact("pack.vae_token_indexes", batch.vae_token_indexes, ref_data["packed_vae_token_indexes"])
    report.exact("pack.noised tokens (timestep finite)", batch.mse_token_mask,
                 torch.isfinite(ref_data["packed_timesteps"]))
    report.exact("pack.mse_loss_indexes", batch.mse_loss_indexes, ref_data["mse_loss_indexes"])
    report.exact("pack.ce_loss_indexes", batch.ce_loss_indexes, ref_data["ce_loss_indexes"])
    report.exact("pack.ce_label_ids", batch.ce_label_ids, ref_data["packed_label_ids"])
    # The reference zero-pads its VAE images to the batch maximum; crop them back and compare.
    padded = ref_data["padded_images"]
    same_images = len(batch.vae_images) == padded.shape[0] and all(
        torch.equal(padded[i, :, : img.shape[1], : img.shape[2]], img) for i, img in enumerate(batch.vae_images)
    )
    report.exact("pack.vae_images (reference padded, cropped)", same_images, True)
    # Attention: the reference's per-sample float masks (0 / -inf) against our rule.
    ours_mask = dense_mask(batch.layout)
    start, same = 0, True
    for n, m in zip(batch.sample_lens, ref_data["nested_attention_masks"]):
        same &= bool(torch.equal(ours_mask[start : start + n, start : start + n], m == 0))
        start += n
    report.exact("pack.attention masks (per sample)", same, True)
    # Detection head rows: UniGenDet reads the first index of each run of consecutive CE positions.
    ce = ref_data["ce_loss_indexes"].tolist()
    runs = [ce[0]] + [ce[i] for i in range(1, len(ce)) if ce[i] - ce[i - 1] != 1] if ce else []
    report.exact("pack.det_indexes (first CE index of each run)", batch.det_indexes.tolist(), runs)
    if label_key:
        # UniGenDet packs FakeClue labels (1 = real, 0 = fake); ours are 1 = fake, 0 = real.
        report.exact("pack.det_labels (FakeClue 1=real -> ours 1=fake)", batch.det_labels, 1 - ref_data["label"])


# ==================================================================================================
# Main


def run_reference(ref: Reference, cfg: ModelConfig, ckpt: Path, state: dict | None, seed: int,
                  inputs: Inputs, special: dict, latents: dict, np_seed: int) -> dict:
    """Build (or load) the reference model, pack, run the training forward; return everything needed."""
    model = build_reference_model(ref, ckpt, cfg)
    if state is None:
        randomize(model, seed)
        extra_state = {}
    else:
        # Same weights as the Bagel run; UniGenDet's extra modules get their own seeded values.
        result = model.load_state_dict(state, strict=False)
        extra = sorted({k.split(".")[0] for k in result.missing_keys})
        if result.unexpected_keys or extra not in ([], ["fake_cls_head", "latent_to_vit_connector"],
                                                    ["fake_cls_head"], ["latent_to_vit_connector"]):
            raise RuntimeError(f"unexpected key mismatch loading the Bagel weights: {result}")
        for name in extra:
            randomize(getattr(model, name), seed + 1000 + len(name), prefix=name + ".")
        extra_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.split(".")[0] in extra}
    model.train()  # the training forward (forward_train) is the path under test; dropout is 0 everywhere

    data = reference_pack(ref, inputs, cfg, special, use_flex=False, np_seed=np_seed)
    flex = reference_pack(ref, inputs, cfg, special, use_flex=True, np_seed=np_seed)

    # Flow inputs: the reference's own timestep draws; the clean latents zero-padded as its loop feeds them.
    z = data["packed_timesteps"]
    x0 = latents["x0"]
    shapes = [tuple(int(v) for v in lat.shape) for lat in x0]
    max_c, max_h, max_w = (max(s[i] for s in shapes) for i in range(3))
    padded_latent = torch.zeros(len(x0), max_c, max_h, max_w)
    for i, lat in enumerate(x0):
        padded_latent[i, :, : lat.shape[1], : lat.shape[2]] = lat

    kwargs = {k: v for k, v in data.items() if k not in (
        "padded_images", "ce_loss_weights", "batch_data_indexes", "label",
        "generation_auth_explanation_list", "gt_vit_list", "gt_prompt_list")}
    kwargs["padded_latent"] = padded_latent

    captured = {}
    hooks = [
        model.language_model.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("inputs_embeds", kw["packed_sequence"].clone()), with_kwargs=True),
        model.language_model.model.register_forward_hook(lambda m, a, o: captured.__setitem__("hidden", o)),
        model.language_model.lm_head.register_forward_hook(lambda m, a, o: captured.__setitem__("ce_logits", o)),
        model.llm2vae.register_forward_hook(lambda m, a, o: captured.__setitem__("velocity", o)),
        model.vit_model.register_forward_hook(lambda m, a, o: captured.__setitem__("vit", o)),
    ]
    with torch.no_grad(), fixed_randn_like(latents["noise"]):
        out = model(**kwargs)
    for h in hooks:
        h.remove()
    if ref.unigendet:
        losses, det_logits = out
    else:
        losses, det_logits = out, None

    # The reference VAE on the same ae.safetensors: posterior mean, posterior sample, decode.
    vae = ref.autoencoder.AutoEncoder(ref_vae_params(ref, cfg.vae))
    from safetensors.torch import load_file

    missing, unexpected = vae.load_state_dict(load_file(str(ckpt / "ae.safetensors")), strict=True)
    vae.eval()
    with torch.no_grad():
        img = latents["vae_probe_images"]
        vae.reg.sample = False
        mean = vae.encode(img)
        vae.reg.sample = True
        with fixed_randn_like(latents["vae_probe_eps"]):
            sample = vae.encode(img)
        decoded = vae.decode(latents["vae_probe_latents"])

    return dict(
        state={k: v.detach().clone() for k, v in model.state_dict().items()} if state is None else None,
        extra_state=extra_state,
        data=data,
        flex=flex,
        timesteps_t=torch.sigmoid(z),  # the reference's t (timestep_shift = 1 is the identity)
        captured=captured,
        ce=losses["ce"],
        mse=losses["mse"],
        det_logits=det_logits,
        vae_mean=mean,
        vae_sample=sample,
        vae_decoded=decoded,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path, help="checkout of ByteDance-Seed/Bagel")
    p.add_argument("--unigendet-reference", type=Path, default=None, help="checkout of Zhangyr2022/UniGenDet")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the BAGEL-format directory (default: a temp dir)")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    cfg = tiny_model_config()
    report = Report(args.tolerance)

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="reference_parity_")
        ckpt = Path(tmp.name) / "BAGEL-tiny"
    else:
        ckpt = args.workdir
    ckpt.mkdir(parents=True, exist_ok=True)

    # ---- checkpoint pieces that do not depend on the reference: configs, tokenizer, VAE
    (ckpt / "llm_config.json").write_text(json.dumps(llm_config_json(cfg), indent=2))
    (ckpt / "vit_config.json").write_text(json.dumps(vit_config_json(cfg), indent=2))
    tokenizer = build_tiny_tokenizer(CORPUS, vocab_size=cfg.llm.vocab_size)
    tokenizer.save_pretrained(str(ckpt))
    from bfl_layout import write_bfl_vae

    source_vae = write_bfl_vae(ckpt / "ae.safetensors", cfg.vae, seed=args.seed + 3)
    ours_special = special_token_ids(tokenizer)

    # ---- inputs shared by both sides
    inputs = make_inputs(tokenizer, cfg, args.seed)
    g = torch.Generator().manual_seed(args.seed + 11)
    vae_images = [s["vae"] for s in inputs.samples]
    x0 = source_vae.encode_list(vae_images, generator=g)  # clean latents [16, 2h, 2w], one per VAE image
    x0_tokens = torch.cat([patchify_latent(z, cfg.latent_patch_size) for z in x0])
    noise = torch.randn(x0_tokens.shape, generator=g)
    probe = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    probe_eps = torch.randn(2, cfg.vae.latent_channels, 4, 6, generator=torch.Generator().manual_seed(args.seed + 21))
    probe_latents = torch.randn(2, cfg.vae.latent_channels, 4, 6, generator=g)
    latents = dict(x0=x0, noise=noise, vae_probe_images=probe, vae_probe_eps=probe_eps, vae_probe_latents=probe_latents)
    np_seed = args.seed + 5

    # ---- reference runs
    ref = import_reference(args.reference, unigendet=False)
    ref_special = ref.data_utils.add_special_tokens(tokenizer)[1]
    report.exact("tokenizer special ids (reference add_special_tokens vs ours)",
                 [ours_special.bos, ours_special.eos, ours_special.start_of_image, ours_special.end_of_image],
                 [ref_special["bos_token_id"], ref_special["eos_token_id"], ref_special["start_of_image"], ref_special["end_of_image"]])
    bagel = run_reference(ref, cfg, ckpt, None, args.seed, inputs, ref_special, latents, np_seed)
    state = bagel["state"]
    uni = None
    if args.unigendet_reference is not None:
        uref = import_reference(args.unigendet_reference, unigendet=True)
        uni = run_reference(uref, cfg, ckpt, state, args.seed, inputs, ref_special, latents, np_seed)
        state = {**state, **uni["extra_state"]}
    _purge_reference_modules()

    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "ema.safetensors"))

    # ---- ours
    model, vae, _ = load_bagel_checkpoint(ckpt, vae=to_dict(cfg.vae), max_latent_size=cfg.max_latent_size)
    model.eval()
    _, adapt = adapt_bagel_state_dict(state, model.config)
    for key, diff in adapt.pos_embed_max_diff.items():
        report.numeric(f"sin-cos table {key} (reference vs recomputed)", torch.tensor([diff]), torch.tensor([0.0]))

    builder = PackBuilder(ours_special, pack_geometry(model.config))
    batch = builder.build(our_samples(inputs))
    compare_packs(report, batch, bagel["data"], bagel["flex"], label_key=False)
    if uni is not None:
        compare_packs(report, batch, uni["data"], uni["flex"], label_key=True)
        # Do the two references pack identically? (UniGenDet's pack_sequence is a modified copy.)
        report.exact("pack.Bagel vs UniGenDet packed_position_ids", uni["data"]["packed_position_ids"], bagel["data"]["packed_position_ids"])

    t = bagel["timesteps_t"]
    t_tok = torch.where(torch.isfinite(bagel["data"]["packed_timesteps"]), t, torch.zeros_like(t))
    x_t, target = noised_latents(x0_tokens, t_tok, noise)
    with torch.no_grad():
        out = model(batch, x_t, t_tok)
        embeds = model.embed(batch, x_t, t_tok)
        vit = model.vit_model(batch.vit_tokens, batch.vit_position_ids, batch.vit_seqlens)

    ce_ours = F.cross_entropy(out.ce_logits, batch.ce_label_ids, reduction="none")
    mse_ours = (out.velocity - target[batch.mse_token_mask]) ** 2
    for tag, r in (("Bagel", bagel), ("UniGenDet", uni)):
        if r is None:
            continue
        c = r["captured"]
        report.numeric(f"{tag}: input embeddings [L, D]", embeds, c["inputs_embeds"])
        report.numeric(f"{tag}: ViT features (post_layernorm)", vit, c["vit"])
        report.numeric(f"{tag}: final hidden states [L, D]", out.hidden, c["hidden"])
        report.numeric(f"{tag}: CE logits at ce_loss_indexes", out.ce_logits, c["ce_logits"])
        report.numeric(f"{tag}: per-token CE", ce_ours, r["ce"])
        report.numeric(f"{tag}: velocity at mse_loss_indexes", out.velocity, c["velocity"])
        report.numeric(f"{tag}: per-element MSE", mse_ours, r["mse"])
        if r["det_logits"] is not None:
            report.numeric(f"{tag}: fake_cls_head logits", out.det_logits, r["det_logits"])

    with torch.no_grad():
        report.numeric("VAE: posterior mean (scaled)", vae.encode(probe, sample=False), bagel["vae_mean"])
        report.numeric("VAE: posterior sample (shared eps)",
                       vae.encode(probe, generator=torch.Generator().manual_seed(args.seed + 21)), bagel["vae_sample"])
        report.numeric("VAE: decode", vae.decode(probe_latents), bagel["vae_decoded"])

    print(f"reference: {args.reference}" + (f" + {args.unigendet_reference}" if args.unigendet_reference else ""))
    print(f"pack: {batch.sequence_length} tokens, samples {batch.sample_lens}, {len(batch.vae_images)} VAE images, "
          f"{len(batch.vit_seqlens)} ViT images, {batch.ce_loss_indexes.numel()} CE, {batch.mse_loss_indexes.numel()} MSE tokens")
    print(f"tolerance {args.tolerance:g} (fp32, CPU); columns: max |ours - reference|, max |reference|")
    report.print()
    print("PASS" if report.passed else "FAIL")
    if args.json:
        print(json.dumps({"passed": report.passed, "tolerance": args.tolerance, "rows": report.rows}))
    if tmp is not None:
        tmp.cleanup()
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
