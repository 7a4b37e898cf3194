"""Qwen2 decoder with Mixture-of-Transformers experts over a packed token stream.

Each token is routed statically by type: text and ViT tokens to the understanding expert ("und"),
VAE latent tokens to the generation expert ("gen"). In the MoT layout every expert has its own
norms, q/k/v/o projections, per-head q/k RMSNorm and MLP; the attention softmax runs once over all
tokens of a sample. The SwiGLU MLP and RoPE are transformers' Qwen2 modules; RMSNorm is ``unigendet.ops``'
(the same function with a cheaper backward).

Parameter names follow BAGEL checkpoints: the gen copy of a module ``x`` is ``x_moe_gen``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from unigendet.models.config import LLMConfig
from unigendet.ops.elementwise import RMSNorm

GEN_SUFFIX = "_moe_gen"


@dataclass
class Routing:
    """Which packed positions belong to each expert. ``gen_index`` is None when every token is und."""

    length: int
    und_index: torch.Tensor | None
    gen_index: torch.Tensor | None

    @classmethod
    def from_gen_index(cls, length: int, gen_index: torch.Tensor | None, device: torch.device) -> "Routing":
        if gen_index is None or gen_index.numel() == 0:
            return cls(length, None, None)
        is_gen = torch.zeros(length, dtype=torch.bool, device=device)
        is_gen[gen_index] = True
        und_index = (~is_gen).nonzero(as_tuple=True)[0]
        return cls(length, und_index if und_index.numel() else torch.empty(0, dtype=torch.long, device=device), gen_index)

    @property
    def mixed(self) -> bool:
        return self.gen_index is not None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.mixed:
            return x, None
        return x[self.und_index], x[self.gen_index]

    def to(self, device: torch.device) -> "Routing":
        """The same routing with its index tensors on ``device`` (no copy for those already there)."""
        if not self.mixed:
            return self
        return Routing(self.length, self.und_index.to(device), self.gen_index.to(device))

    def merge(self, und: torch.Tensor, gen: torch.Tensor | None) -> torch.Tensor:
        if not self.mixed:
            return und
        out = und.new_empty((self.length, *und.shape[1:]))
        out[self.und_index] = und
        out[self.gen_index] = gen.to(und.dtype)
        return out


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, attention):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.attention = attention
        self.per_expert = cfg.layer_module == "mot"
        for suffix in ("", GEN_SUFFIX) if self.per_expert else ("",):
            self.add_module("q_proj" + suffix, nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True))
            self.add_module("k_proj" + suffix, nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True))
            self.add_module("v_proj" + suffix, nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True))
            self.add_module("o_proj" + suffix, nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False))
            if cfg.qk_norm:
                self.add_module("q_norm" + suffix, RMSNorm(self.head_dim, eps=cfg.rms_norm_eps))
                self.add_module("k_norm" + suffix, RMSNorm(self.head_dim, eps=cfg.rms_norm_eps))
        self.qk_norm = cfg.qk_norm

    def _suffix(self, expert: str) -> str:
        return GEN_SUFFIX if (expert == "gen" and self.per_expert) else ""

    def _qkv(self, x: torch.Tensor, expert: str):
        s = self._suffix(expert)
        n = x.shape[0]
        q = getattr(self, "q_proj" + s)(x).view(n, self.num_heads, self.head_dim)
        k = getattr(self, "k_proj" + s)(x).view(n, self.num_kv_heads, self.head_dim)
        v = getattr(self, "v_proj" + s)(x).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = getattr(self, "q_norm" + s)(q)
            k = getattr(self, "k_norm" + s)(k)
        return q, k, v

    def forward(self, und: torch.Tensor, gen: torch.Tensor | None, routing: Routing, cos, sin, attend):
        """``attend(q, k, v, scale=...)`` is the packed attention with its prepared masks in training, or
        a KV-cache attention at inference; everything else is shared by both paths."""
        qu, ku, vu = self._qkv(und, "und")
        if routing.mixed:
            qg, kg, vg = self._qkv(gen, "gen")
            q, k, v = routing.merge(qu, qg), routing.merge(ku, kg), routing.merge(vu, vg)
        else:
            q, k, v = qu, ku, vu
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        o = attend(q, k, v, scale=self.scale).reshape(routing.length, -1)
        o_und, o_gen = routing.split(o)
        out_und = self.o_proj(o_und)
        out_gen = getattr(self, "o_proj" + self._suffix("gen"))(o_gen) if routing.mixed else None
        return out_und, out_gen


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, hf_config, attention):
        super().__init__()
        mot = cfg.layer_module == "mot"
        experts_mlp = cfg.layer_module in ("mot", "moe")
        self.self_attn = MoTAttention(cfg, attention)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(hf_config)
        if mot:
            self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if experts_mlp:
            self.mlp_moe_gen = Qwen2MLP(hf_config)
        self.norm_suffix = GEN_SUFFIX if mot else ""
        self.mlp_suffix = GEN_SUFFIX if experts_mlp else ""

    def _gen(self, name: str, suffix: str) -> nn.Module:
        return getattr(self, name + suffix)

    def forward(self, hidden: torch.Tensor, routing: Routing, cos, sin, attend) -> torch.Tensor:
        """One layer on the packed residual stream ``hidden [L, D]`` -> ``[L, D]``."""
        return routing.merge(*self.forward_experts(*routing.split(hidden), routing, cos, sin, attend))

    def forward_experts(self, und: torch.Tensor, gen: torch.Tensor | None, routing: Routing, cos, sin, attend):
        """One layer on the residual stream kept split by expert (``und`` and ``gen`` rows of the pack, in
        ``routing``'s order) -> ``(und, gen)``. The decoder runs its layers this way, so that the stream is
        split once before the first layer and merged once after the last instead of in every layer."""
        und, gen = self.attention_experts(und, gen, routing, cos, sin, attend)
        return self.mlp_experts(und, gen, routing)

    def attention_experts(self, und: torch.Tensor, gen: torch.Tensor | None, routing: Routing, cos, sin, attend):
        """The layer's first half: each expert's normed input through the shared attention, added to its
        residual stream."""
        a_und = self.input_layernorm(und)
        a_gen = self._gen("input_layernorm", self.norm_suffix)(gen) if routing.mixed else None
        o_und, o_gen = self.self_attn(a_und, a_gen, routing, cos, sin, attend)
        return und + o_und, (gen + o_gen if routing.mixed else None)

    def mlp_experts(self, und: torch.Tensor, gen: torch.Tensor | None, routing: Routing):
        """The layer's second half: each expert's normed MLP added to its residual stream."""
        und = _residual_mlp(self.mlp, self.post_attention_layernorm, und)
        if routing.mixed:
            gen = _residual_mlp(self._gen("mlp", self.mlp_suffix),
                                self._gen("post_attention_layernorm", self.norm_suffix), gen)
        return und, gen

    def attention_block(self, hidden: torch.Tensor, routing: Routing, cos, sin, attend) -> torch.Tensor:
        """``attention_experts`` on the packed stream ``[L, D]``; ``mlp_block(attention_block(x))`` equals
        ``forward(x)``."""
        return routing.merge(*self.attention_experts(*routing.split(hidden), routing, cos, sin, attend))

    def mlp_block(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``mlp_experts`` on the packed stream ``[L, D]``."""
        return routing.merge(*self.mlp_experts(*routing.split(hidden), routing))


class MoTDecoder(nn.Module):
    """``embed_tokens``, decoder ``layers``, final norms (``norm`` for und, ``norm_moe_gen`` for gen)."""

    def __init__(self, cfg: LLMConfig, attention):
        super().__init__()
        hf_config = cfg.to_hf()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, hf_config, attention) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        if cfg.layer_module in ("mot", "moe"):
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(hf_config)
        self.activation_checkpointing = False
        # "layer": recompute whole layers in backward; "sublayer": the attention and MLP halves separately (each
        # keeps its input, twice the saved tensors, but backward recomputes only half a layer at a time);
        # "nested": keep only each layer's input like "layer", and let the layer's recomputation itself checkpoint
        # its halves, the MLP in token chunks (the lowest peak: a recomputed attention half or one MLP chunk,
        # for one extra forward of the attention half per layer).
        self.checkpoint_granularity = "layer"
        # Set by an inference device map (``unigendet.inference.device_map``): the device of each layer. The layer
        # loop then moves the residual stream and the per-token tensors to each layer's device, and to the final
        # norms' device at the end; None (a model on one device) skips those moves.
        self.layer_devices: list[torch.device] | None = None
        # "layer": the packed (training) path runs each layer's computation through torch.compile (see
        # ``_compiled_layer_functions``); "none": eager.
        self.compile_mode = "none"

    def set_compile(self, mode: str) -> None:
        """``"layer"``: compile each decoder layer's norms, projections, RoPE, MLPs and residual adds with
        torch.compile (one compiled graph shared by all layers, dynamic shapes; the attention call itself stays
        eager) in the packed forward; ``"none"``: run eagerly. The cached inference path is never compiled."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
        self.compile_mode = mode

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        routing: Routing,
        prepared=None,
        num_layers: int | None = None,
        capture_layer: int | None = None,
        attend=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``num_layers`` layers (all by default) on ``hidden [L, D]``; return the final-normed
        states and, if ``capture_layer`` is set, the residual stream after that many layers.

        Attention is the packed attention over ``prepared`` masks, unless ``attend(layer_index, q, k,
        v, scale=...)`` is given (the inference KV cache: ``hidden`` is then a query block at
        absolute RoPE ids ``position_ids``)."""
        cos, sin = self.rotary_emb(hidden, position_ids[None])
        cos, sin = cos[0], sin[0]
        captured = None
        depth = len(self.layers) if num_layers is None else num_layers
        # The residual stream stays split by expert through the layers (see ``MoTDecoderLayer.forward_experts``).
        und, gen = routing.split(hidden)
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        compiled = _compiled_layer_functions() if self.compile_mode == "layer" and attend is None else None
        for i, layer in enumerate(self.layers[:depth]):
            if self.layer_devices is not None:
                und, gen, routing, cos, sin = _to_device(self.layer_devices[i], und, gen, routing, cos, sin)
            if attend is None:
                layer_attend = functools.partial(layer.self_attn.attention, prepared=prepared)
            else:
                layer_attend = functools.partial(attend, i)
            if compiled is None:
                run = {name: getattr(layer, name) for name in _LAYER_FUNCTIONS}
            else:
                # The attention's per-sample loop over the pack's own layout stays out of the graph (one graph
                # for every pack); the layer module is an argument, so all layers share the compiled code.
                layer_attend = torch.compiler.disable(layer_attend)
                run = {name: functools.partial(fn, layer) for name, fn in compiled.items()}
            if checkpointing and self.checkpoint_granularity == "nested":
                und, gen = checkpoint(_nested_layer, layer, run["attention_experts"], und, gen, routing, cos, sin,
                                      layer_attend, use_reentrant=False)
            elif checkpointing and self.checkpoint_granularity == "sublayer":
                und, gen = checkpoint(run["attention_experts"], und, gen, routing, cos, sin, layer_attend,
                                      use_reentrant=False)
                und, gen = checkpoint(run["mlp_experts"], und, gen, routing, use_reentrant=False)
            elif checkpointing:
                und, gen = checkpoint(run["forward_experts"], und, gen, routing, cos, sin, layer_attend,
                                      use_reentrant=False)
            else:
                und, gen = run["forward_experts"](und, gen, routing, cos, sin, layer_attend)
            if capture_layer is not None and i + 1 == capture_layer:
                captured = routing.merge(und, gen)
        if self.layer_devices is not None:
            und, gen, routing, cos, sin = _to_device(self.norm.weight.device, und, gen, routing, cos, sin)
        gen_norm = getattr(self, "norm_moe_gen", self.norm)
        return routing.merge(self.norm(und), gen_norm(gen) if routing.mixed else None), captured


COMPILE_MODES = ("none", "layer")
CHECKPOINT_GRANULARITIES = ("layer", "sublayer", "nested")
# Tokens per MLP chunk under "nested" checkpointing: the MLP is token-wise, so its recomputation (and its
# intermediate activations, the widest of a layer) can run a slice of the pack at a time.
NESTED_MLP_CHUNK_TOKENS = 1024


def _nested_layer(layer: "MoTDecoderLayer", attention_experts, und: torch.Tensor, gen: torch.Tensor | None,
                  routing: Routing, cos, sin, attend):
    """One decoder layer whose halves are checkpointed inside the layer's own checkpoint: when backward
    recomputes the layer, only the attention half's output is kept, and each half is recomputed again on its
    own (the MLP half in token chunks of each expert). ``attention_experts`` is the layer's attention half
    (eager or compiled)."""
    und, gen = checkpoint(attention_experts, und, gen, routing, cos, sin, attend, use_reentrant=False)
    und = _chunked_residual_mlp(layer.mlp, layer.post_attention_layernorm, und)
    if routing.mixed:
        gen = _chunked_residual_mlp(layer._gen("mlp", layer.mlp_suffix),
                                    layer._gen("post_attention_layernorm", layer.norm_suffix), gen)
    return und, gen


def _residual_mlp(mlp: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + mlp(norm(x))


def _chunked_residual_mlp(mlp: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + mlp(norm(x))``, each chunk of tokens checkpointed on its own."""
    chunks = [checkpoint(_residual_mlp, mlp, norm, part, use_reentrant=False)
              for part in x.split(NESTED_MLP_CHUNK_TOKENS)]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
_LAYER_FUNCTIONS = ("forward_experts", "attention_experts", "mlp_experts")


@functools.cache
def _compiled_layer_functions() -> dict:
    """torch.compile'd ``MoTDecoderLayer`` methods taking the layer as first argument, built once per process
    (compilation itself happens at the first call, per input signature)."""
    return {name: torch.compile(getattr(MoTDecoderLayer, name), dynamic=True) for name in _LAYER_FUNCTIONS}


def _to_device(device: torch.device, und: torch.Tensor, gen: torch.Tensor | None, routing: Routing,
               cos: torch.Tensor, sin: torch.Tensor):
    """What a decoder layer reads, on ``device`` (a split model's hop between devices; a no-op on one device)."""
    gen = gen.to(device) if gen is not None else None
    return und.to(device), gen, routing.to(device), cos.to(device), sin.to(device)


class MoTLanguageModel(nn.Module):
    """``model`` (decoder) + ``lm_head`` — the ``language_model.*`` subtree of BAGEL checkpoints."""

    def __init__(self, cfg: LLMConfig, attention):
        super().__init__()
        self.model = MoTDecoder(cfg, attention)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
