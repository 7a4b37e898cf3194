"""The tiny UniGenDet model on mixed packs: losses, gradient routing, freezing, isolation of
samples, backend agreement and save/load."""

import functools

import pytest
import torch
from helpers import builder, det_sample, t2i_sample, tiny_config

from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE
from unigendet.objectives import GDUFLossConfig, GDUFObjective, prepare_latents


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = UniGenDet(cfg)
    # llm2vae is zero at fresh init (as in BAGEL), which would block every gradient into the gen
    # expert on the first step; give it weights so gradient routing can be observed.
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    return model


def _vae(cfg, seed=0):
    torch.manual_seed(seed)
    return FluxVAE(cfg.vae)


def _objective(cfg, vae, **loss):
    return GDUFObjective(GDUFLossConfig(**loss), vae, cfg.latent_patch_size, cfg.detection_loss)


def _expert_grads(model, suffix_gen: bool):
    grads = []
    for name, p in model.language_model.model.layers.named_parameters():
        if ("_moe_gen" in name) == suffix_gen:
            grads.append(p.grad)
    return grads


def _nonzero(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_mixed_pack_forward_backward(cfg, mixed_samples):
    model, vae = _model(cfg), _vae(cfg)
    batch = builder(cfg).build(mixed_samples)
    loss, metrics = _objective(cfg, vae)(model, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    for key in ("ce", "mse", "det"):
        assert torch.isfinite(metrics[key]) and metrics[key] > 0
    loss.backward()
    assert _nonzero(_expert_grads(model, suffix_gen=False))
    assert _nonzero(_expert_grads(model, suffix_gen=True))
    assert model.vit_model.vision_model.embeddings.patch_embedding.weight.grad is not None
    assert model.detection_head[1].weight.grad.abs().sum() > 0


def test_detection_loss_trains_und_expert_and_mse_trains_gen_expert(cfg, gen):
    model, vae = _model(cfg), _vae(cfg)
    det_batch = builder(cfg).build([det_sample(gen, smsa=False)])
    loss, _ = _objective(cfg, vae, ce_weight=0.0, mse_weight=0.0, det_weight=1.0)(model, det_batch)
    loss.backward()
    assert _nonzero(_expert_grads(model, suffix_gen=False))
    # Without the VAE block no token is routed to the gen expert.
    assert not _nonzero(_expert_grads(model, suffix_gen=True))

    model.zero_grad(set_to_none=True)
    t2i_batch = builder(cfg).build([t2i_sample(gen)])
    loss, metrics = _objective(cfg, vae, ce_weight=0.0, det_weight=0.0)(model, t2i_batch)
    assert set(metrics) == {"mse", "loss"}
    loss.backward()
    gen_grads = _expert_grads(model, suffix_gen=True)
    assert all(g is not None and g.abs().sum() > 0 for g in gen_grads if g is not None) and _nonzero(gen_grads)
    # The caption tokens reach the loss only through attention keys/values of the und expert.
    und_attn = [p.grad for n, p in model.language_model.model.layers.named_parameters()
                if "_moe_gen" not in n and ("k_proj" in n or "v_proj" in n)]
    assert _nonzero(und_attn)


def test_frozen_modules_receive_no_gradient(cfg, mixed_samples):
    model, vae = _model(cfg), _vae(cfg)
    model.vit_model.requires_grad_(False)
    model.language_model.model.embed_tokens.requires_grad_(False)
    batch = builder(cfg).build(mixed_samples)
    loss, _ = _objective(cfg, vae)(model, batch)
    loss.backward()
    assert all(p.grad is None for p in model.vit_model.parameters())
    assert model.language_model.model.embed_tokens.weight.grad is None
    assert all(p.grad is None for p in vae.parameters())
    assert model.connector.fc1.weight.grad is not None


def _latents(cfg, vae, batch, seed=0):
    return prepare_latents(batch, vae, cfg.latent_patch_size, torch.Generator().manual_seed(seed))


def _forward(model, cfg, vae, samples, seed=0):
    batch = builder(cfg).build(samples)
    lat = _latents(cfg, vae, batch, seed)
    with torch.no_grad():
        out = model(batch, lat.tokens if lat else None, lat.timesteps if lat else None)
    return batch, out


def test_packing_two_samples_equals_running_each_alone(cfg, gen):
    model, vae = _model(cfg).eval(), _vae(cfg)
    a, b = det_sample(gen), t2i_sample(gen, (48, 16))
    # Same latent inputs for both runs: encode once with a fixed generator per sample.
    batch_a, out_a = _forward(model, cfg, vae, [a], seed=1)
    batch_b, out_b = _forward(model, cfg, vae, [b], seed=2)
    batch_ab = builder(cfg).build([a, b])
    lat_a, lat_b = _latents(cfg, vae, batch_a, 1), _latents(cfg, vae, batch_b, 2)
    with torch.no_grad():
        out_ab = model(batch_ab, torch.cat([lat_a.tokens, lat_b.tokens]), torch.cat([lat_a.timesteps, lat_b.timesteps]))
    n_a = batch_a.sequence_length
    torch.testing.assert_close(out_ab.hidden[:n_a], out_a.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_ab.hidden[n_a:], out_b.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_ab.det_logits, out_a.det_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_ab.velocity, out_b.velocity, atol=1e-5, rtol=1e-5)


def test_noised_latents_do_not_leak_into_later_tokens(cfg, gen):
    """Changing a noised image's latents changes its own block but no token after it."""
    from unigendet.data.packing import TextItem, VAEImage

    model, vae = _model(cfg).eval(), _vae(cfg)
    items = [TextItem([1, 2, 3]), VAEImage(torch.zeros(3, 32, 32), noised=True), TextItem([4, 5, 6], loss=True)]
    batch = builder(cfg).build([items])
    lat = _latents(cfg, vae, batch)
    with torch.no_grad():
        base = model(batch, lat.tokens, lat.timesteps).hidden
        other = model(batch, lat.tokens + 1.0, lat.timesteps).hidden
    block_end = 5 + 4 + 2
    assert not torch.allclose(base[6:10], other[6:10])
    torch.testing.assert_close(base[block_end:], other[block_end:])
    torch.testing.assert_close(base[:5], other[:5])


def test_sdpa_and_flex_give_the_same_outputs(cfg, mixed_samples):
    sdpa = _model(cfg).eval()
    flex = UniGenDet(tiny_config(attn_backend="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    vae = _vae(cfg)
    batch = builder(cfg).build(mixed_samples)
    lat = _latents(cfg, vae, batch)
    with torch.no_grad():
        a = sdpa(batch, lat.tokens, lat.timesteps)
        b = flex(batch, lat.tokens, lat.timesteps)
    for x, y in ((a.hidden, b.hidden), (a.ce_logits, b.ce_logits), (a.velocity, b.velocity), (a.det_logits, b.det_logits)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_varlen_decomposition_gives_the_same_outputs(cfg, mixed_samples):
    from unigendet.ops.attention import VarlenAttention, reference_varlen_kernel

    model = _model(cfg).eval()
    vae = _vae(cfg)
    batch = builder(cfg).build(mixed_samples)
    lat = _latents(cfg, vae, batch)
    with torch.no_grad():
        a = model(batch, lat.tokens, lat.timesteps)
        model.attention = VarlenAttention(kernel=reference_varlen_kernel)
        for layer in model.language_model.model.layers:
            layer.self_attn.attention = model.attention
        b = model(batch, lat.tokens, lat.timesteps)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["layer", "sublayer", "nested", "nested_small_chunks"])
def test_activation_checkpointing_same_loss_and_grads(cfg, mixed_samples, granularity, monkeypatch):
    if granularity == "nested_small_chunks":  # several MLP chunks per expert, the last one shorter
        from unigendet.models import mot

        monkeypatch.setattr(mot, "NESTED_MLP_CHUNK_TOKENS", 7)
        granularity = "nested"
    vae = _vae(cfg)
    batch = builder(cfg).build(mixed_samples)
    results = []
    for ckpt in (False, True):
        model = _model(cfg)
        model.set_activation_checkpointing(ckpt, granularity)
        loss, _ = _objective(cfg, vae)(model, batch, torch.Generator().manual_seed(0))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_a_layer_is_its_attention_half_then_its_mlp_half(cfg, mixed_samples):
    """The halves that sub-layer checkpointing recomputes compose to the layer, and each half keeps only its
    input under checkpointing (twice per layer what whole-layer checkpointing keeps)."""
    from unigendet.models.mot import Routing
    from unigendet.profiling.memory import _SavedTensorMeter

    model = _model(cfg).eval()
    batch = builder(cfg).build(mixed_samples)
    decoder = model.language_model.model
    hidden = torch.randn(batch.sequence_length, cfg.llm.hidden_size)
    routing = Routing.from_gen_index(batch.sequence_length, batch.vae_token_indexes, hidden.device)
    prepared = model.attention.prepare(batch.layout, hidden.device)
    cos, sin = decoder.rotary_emb(hidden, batch.position_ids[None])
    layer = decoder.layers[0]
    attend = functools.partial(layer.self_attn.attention, prepared=prepared)
    with torch.no_grad():
        whole = layer(hidden, routing, cos[0], sin[0], attend)
        halves = layer.mlp_block(layer.attention_block(hidden, routing, cos[0], sin[0], attend), routing)
    torch.testing.assert_close(whole, halves, atol=1e-6, rtol=1e-6)
    kept = {}
    lat = _latents(cfg, _vae(cfg), batch)
    for granularity in ("layer", "sublayer", "nested"):
        model.train().set_activation_checkpointing(True, granularity)
        meter = _SavedTensorMeter(model)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            model(batch, lat.tokens, lat.timesteps)
        kept[granularity] = meter.float_elems
    extra = (kept["sublayer"] - kept["layer"]) / (batch.sequence_length * cfg.llm.hidden_size)
    assert extra == pytest.approx(cfg.llm.num_hidden_layers, rel=0.05)  # one more [L, D] input per layer
    assert kept["nested"] == kept["layer"]  # the halves' checkpoints exist only while a layer is recomputed
    with pytest.raises(ValueError, match="granularity must be one of"):
        model.set_activation_checkpointing(True, "block")


def test_bce_head_and_loss(gen):
    cfg = tiny_config(detection_loss="bce")
    model, vae = _model(cfg), _vae(cfg)
    assert model.detection_head[-1].out_features == 1
    batch = builder(cfg).build([det_sample(gen)])
    loss, metrics = _objective(cfg, vae)(model, batch)
    assert torch.isfinite(metrics["det"])


def test_save_load_round_trip(tmp_path, cfg, mixed_samples):
    model, vae = _model(cfg).eval(), _vae(cfg)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = UniGenDet.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    batch = builder(cfg).build(mixed_samples)
    lat = _latents(cfg, vae, batch)
    with torch.no_grad():
        a, b = model(batch, lat.tokens, lat.timesteps), loaded(batch, lat.tokens, lat.timesteps)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.det_logits, b.det_logits)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_strict_load_names_bad_keys(tmp_path, cfg):
    model = _model(cfg)
    state = model.state_dict()
    state["bogus.weight"] = torch.zeros(1)
    del state["llm2vae.bias"]
    with pytest.raises(ValueError, match=r"missing keys.*llm2vae\.bias.*unexpected keys.*bogus\.weight"):
        model.load_state_dict_strict(state)


def test_fresh_init_copies_und_into_gen(cfg):
    model = UniGenDet(cfg)
    layer = model.language_model.model.layers[0]
    assert torch.equal(layer.self_attn.q_proj.weight, layer.self_attn.q_proj_moe_gen.weight)
    assert torch.equal(layer.mlp.up_proj.weight, layer.mlp_moe_gen.up_proj.weight)
    assert model.llm2vae.weight.abs().sum() == 0


def test_loading_builds_without_random_weights(tmp_path, cfg):
    """Checkpoint loads build parameters on the meta device and adopt the file's tensors; a head the
    file lacks gets real storage and a fresh init; tied embeddings stay tied; buffers stay fp32."""
    empty = UniGenDet.without_weights(cfg)
    assert all(p.is_meta for p in empty.parameters())
    assert not any(b.is_meta for b in empty.buffers())
    model = _model(cfg)
    model.save_pretrained(tmp_path / "stage1")
    loaded = UniGenDet.from_pretrained(tmp_path / "stage1", diga_projector=True)
    assert not any(p.is_meta for p in loaded.parameters())
    projector = loaded.diga_projector[0].weight
    assert projector.std() > 0.01 and torch.isfinite(projector).all()

    tied_cfg = tiny_config(**{"llm.tie_word_embeddings": True})
    tied = UniGenDet(tied_cfg)
    tied.save_pretrained(tmp_path / "tied")
    reloaded = UniGenDet.from_pretrained(tmp_path / "tied")
    assert reloaded.language_model.lm_head.weight is reloaded.language_model.model.embed_tokens.weight
    assert torch.equal(reloaded.language_model.lm_head.weight, tied.language_model.model.embed_tokens.weight)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    half = UniGenDet.without_weights(cfg)
    half.assign_weights(state, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in half.buffers()} == {torch.float32}
    with pytest.raises(ValueError, match="got no weights"):
        UniGenDet.without_weights(cfg).assign_weights({k: v for k, v in state.items() if "llm2vae" not in k})
