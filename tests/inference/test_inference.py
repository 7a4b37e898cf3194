"""Cached inference: KV cache, cached forward == training forward, detection decoding, the flow
sampler with CFG, and the detect/generate CLI — all on the tiny random model (CPU, fp32)."""

import json
import math

import pytest
import torch
from helpers import SPECIAL, builder, rand_ids, tiny_config
from helpers.inference_models import SMALL_VAE, SMALL_VIT, write_model_directory
from PIL import Image

from unigendet.data.packing import TextItem, VAEImage, detection_sample
from unigendet.inference.cache import KVCache
from unigendet.inference.cached_forward import CachedForward
from unigendet.inference.detect import (
    DEFAULT_QUESTION,
    DecodingConfig,
    DetectorPreprocessing,
    TokenChooser,
    UniGenDetDetector,
)
from unigendet.inference.generate import (
    CFGContext,
    FlowSampler,
    Generator,
    SamplerSettings,
    combine_cfg,
    flow_schedule,
)
from unigendet.labels import LABEL_FAKE, DetectionResult
from unigendet.models.unigendet import UniGenDet
from unigendet.models.vae import FluxVAE

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = UniGenDet(cfg).eval()
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)  # zero at fresh init: velocities would be 0
    return model


@pytest.fixture(scope="module")
def model():
    return _model(tiny_config())


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(1)
    return FluxVAE(tiny_config().vae)


@pytest.fixture(scope="module")
def tokenizer():
    from unigendet.data.tokenizer import build_tiny_tokenizer

    corpus = ["This is a real image. Natural light and sharp texture.",
              "This is a fake image. Smooth skin and odd hands.",
              "a red square on a blue background", DEFAULT_QUESTION] * 4
    return build_tiny_tokenizer(corpus, vocab_size=400)


def _images():
    g = torch.Generator().manual_seed(3)

    def img(w, h):
        return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())

    return [img(40, 40), img(64, 40)]


# --------------------------------------------------------------------------------------------------
# KV cache


def test_cache_append_grow_and_commit():
    cache = KVCache.empty(num_layers=2, batch_size=2, num_kv_heads=1, head_dim=2)
    assert cache.capacity == 0 and cache.lengths.tolist() == [0, 0]
    cache.reserve(3)
    k = torch.arange(6.0).reshape(3, 1, 2)
    cache.write(0, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), k, -k)
    assert cache.lengths.tolist() == [0, 0]  # writing is not committing
    cache.advance([2, 1], [5, 1])
    assert cache.lengths.tolist() == [2, 1] and cache.rope.tolist() == [5, 1]
    keys, values = cache.sequence(0, 0)
    assert torch.equal(keys[0], k[:2, 0]) and torch.equal(values[0], -k[:2, 0])
    # Growth doubles the capacity and keeps the contents.
    cache.reserve(4)
    assert cache.capacity == 6
    assert torch.equal(cache.sequence(0, 0)[0][0], k[:2, 0]) and torch.equal(cache.sequence(1, 0)[0][0], k[2:, 0])
    with pytest.raises(ValueError, match="advance past"):
        cache.advance([7, 0], [0, 0])


def test_cache_fork_select_cat():
    cache = KVCache.empty(1, 2, 1, 2, capacity=4)
    cache.write(0, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), torch.ones(3, 1, 2), torch.ones(3, 1, 2))
    cache.advance([1, 2], [1, 2])
    fork = cache.clone()
    fork.write(0, torch.tensor([0]), torch.tensor([1]), torch.full((1, 1, 2), 7.0), torch.zeros(1, 1, 2))
    fork.advance([1, 0], [2, 2])
    assert cache.lengths.tolist() == [1, 2] and cache.keys[0][0, 0, 1].abs().sum() == 0  # original untouched
    sub = fork.select([1, 0, 0])
    assert sub.lengths.tolist() == [2, 2, 2] and sub.rope.tolist() == [2, 2, 2] and sub.capacity == 2
    assert torch.equal(sub.sequence(1, 0)[0][0, 1], torch.full((2,), 7.0))
    empty = KVCache.empty(1, 1, 1, 2)
    both = KVCache.cat([cache, empty])
    assert both.batch_size == 3 and both.lengths.tolist() == [1, 2, 0] and both.rope.tolist() == [1, 2, 0]
    assert torch.equal(both.sequence(1, 0)[0], cache.sequence(1, 0)[0])


# --------------------------------------------------------------------------------------------------
# Cached forward == training forward


def _det_items(g, vae_hw, vit_hw, q_len, a_len):
    return detection_sample(
        question_ids=rand_ids(g, q_len), answer_ids=rand_ids(g, a_len),
        vae_image=torch.rand(3, *vae_hw, generator=g) * 2 - 1, vit_image=torch.rand(3, *vit_hw, generator=g) * 2 - 1,
        label=LABEL_FAKE,
    )


@pytest.mark.parametrize("prefill", ["one_block", "per_item"])
def test_cached_detection_matches_training_forward(model, prefill):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    samples = [_det_items(g, (32, 48), (28, 42), 5, 7), _det_items(g, (16, 32), (42, 28), 9, 4)]
    batch = builder(cfg).build(samples)
    latents = torch.randn(batch.num_latent_tokens, cfg.patch_latent_dim, generator=g)
    zeros = torch.zeros(batch.num_latent_tokens)
    with torch.no_grad():
        ref = model(batch, latents, zeros)

    fwd = CachedForward(model, SPECIAL)
    cache = fwd.new_cache(2)
    contexts = [s[:-1] for s in samples]
    if prefill == "one_block":
        fwd.forward(cache, fwd.embed(fwd.pack(contexts), latents, zeros), commit=True)
    else:
        n0 = (32 // 16) * (48 // 16)
        per_seq = [latents[:n0], latents[n0:]]
        for k in range(3):  # VAE block, ViT block, question: one committed block each
            part = fwd.pack([c[k : k + 1] for c in contexts])
            lat = torch.cat(per_seq) if k == 0 else None
            fwd.forward(cache, fwd.embed(part, lat, None if lat is None else zeros), commit=True)
    q_lens = [5, 9]
    # RoPE: VAE 0, ViT 1, question 2..q+3 -> the answer starts at q + 4.
    assert cache.rope.tolist() == [q + 4 for q in q_lens]

    answers = [[SPECIAL.bos] + s[-1].ids for s in samples]
    logits = [[], []]
    for step in range(max(map(len, answers))):
        ids = torch.tensor([a[min(step, len(a) - 1)] for a in answers])
        hidden = fwd.forward(cache, fwd.token_block(ids), commit=True)
        if step == 0:
            torch.testing.assert_close(fwd.detection_logits(hidden), ref.det_logits, **TOL)
        out = fwd.lm_logits(hidden)
        for b in range(2):
            if step < len(answers[b]):
                logits[b].append(out[b])
    torch.testing.assert_close(torch.cat([torch.stack(x) for x in logits]), ref.ce_logits, **TOL)


def test_answer_as_one_causal_block_matches_token_by_token(model):
    """Teacher-forced answer as one causal block == one token per step (bottom-right causal rule)."""
    g = torch.Generator().manual_seed(1)
    samples = [_det_items(g, (32, 32), (28, 28), 4, 6)]
    batch = builder(model.config).build(samples)
    with torch.no_grad():
        ref = model(batch, torch.randn(batch.num_latent_tokens, model.config.patch_latent_dim, generator=g),
                    torch.zeros(batch.num_latent_tokens))
    g = torch.Generator().manual_seed(1)
    samples = [_det_items(g, (32, 32), (28, 28), 4, 6)]
    lat = torch.randn(batch.num_latent_tokens, model.config.patch_latent_dim, generator=g)
    fwd = CachedForward(model, SPECIAL)
    cache = fwd.new_cache(1)
    fwd.forward(cache, fwd.embed(fwd.pack([samples[0][:-1]]), lat, torch.zeros(lat.shape[0])), commit=True)
    answer = fwd.pack([samples[0][-1:]])  # <|im_start|> a1..a6 <|im_end|>, positions 0..7 relative
    hidden = fwd.forward(cache, fwd.embed(answer), commit=True)
    torch.testing.assert_close(fwd.lm_logits(hidden[:-1]), ref.ce_logits, **TOL)


def test_cached_t2i_velocity_matches_training_forward(model):
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    img = lambda h, w: torch.rand(3, h, w, generator=g) * 2 - 1
    samples = [
        [TextItem(rand_ids(g, 6)), VAEImage(img(32, 32), noised=True)],
        [TextItem(rand_ids(g, 10)), VAEImage(img(16, 48), noised=True)],
        [VAEImage(img(32, 16), noised=True)],  # caption dropped: the text-unconditional branch
    ]
    batch = builder(cfg).build(samples)
    x_t = torch.randn(batch.num_latent_tokens, cfg.patch_latent_dim, generator=g)
    t = torch.cat([torch.full((4,), 0.3), torch.full((3,), 0.8), torch.full((2,), 0.55)])
    with torch.no_grad():
        ref = model(batch, x_t, t)

    fwd = CachedForward(model, SPECIAL)
    cond = fwd.new_cache(2)
    fwd.forward(cond, fwd.embed(fwd.pack([s[:1] for s in samples[:2]])), commit=True)
    cache = KVCache.cat([cond, fwd.new_cache(1)])
    block = fwd.embed(fwd.pack([s[-1:] for s in samples]), x_t, t)
    before = (cache.lengths.clone(), cache.rope.clone())
    velocity = fwd.velocity(fwd.forward(cache, block, commit=False), block)
    torch.testing.assert_close(velocity, ref.velocity, **TOL)
    assert torch.equal(cache.lengths, before[0]) and torch.equal(cache.rope, before[1])  # not added
    # A second evaluation on the same cache (next denoising step) still matches.
    velocity2 = fwd.velocity(fwd.forward(cache, block, commit=False), block)
    torch.testing.assert_close(velocity2, ref.velocity, **TOL)
    with pytest.raises(ValueError, match="must not be committed"):
        fwd.forward(cache, block, commit=True)


def test_tiled_block_equals_separate_branches(model):
    """CFG branches share one embedding: a tiled block over cat'ed caches == each branch alone."""
    fwd = CachedForward(model, SPECIAL)
    g = torch.Generator().manual_seed(4)
    cond = fwd.new_cache(1)
    fwd.forward(cond, fwd.embed(fwd.pack([[TextItem(rand_ids(g, 5))]])), commit=True)
    uncond = fwd.new_cache(1)
    block = fwd.embed(fwd.pack([[VAEImage(torch.zeros(3, 32, 32), noised=True)]]),
                         torch.randn(4, model.config.patch_latent_dim, generator=g), torch.full((4,), 0.7))
    tiled = block.tile(2)
    both = fwd.velocity(fwd.forward(KVCache.cat([cond, uncond]), tiled, commit=False), tiled)
    alone = [fwd.velocity(fwd.forward(c, block, commit=False), block) for c in (cond, uncond)]
    torch.testing.assert_close(both, torch.cat(alone), **TOL)
    assert not torch.allclose(alone[0], alone[1])


# --------------------------------------------------------------------------------------------------
# Decoding


def test_repetition_penalty_on_crafted_logits():
    chooser = TokenChooser(DecodingConfig(repetition_penalty=2.0), seeds=[0, 0], device="cpu")
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5], [2.0, 1.5, -1.0, 0.5]])
    scores = chooser.process(logits, [[0, 2], []])
    # Seen tokens: positive logits divided, negative multiplied; the row without history is untouched.
    assert torch.equal(scores[0], torch.tensor([1.0, 1.5, -2.0, 0.5]))
    assert torch.equal(scores[1], logits[1])
    assert chooser(logits, [[0, 2], []], [0, 1]).tolist() == [1, 0]


def test_decoding_config_validation():
    with pytest.raises(ValueError):
        DecodingConfig(temperature=0)
    with pytest.raises(ValueError):
        DecodingConfig(top_p=0)
    paper = DecodingConfig.paper()
    assert paper.do_sample and paper.top_p == 0.8 and paper.top_k == 20


@pytest.fixture(scope="module")
def detector(model, vae, tokenizer):
    return UniGenDetDetector(model, vae, tokenizer, DetectorPreprocessing(SMALL_VIT, SMALL_VAE))


def test_detect_greedy_is_deterministic_and_well_formed(detector):
    images = _images()
    a = detector.detect(images, max_new_tokens=6)
    b = detector.detect(images, max_new_tokens=6)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for r in a:
        assert isinstance(r, DetectionResult) and 0.0 <= r.p_fake <= 1.0
        assert r.label_name == ("fake" if r.p_fake >= 0.5 else "real")
        assert r.text == detector.tokenizer.decode(r.token_ids) and len(r.token_ids) <= 6
    # Posterior sample vs mean: the VAE context changes, so the head reads a different state.
    mean = UniGenDetDetector(detector.model, detector.vae, detector.tokenizer,
                             DetectorPreprocessing(SMALL_VIT, SMALL_VAE, posterior="mean"))
    assert mean.detect(images[:1], max_new_tokens=0)[0].p_fake != a[0].p_fake


def test_sampling_seeded_and_top_k_one_is_greedy(detector):
    images = _images()[:1]
    sampling = DecodingConfig(do_sample=True, temperature=1.5)
    s1 = detector.detect(images, max_new_tokens=8, decoding=sampling, seed=1)[0]
    s1b = detector.detect(images, max_new_tokens=8, decoding=sampling, seed=1)[0]
    s2 = detector.detect(images, max_new_tokens=8, decoding=sampling, seed=2)[0]
    assert s1.token_ids == s1b.token_ids
    assert s1.token_ids != s2.token_ids
    greedy = detector.detect(images, max_new_tokens=8, seed=1)[0]
    top1 = detector.detect(images, max_new_tokens=8, decoding=DecodingConfig(do_sample=True, top_k=1, top_p=0.8), seed=1)[0]
    assert top1.token_ids == greedy.token_ids


def test_batch_detection_equals_each_alone_with_per_sequence_stopping(detector, monkeypatch):
    """Two images of different sizes decoded together == each alone, when they stop at different steps."""
    import unigendet.inference.detect as detect_mod

    class StopByHistory(detect_mod.TokenChooser):
        # A row emits <|im_end|> once its answer holds 2 + (first token % 5) tokens: a rule that depends
        # only on that row, so batched and single runs must agree.
        def __call__(self, logits, histories, rows):
            out = super().__call__(logits, histories, rows)
            for k, h in enumerate(histories):
                if h and len(h) >= 2 + h[0] % 5:
                    out[k] = SPECIAL_EOS[0]
            return out

    SPECIAL_EOS = [detector.special.eos]
    monkeypatch.setattr(detect_mod, "TokenChooser", StopByHistory)
    images = _images()
    for decoding in (DecodingConfig(), DecodingConfig(do_sample=True, top_k=50)):
        batch = detector.detect(images, max_new_tokens=12, decoding=decoding, seed=5)
        alone = [detector.detect([img], max_new_tokens=12, decoding=decoding, seed=5)[0] for img in images]
        assert all(r.stopped for r in batch)
        assert len({len(r.token_ids) for r in batch}) == 2, "the test needs different stopping steps"
        for x, y in zip(batch, alone):
            assert x.token_ids == y.token_ids and x.text == y.text and x.stopped == y.stopped
            assert math.isclose(x.p_fake, y.p_fake, rel_tol=1e-5, abs_tol=1e-6)


def test_detect_questions_and_head_only(detector):
    images = _images()
    res = detector.detect(images, questions=["\nReal?", "<image>\nFake?"], max_new_tokens=0)
    assert [r.token_ids for r in res] == [[], []] and not any(r.stopped for r in res)
    # Head only reads the head in the context's own forward (answer start appended); decoding reads it in the first
    # decoding step over the cached context. Same state, so the same p(fake), for every question and image.
    decoded = detector.detect(images, questions=["\nReal?", "<image>\nFake?"], max_new_tokens=1)
    assert [r.p_fake for r in res] == pytest.approx([r.p_fake for r in decoded], rel=1e-5, abs=1e-6)
    assert res[0].p_fake != res[1].p_fake
    with pytest.raises(ValueError):
        detector.detect(images, questions=["only one"])


def test_default_question_is_the_demo_question():
    from unigendet.demo.data import DEMO_QUESTION

    assert DEMO_QUESTION.split("<image>", 1)[1] == DEFAULT_QUESTION


# --------------------------------------------------------------------------------------------------
# Generation


def test_flow_schedule():
    t, dt = flow_schedule(5, 3.0)
    assert t.shape == (4,) and t[0] == 1.0
    assert torch.allclose(dt.sum(), torch.tensor(1.0))
    torch.testing.assert_close(flow_schedule(3, 1.0)[0], torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError):
        flow_schedule(1)


def test_combine_cfg_renorm_clamps():
    v_c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u_t = torch.tensor([[0.0, 0.0], [0.0, 0.5]])
    plain = combine_cfg(v_c, u_t, None, 4.0, 1.0, "none")
    torch.testing.assert_close(plain, torch.tensor([[4.0, 0.0], [0.0, 2.5]]))
    # global: the whole image is scaled back to ||v_c||.
    g = combine_cfg(v_c, u_t, None, 4.0, 1.0, "global")
    torch.testing.assert_close(g.norm(), v_c.norm())
    torch.testing.assert_close(g, plain * (v_c.norm() / plain.norm()))
    # channel: each token back to its own ||v_c||.
    c = combine_cfg(v_c, u_t, None, 4.0, 1.0, "channel")
    torch.testing.assert_close(c.norm(dim=-1), v_c.norm(dim=-1))
    # The factor is clamped to [min, 1]: min 1 disables shrinking; a smaller guided norm is never scaled up.
    torch.testing.assert_close(combine_cfg(v_c, u_t, None, 4.0, 1.0, "global", renorm_min=1.0), plain)
    small = combine_cfg(v_c, v_c * 2, None, 1.5, 1.0, "global")  # guided = 0.5 v_c
    torch.testing.assert_close(small, 0.5 * v_c)
    # Image CFG with u_i = v_c (text-only context) is an effective text scale 1 + s_img (s_txt - 1).
    torch.testing.assert_close(combine_cfg(v_c, u_t, v_c, 4.0, 1.5, "none"), combine_cfg(v_c, u_t, None, 5.5, 1.0, "none"))
    # text_channel: per-token renorm of the text-guided velocity, then the image step, no final renorm.
    u_i = torch.zeros(2, 2)
    tc = combine_cfg(v_c, u_t, u_i, 4.0, 2.0, "text_channel")
    torch.testing.assert_close(tc, 2.0 * v_c)


@pytest.fixture(scope="module")
def generator(model, vae, tokenizer):
    return Generator(model, vae, tokenizer)


def test_generate_sizes_and_seeds(generator):
    images = generator.generate(["a red square", "a blue sky"], height=32, width=48, num_steps=3, seed=7)
    assert [im.size for im in images] == [(48, 32), (48, 32)] and all(im.mode == "RGB" for im in images)
    again = generator.generate(["a red square", "a blue sky"], height=32, width=48, num_steps=3, seed=7)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    with pytest.raises(ValueError):
        generator.generate(["x"], height=30, width=32)


def test_generation_batch_equals_each_alone_with_global_renorm(generator):
    """Per-image global renorm and per-image seeds: an image never depends on its batch."""
    settings = SamplerSettings(num_steps=4, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="global")
    both = generator.generate_latents(["a red square", "a blue sky on a red square"], 32, 32, seed=3, settings=settings)
    second = generator.generate_latents(["a blue sky on a red square"], 32, 32, seed=4, settings=settings)[0]
    torch.testing.assert_close(both[1], second, **TOL)
    other = generator.generate_latents(["a red square"], 32, 32, seed=9, settings=settings)[0]
    assert not torch.allclose(both[0], other)


def test_cfg_branches_and_euler_steps(generator):
    fwd = generator.cached_forward
    prompts = ["a red square", "a blue sky"]

    def run(**kw):
        fwd.stats.history.clear()
        lat = generator.generate_latents(prompts, 32, 32, seed=0, settings=SamplerSettings(num_steps=6, **kw))
        return lat, [seqs for seqs, _ in fwd.stats.history[1:]]  # [0] is the prompt prefill

    # CFG off: N-1 = 5 Euler steps, only the conditional branch (2 sequences per call).
    off, calls = run(cfg_text_scale=1.0)
    assert calls == [2] * 5
    # An empty interval is the same computation.
    empty, calls_empty = run(cfg_text_scale=4.0, cfg_interval=(1.0, 1.0))
    assert calls_empty == [2] * 5
    assert all(torch.equal(a, b) for a, b in zip(off, empty))
    # CFG on everywhere: conditional + text-unconditional batched (4 sequences per call).
    on, calls_on = run(cfg_text_scale=4.0, cfg_interval=(0.0, 1.0))
    assert calls_on == [4] * 5 and not torch.allclose(on[0], off[0])
    # Interval (0.7, 1]: shifted t = 1, 0.92, 0.82 are guided, 0.67 and 0.43 are not.
    t, _ = flow_schedule(6, 3.0)
    _, calls_mixed = run(cfg_text_scale=4.0, cfg_interval=(0.7, 1.0))
    assert calls_mixed == [4 if 0.7 < x <= 1.0 else 2 for x in t.tolist()] == [4, 4, 4, 2, 2]
    # Image CFG on a text-only context reuses the conditional velocity: still 2 branches, no third.
    img, calls_img = run(cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.0, 1.0), cfg_renorm_type="none")
    assert calls_img == [4] * 5
    eff, _ = run(cfg_text_scale=5.5, cfg_interval=(0.0, 1.0), cfg_renorm_type="none")
    for a, b in zip(img, eff):
        torch.testing.assert_close(a, b, **TOL)


def test_cfg_context_branches_and_image_unconditional_sampling(model):
    """Context image -> text: the three CFG branch caches (conditional, text- and image-unconditional), and a third batched branch when s_img > 1."""
    fwd = CachedForward(model, SPECIAL)
    g = torch.Generator().manual_seed(0)
    ctx = CFGContext(fwd, 1)
    ctx.add_images([[VAEImage(torch.zeros(3, 32, 32))]], torch.randn(4, model.config.patch_latent_dim, generator=g))
    ctx.add_text([rand_ids(g, 3)])
    cond, text_uncond, img_uncond = ctx.caches()
    # cond: image (6 tokens, RoPE 0) + text (5 tokens, RoPE 1..5); text-uncond: the image only; img-uncond: the text only.
    assert (cond.lengths.tolist(), cond.rope.tolist()) == ([11], [6])
    assert (text_uncond.lengths.tolist(), text_uncond.rope.tolist()) == ([6], [1])
    assert (img_uncond.lengths.tolist(), img_uncond.rope.tolist()) == ([5], [5])
    noise = [torch.randn(4, model.config.patch_latent_dim, generator=g)]
    fwd.stats.history.clear()
    FlowSampler(fwd).sample(cond, text_uncond, img_uncond, noise, [(2, 2)],
                               SamplerSettings(num_steps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0)))
    assert [s for s, _ in fwd.stats.history] == [3, 3]
    # Text-only context: no image-unconditional cache (it would equal the conditional one).
    text_only = CFGContext(fwd, 1)
    text_only.add_text([rand_ids(g, 3)])
    assert text_only.caches()[2] is None and text_only.caches()[1].lengths.tolist() == [0]


# --------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, vae, tokenizer):
    return write_model_directory(tmp_path_factory.mktemp("export") / "model", model, vae, tokenizer)


def test_cli_detect(model_dir, tmp_path, capsys, detector):
    from unigendet.cli import main

    paths = []
    for i, img in enumerate(_images()):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    assert main(["detect", *paths, "--model", str(model_dir), "--json", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in records] == paths
    # Same model, transforms (from train_config.yaml) and seed as the in-process detector.
    expected = detector.detect([Image.open(p).convert("RGB") for p in paths], max_new_tokens=4, seed=42)
    for rec, res in zip(records, expected):
        assert rec["label"] in ("real", "fake") and rec["explanation"] == res.text
        assert math.isclose(rec["p_fake"], res.p_fake, rel_tol=1e-5)
    assert main(["detect", paths[0], "--model", str(model_dir), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "p_fake=" in capsys.readouterr().out


def test_cli_generate(model_dir, tmp_path, capsys):
    from unigendet.cli import main

    out = tmp_path / "gen"
    code = main(["generate", "a red square", "a blue sky", "--model", str(model_dir), "--out", str(out),
                 "--steps", "3", "--size", "48x32", "--seed", "5", "--device", "cpu"])
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and all(Image.open(f).size == (48, 32) for f in files)
    manifest = json.loads((out / "generations.json").read_text())
    assert [m["seed"] for m in manifest["images"]] == [5, 6]


def test_cli_eval_fakeclue_end_to_end(model_dir, tmp_path, capsys):
    """The FakeClue job through the CLI on a real (tiny) detector: reports written, every entry scored."""
    from unigendet.cli import main

    entries = []
    for i, img in enumerate(_images()):
        img.save(tmp_path / f"{i}.png")
        verdict = "fake" if i == 0 else "real"
        entries.append({"image": f"{i}.png", "label": 0 if i == 0 else 1, "cate": "t", "conversations": [
            {"from": "human", "value": "<image>" + DEFAULT_QUESTION},
            {"from": "gpt", "value": f"This is a {verdict} image. Natural light."}]})
    (tmp_path / "test.json").write_text(json.dumps(entries))
    out = tmp_path / "reports"
    code = main(["eval", "fakeclue", "--model", str(model_dir), "--json-path", str(tmp_path / "test.json"),
                 "--image-root", str(tmp_path), "--out", str(out), "--max-new-tokens", "4", "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "fakeclue.json").read_text())
    assert report["metrics"] == printed
    assert printed["head"]["n"] == 2 and report["config"]["skipped_entries"] == 0
    assert (out / "fakeclue.md").is_file()


def test_load_for_inference_errors(model_dir, tmp_path):
    from unigendet.inference.loading import load_for_inference

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_inference(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        load_for_inference(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="bagel=True"):
        load_for_inference(model_dir, weights="x.safetensors")


# --------------------------------------------------------------------------------------------------
# One result type, one p(fake), one source of settings


def test_fake_probability_ce_and_bce_heads():
    from unigendet.losses import detection_loss
    from unigendet.models.bridges import fake_probability

    ce = torch.tensor([[2.0, -1.0], [0.5, 1.5]])  # (fake, real) logits of the official 2-class head
    torch.testing.assert_close(fake_probability(ce, "ce"), torch.sigmoid(ce[:, 0] - ce[:, 1]))
    bce = torch.tensor([[1.2], [-0.4]])  # the single "fake" logit of the BCE head
    torch.testing.assert_close(fake_probability(bce, "bce"), torch.sigmoid(bce[:, 0]))
    # The loss trains exactly this probability: the loss of "fake" is -log p(fake), of "real" -log(1 - p).
    for kind, logits in (("ce", ce), ("bce", bce)):
        p = fake_probability(logits, kind)
        for row in range(2):
            fake = detection_loss(logits[row : row + 1], torch.tensor([LABEL_FAKE]), kind, 1.0)
            real = detection_loss(logits[row : row + 1], torch.tensor([1 - LABEL_FAKE]), kind, 1.0)
            torch.testing.assert_close(fake, -p[row].log())
            torch.testing.assert_close(real, -(1 - p[row]).log())
    with pytest.raises(ValueError, match="head kind"):
        fake_probability(ce, "mse")


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_head_scoring_matches_the_training_path_for_both_heads(kind, vae, tokenizer):
    """Scoring packed detection samples gives the training forward's p(fake), chunk after chunk."""
    from unigendet.inference.scoring import head_fake_probabilities, without_answer
    from unigendet.models.bridges import fake_probability
    from unigendet.objectives.common import prepare_latents

    model = _model(tiny_config(detection_loss=kind), seed=4)
    detector = UniGenDetDetector(model, vae, tokenizer, DetectorPreprocessing(SMALL_VIT, SMALL_VAE))
    samples = [detector.encoder.detection(img, DEFAULT_QUESTION, "This is a fake image.", label=LABEL_FAKE)
               for img in _images() * 2]
    pack = builder(model.config)
    # max_tokens=1: one sample per forward, so every sample after the first continues the generator.
    p_fake, labels = head_fake_probabilities(model, vae, samples, pack, max_tokens=1, seed=3)
    assert p_fake.shape == labels.shape == (4,) and labels.tolist() == [LABEL_FAKE] * 4
    generator = torch.Generator().manual_seed(3)
    expected = []
    for sample in map(without_answer, samples):
        batch = pack.build([sample.items], [sample.kind])
        lat = prepare_latents(batch, vae, model.config.latent_patch_size, generator)
        with torch.no_grad():
            out = model(batch, lat.tokens, lat.timesteps)
        expected.append(fake_probability(out.det_logits, kind))
    torch.testing.assert_close(p_fake, torch.cat(expected), **TOL)
    assert len({round(float(p), 6) for p in p_fake}) == 4  # posterior samples differ between repeats


def test_detection_result_labels_and_record():
    fake_head = DetectionResult(0.7, "This is a real image.", 0, [5, 6], True)
    assert fake_head.label == LABEL_FAKE and fake_head.label_name == "fake" and fake_head.text_label_name == "real"
    assert fake_head.record() == {"label": "fake", "p_fake": 0.7, "text_label": "real",
                                  "explanation": "This is a real image.", "stopped": True}
    assert DetectionResult(0.7, threshold=0.8).label_name == "real"
    assert DetectionResult(0.5).label == LABEL_FAKE  # ties go to fake
    no_head = DetectionResult(math.nan, "This is a fake image.", LABEL_FAKE)
    assert no_head.label == LABEL_FAKE and no_head.record()["p_fake"] is None
    assert DetectionResult(math.nan, "no idea").label_name == "unknown"


def _exported_run(model_dir, tmp_path, smsa: bool):
    """A copy of the exported model with the ``train_config.yaml`` training writes (the whole resolved
    training config, saved by the config loader) for a run with the given ``data.smsa``."""
    import shutil

    from unigendet.config.loader import save_config
    from unigendet.training.config import TrainConfig

    directory = tmp_path / "run"
    shutil.copytree(model_dir, directory)
    cfg = TrainConfig()
    transform = type(cfg.data.vit_transform)
    cfg.data.vit_transform = transform(SMALL_VIT.max_size, SMALL_VIT.min_size, SMALL_VIT.stride, SMALL_VIT.max_pixels)
    cfg.data.vae_transform = transform(SMALL_VAE.max_size, SMALL_VAE.min_size, SMALL_VAE.stride, SMALL_VAE.max_pixels)
    cfg.data.smsa = smsa
    save_config(cfg, directory / "train_config.yaml")
    return directory


def test_saved_run_config_reaches_the_detector(model_dir, tmp_path):
    from unigendet.inference.loading import build_detector

    run = _exported_run(model_dir, tmp_path, smsa=False)
    detector = build_detector(run, device="cpu")
    assert detector.preprocessing == DetectorPreprocessing(SMALL_VIT, SMALL_VAE, smsa=False)
    assert detector.encoder.smsa is False
    # Without SMSA the context has no VAE block: the head reads ViT tokens and the question only.
    context = detector.context(_images()[0], DEFAULT_QUESTION)
    assert not any(isinstance(item, VAEImage) for item in context)
    assert math.isfinite(detector.detect(_images()[:1], max_new_tokens=0)[0].p_fake)
    # A choice made at load time wins over the run's; the others keep theirs.
    chosen = build_detector(run, device="cpu", smsa=True, posterior="mean")
    assert chosen.preprocessing == DetectorPreprocessing(SMALL_VIT, SMALL_VAE, smsa=True, posterior="mean")
    assert any(isinstance(item, VAEImage) for item in chosen.context(_images()[0], DEFAULT_QUESTION))


def test_saved_run_config_is_validated(tmp_path):
    from unigendet.config.loader import ConfigError

    assert DetectorPreprocessing.from_run(tmp_path) is None
    (tmp_path / "train_config.yaml").write_text("data:\n  smsa: maybe\n")
    with pytest.raises(ConfigError, match="data.smsa"):
        DetectorPreprocessing.from_run(tmp_path)
    (tmp_path / "train_config.yaml").write_text("data:\n  sources: {}\n")  # nothing the detector reads
    assert DetectorPreprocessing.from_run(tmp_path) == DetectorPreprocessing()


def test_sampler_and_decoding_settings_are_the_one_source_of_defaults(generator):
    from unigendet.config.loader import ConfigError, from_dict

    settings = from_dict(SamplerSettings, {"num_steps": 3, "cfg_interval": [0, 1]})
    assert settings.cfg_interval == (0.0, 1.0) and settings.timestep_shift == SamplerSettings().timestep_shift
    with pytest.raises(ConfigError, match="num_steps"):
        from_dict(SamplerSettings, {"num_steps": 1})
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(DecodingConfig, {"do_sample": True, "temperature": 0})
    # Keyword overrides replace fields of the settings object (or of the defaults).
    by_object = generator.generate(["a red square"], height=32, width=32, seed=1, settings=settings)
    by_override = generator.generate(["a red square"], height=32, width=32, seed=1, num_steps=3, cfg_interval=(0, 1))
    assert by_object[0].tobytes() == by_override[0].tobytes()
    with pytest.raises(TypeError):
        generator.generate(["x"], height=32, width=32, steps=3)
