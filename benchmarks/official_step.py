"""Our training step against the official BAGEL code's, side by side in one process (CPU, fp32).

    python benchmarks/official_step.py --reference refs/Bagel [--pairs 10] [--profile]

``--reference`` is a local checkout of github.com/ByteDance-Seed/Bagel (e.g. in the git-ignored ``refs/``
folder); its code is imported at run time with the runtime patches described in
``benchmarks/reference_parity.py`` and nothing of it is copied into this repository.

Both models are built at one geometry (default: LLM hidden 512 x 8 MoT layers, ViT hidden 256 x 4 layers),
the reference's weights are seeded at random and loaded into ours through the BAGEL checkpoint loader, and
one pack of 3 text, 2 text-to-image and 2 SMSA detection samples (about 2,000 tokens) is laid out by each
side's own packer. A step is the training forward on fixed clean latents, noise and timesteps, the loss
(token cross-entropy + flow-matching MSE, each reduced as the official training loop reduces it) and its
backward; the VAE encode and the optimizer are left out of both.

Before timing, the two losses and the global gradient norms must agree within ``--tolerance`` (fp32
rounding). Timing then alternates ours / official in pairs (the order flips every pair) with a short fp32
matmul peak measurement after each pair, so that all three see the same machine load. Printed: tokens/s
of each (median and range over pairs), the per-pair speed ratio, the model FLOPs of the step, and each
side's achieved FLOP/s as a share of the matmul peak measured in the same window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_parity as rp  # noqa: E402  (sibling benchmark: the reference import and checkpoint helpers)

from unigendet.checkpoint.bagel import load_bagel_checkpoint  # noqa: E402
from unigendet.config.loader import to_dict  # noqa: E402
from unigendet.data.packing import CFGDropout, PackBuilder, TextItem  # noqa: E402
from unigendet.data.tokenizer import build_tiny_tokenizer, encode_text, special_token_ids  # noqa: E402
from unigendet.data.transforms import patchify_latent  # noqa: E402
from unigendet.losses import noised_latents  # noqa: E402
from unigendet.losses.core import flow_matching_loss, token_ce_loss  # noqa: E402
from unigendet.models.config import ModelConfig, pack_geometry  # noqa: E402
from unigendet.profiling.flops import training_step_flops  # noqa: E402

DEFAULT_REFERENCE = rp.REPO / "refs" / "Bagel"
TEXT_SENTENCES = [
    "the quick brown fox jumps over the lazy dog while a cat sleeps on a red sofa",
    "a watercolor painting of mountains at dawn with mist rising from the valley below",
    "this is a fake image because the fur texture is smeared and the shadows disagree",
    "lighting and perspective are consistent so this photograph looks like a real scene",
]


def model_config(args) -> ModelConfig:
    """The tiny geometry widened to the benchmark's LLM and ViT sizes (the VAE is never run)."""
    cfg = rp.tiny_model_config()
    llm, vit = cfg.llm, cfg.vit
    llm.hidden_size, llm.num_hidden_layers = args.llm_hidden, args.llm_layers
    llm.intermediate_size = args.llm_intermediate
    llm.num_attention_heads, llm.num_key_value_heads = args.llm_heads, args.llm_kv_heads
    vit.hidden_size, vit.num_hidden_layers = args.vit_hidden, args.vit_layers
    vit.intermediate_size, vit.num_attention_heads = 4 * args.vit_hidden, max(1, args.vit_hidden // 64)
    cfg.max_latent_size = max(cfg.max_latent_size, args.image_size // cfg.latent_downsample)
    vit.max_num_patch_per_side = max(vit.max_num_patch_per_side, args.vit_image_size // vit.patch_size)
    cfg.llm.validate()
    cfg.vit.validate()
    return cfg


class Pack:
    """The benchmark's samples in both packers' input formats, plus their clean latents and noise."""

    def __init__(self, tokenizer, cfg: ModelConfig, args, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = lambda text: encode_text(tokenizer, text)  # noqa: E731
        words = " ".join(TEXT_SENTENCES * 64).split()
        text_ids = []
        for i in range(args.text_samples):
            chunk, n = [], 0
            while len(chunk) < args.text_tokens:
                chunk += ids(" " + words[(i * 37 + n) % len(words)])
                n += 1
            text_ids.append(chunk[: args.text_tokens])
        vit_side = args.vit_image_size // cfg.vit.patch_size * cfg.vit.patch_size
        question = ids("\nIs this image real or fake? Explain.")
        answer = ids("This is a fake image. The fur texture is smeared and the shadows disagree.")

        def img(side):
            return torch.rand(3, side, side, generator=g) * 2 - 1

        det = [{"kind": "det", "vae": img(args.image_size), "vit": img(vit_side), "question": question,
                "answer": answer, "label": i % 2} for i in range(args.det_samples)]
        t2i = [{"kind": "t2i", "vae": img(args.image_size), "caption": ids(TEXT_SENTENCES[i % 4])}
               for i in range(args.t2i_samples)]
        text = [{"kind": "text", "ids": t} for t in text_ids]
        # Interleave the kinds so that every sample type sits between others in the pack.
        order, pools = [], [text, det, t2i]
        while any(pools):
            for pool in pools:
                if pool:
                    order.append(pool.pop(0))
        self.samples = order
        lat_side = args.image_size // cfg.vae.downsample
        self.x0 = [torch.randn(cfg.vae.latent_channels, lat_side, lat_side, generator=g)
                   for s in order if s["kind"] != "text"]
        self.x0_tokens = torch.cat([patchify_latent(z, cfg.latent_patch_size) for z in self.x0])
        self.noise = torch.randn(self.x0_tokens.shape, generator=g)


def reference_pack(ref, pack: Pack, cfg: ModelConfig, special: dict, np_seed: int) -> dict:
    """The reference's ``PackedDataset.pack_sequence`` + ``to_tensor`` on the benchmark's samples."""
    import numpy as np

    PD = ref.dataset_base.PackedDataset
    ds = PD.__new__(PD)  # its __init__ builds real datasets from YAML files
    ds.data_config = ref.dataset_base.DataConfig(
        grouped_datasets={}, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0,
        vae_image_downsample=cfg.latent_downsample, max_latent_size=cfg.max_latent_size,
        vit_patch_size=cfg.vit.patch_size, max_num_patch_per_side=cfg.vit.max_num_patch_per_side)
    ds.use_flex = False
    ds.interpolate_pos = False
    ds.get_flattened_position_ids = ref.data_utils.get_flattened_position_ids_extrapolate
    for k, v in special.items():
        setattr(ds, k, v)
    images = [s for s in pack.samples if s["kind"] != "text"]
    image_samples = iter(rp.reference_samples(rp.Inputs(samples=images)))
    np.random.seed(np_seed)
    status = ds.set_sequence_status()
    for i, s in enumerate(pack.samples):
        if s["kind"] == "text":
            sample = {"image_tensor_list": [], "text_ids_list": [list(s["ids"])],
                      "sequence_plan": [{"type": "text", "loss": 1, "enable_cfg": 0, "special_token_loss": 0,
                                         "special_token_label": None}],
                      "data_indexes": {"data_indexes": [i], "worker_id": 0, "dataset_name": "text"}}
        else:
            sample = next(image_samples)
        status = ds.pack_sequence(sample, status)
    ds.max_num_tokens = sum(status["sample_lens"])
    return ds.to_tensor(status)


def our_pack(pack: Pack, cfg: ModelConfig, special):
    images = [s for s in pack.samples if s["kind"] != "text"]
    image_plans = iter(rp.our_samples(rp.Inputs(samples=images)))
    plans = [[TextItem(list(s["ids"]), loss=True)] if s["kind"] == "text" else next(image_plans)
             for s in pack.samples]
    return PackBuilder(special, pack_geometry(cfg), CFGDropout(0.0, 0.0, 0.0)).build(plans)


@contextlib.contextmanager
def constant_randn_like(noise: torch.Tensor):
    """Every ``torch.randn_like`` returns ``noise`` (the reference's forward draws its flow noise with it)."""
    original = torch.randn_like
    torch.randn_like = lambda x, *a, **k: noise.to(dtype=x.dtype, device=x.device)
    try:
        yield
    finally:
        torch.randn_like = original


class Sides:
    """The two training steps on identical inputs; each returns its loss after the backward."""

    def __init__(self, ours, batch, x_t, t, target, reference, ref_kwargs, noise):
        self.ours, self.batch, self.x_t, self.t, self.target = ours, batch, x_t, t, target
        self.reference, self.ref_kwargs, self.noise = reference, ref_kwargs, noise
        self.n_ce = int(batch.ce_loss_indexes.numel())
        self.n_mse = int(batch.mse_loss_indexes.numel())

    def ours_step(self) -> float:
        self.ours.zero_grad(set_to_none=True)
        out = self.ours(self.batch, self.x_t, self.t)
        loss = token_ce_loss(out.ce_logits, self.batch.ce_label_ids, self.n_ce) + flow_matching_loss(
            out.velocity, self.target[self.batch.mse_token_mask], self.n_mse)
        loss.backward()
        return float(loss.detach())

    def reference_step(self) -> float:
        self.reference.zero_grad(set_to_none=True)
        with constant_randn_like(self.noise):
            losses = self.reference(**self.ref_kwargs)
        loss = losses["ce"].sum() / self.n_ce + losses["mse"].mean(dim=-1).sum() / self.n_mse
        loss.backward()
        return float(loss.detach())


def grad_norm(module: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None])))


def build(args, ckpt: Path) -> tuple[Sides, ModelConfig]:
    cfg = model_config(args)
    (ckpt / "llm_config.json").write_text(json.dumps(rp.llm_config_json(cfg)))
    (ckpt / "vit_config.json").write_text(json.dumps(rp.vit_config_json(cfg)))
    tokenizer = build_tiny_tokenizer(rp.CORPUS + TEXT_SENTENCES, vocab_size=cfg.llm.vocab_size)
    tokenizer.save_pretrained(str(ckpt))
    rp.random_vae(cfg, seed=args.seed + 3).save_bfl(ckpt / "ae.safetensors")
    pack = Pack(tokenizer, cfg, args, seed=args.seed)

    ref = rp.import_reference(args.reference, unigendet=False)
    special = ref.data_utils.add_special_tokens(tokenizer)[1]
    reference = rp.build_reference_model(ref, ckpt, cfg)
    rp.randomize(reference, args.seed)
    reference.train()
    data = reference_pack(ref, pack, cfg, special, np_seed=args.seed + 5)
    ref_kwargs = {k: v for k, v in data.items() if k not in (
        "padded_images", "ce_loss_weights", "batch_data_indexes", "label",
        "generation_auth_explanation_list", "gt_vit_list", "gt_prompt_list")}
    max_h = max(z.shape[1] for z in pack.x0)
    max_w = max(z.shape[2] for z in pack.x0)
    padded = torch.zeros(len(pack.x0), cfg.vae.latent_channels, max_h, max_w)
    for i, z in enumerate(pack.x0):
        padded[i, :, : z.shape[1], : z.shape[2]] = z
    ref_kwargs["padded_latent"] = padded
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in reference.state_dict().items()}, str(ckpt / "ema.safetensors"))

    ours, _, _ = load_bagel_checkpoint(ckpt, vae=to_dict(cfg.vae), max_latent_size=cfg.max_latent_size,
                                       detection_head=False)
    ours.train()
    ours.language_model.model.set_compile(args.compile)
    batch = our_pack(pack, ours.config, special_token_ids(tokenizer))
    if batch.sequence_length != data["sequence_length"]:
        raise SystemExit(f"the packers disagree: {batch.sequence_length} vs {data['sequence_length']} tokens")
    t = torch.where(torch.isfinite(data["packed_timesteps"]), torch.sigmoid(data["packed_timesteps"]),
                    torch.zeros(()))
    x_t, target = noised_latents(pack.x0_tokens, t, pack.noise)
    return Sides(ours, batch, x_t, t, target, reference, ref_kwargs, pack.noise), ours.config


def check_equal(sides: Sides, tolerance: float) -> dict:
    """Losses and global gradient norms of one step on each side; SystemExit if they differ."""
    ours_loss = sides.ours_step()
    ours_gn = grad_norm(sides.ours)
    ref_loss = sides.reference_step()
    ref_gn = grad_norm(sides.reference)
    check = {"loss_ours": ours_loss, "loss_official": ref_loss, "grad_norm_ours": ours_gn, "grad_norm_official": ref_gn,
             "loss_rel_diff": abs(ours_loss - ref_loss) / max(abs(ref_loss), 1e-12),
             "grad_norm_rel_diff": abs(ours_gn - ref_gn) / max(ref_gn, 1e-12)}
    if check["loss_rel_diff"] > tolerance or check["grad_norm_rel_diff"] > tolerance:
        raise SystemExit(f"ours and the official step disagree before timing: {json.dumps(check)}")
    return check


def cpu_matmul_peak(iters: int) -> tuple[float, float]:
    """fp32 1024^3 matmul FLOP/s by wall time and by process CPU time per thread."""
    size, threads = 1024, torch.get_num_threads()
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        a @ b
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    flops = 2 * size**3 * iters
    return flops / wall, flops / (cpu / threads)


def time_pairs(sides: Sides, pairs: int, peak_iters: int) -> dict:
    """Wall seconds and process CPU seconds per thread of each step; the order flips every pair."""
    out = {k: [] for k in ("ours_s", "official_s", "ours_cpu_s", "official_cpu_s", "peak_flops", "peak_cpu_flops")}
    threads = torch.get_num_threads()
    for i in range(pairs):
        order = (("ours", sides.ours_step), ("official", sides.reference_step))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            out[f"{name}_s"].append(time.perf_counter() - wall)
            out[f"{name}_cpu_s"].append((time.process_time() - cpu) / threads)
        peak, peak_cpu = cpu_matmul_peak(peak_iters)
        out["peak_flops"].append(peak)
        out["peak_cpu_flops"].append(peak_cpu)
    return out


def _stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(timings: dict, tokens: int, step_flops: float) -> dict:
    """Per clock (wall, or CPU time per thread, which other jobs on a shared machine disturb less): tokens/s
    of each side, the per-pair ratio ours/official and each side's achieved FLOP/s over the peak measured
    right after it."""
    out = {"tokens": tokens, "step_flops": step_flops, "pairs": len(timings["ours_s"])}
    for clock, suffix in (("wall", "_s"), ("cpu", "_cpu_s")):
        ours, ref = timings["ours" + suffix], timings["official" + suffix]
        peaks = timings["peak_flops" if clock == "wall" else "peak_cpu_flops"]
        out[clock] = {
            "tokens_per_s_ours": _stats([tokens / s for s in ours]),
            "tokens_per_s_official": _stats([tokens / s for s in ref]),
            "speed_ratio": _stats([r / o for o, r in zip(ours, ref)]),
            "matmul_peak_flops": _stats(peaks),
            "peak_share_ours": _stats([step_flops / o / p for o, p in zip(ours, peaks)]),
            "peak_share_official": _stats([step_flops / r / p for r, p in zip(ref, peaks)]),
        }
    return out


def profile_ours(sides: Sides, rows: int) -> str:
    """torch.profiler table of one of our steps (after the timed ones), sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sides.ours_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="checkout of ByteDance-Seed/Bagel")
    p.add_argument("--pairs", type=int, default=10, help="interleaved (ours, official) timing pairs")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each side after the equality check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="relative loss / gradient-norm difference allowed")
    p.add_argument("--llm-hidden", type=int, default=512)
    p.add_argument("--llm-intermediate", type=int, default=1536)
    p.add_argument("--llm-layers", type=int, default=8)
    p.add_argument("--llm-heads", type=int, default=8)
    p.add_argument("--llm-kv-heads", type=int, default=2)
    p.add_argument("--vit-hidden", type=int, default=256)
    p.add_argument("--vit-layers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256, help="VAE image side in pixels (16 px per latent token)")
    p.add_argument("--vit-image-size", type=int, default=224, help="ViT image side in pixels (14 px per patch)")
    p.add_argument("--text-samples", type=int, default=3)
    p.add_argument("--text-tokens", type=int, default=120)
    p.add_argument("--t2i-samples", type=int, default=2)
    p.add_argument("--det-samples", type=int, default=2)
    p.add_argument("--peak-iters", type=int, default=4, help="matmuls per peak measurement (1024^2 fp32)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print the top ROWS ops of one of our steps")
    p.add_argument("--dry-run", action="store_true", help="tiny geometry, small pack, one pair: checks the plumbing")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compile", default="none", choices=["none", "layer"],
                   help="our model's compile setting (model.compile); compiling happens before the timed pairs")
    args = p.parse_args(argv)
    if args.dry_run:
        args.llm_hidden, args.llm_intermediate, args.llm_layers, args.llm_heads, args.llm_kv_heads = 64, 128, 2, 4, 2
        args.vit_hidden, args.vit_layers, args.image_size, args.vit_image_size = 64, 1, 64, 56
        args.text_tokens, args.pairs, args.warmup, args.peak_iters = 20, 1, 0, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.reference / "modeling" / "bagel" / "bagel.py").is_file():
        print(f"official BAGEL code not found at {args.reference}: clone github.com/ByteDance-Seed/Bagel there "
              "(e.g. into the git-ignored refs/ folder) or pass --reference", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="official_step_") as tmp:
        sides, cfg = build(args, Path(tmp))
    rp.restore_globals()
    check = check_equal(sides, args.tolerance)
    for _ in range(args.warmup):
        sides.ours_step()
        sides.reference_step()
    timings = time_pairs(sides, args.pairs, args.peak_iters)
    flops = training_step_flops(cfg, sides.batch)
    result = {"threads": torch.get_num_threads(), **check,
              **summarize(timings, sides.batch.sequence_length, flops.total)}
    print_result(args, sides, result)
    if args.profile:
        print(profile_ours(sides, args.profile))
    if args.json:
        print(json.dumps(result))
    return 0


def print_result(args, sides: Sides, r: dict) -> None:
    b = sides.batch
    print(f"our model: compile={args.compile}")
    print(f"pack: {b.sequence_length} tokens, {len(b.sample_lens)} samples ({args.text_samples} text, {args.t2i_samples} text-to-image, {args.det_samples} SMSA), "
          f"{b.ce_loss_indexes.numel()} CE / {b.mse_loss_indexes.numel()} MSE tokens; LLM {args.llm_hidden}x"
          f"{args.llm_layers} MoT, ViT {args.vit_hidden}x{args.vit_layers}, fp32, {r['threads']} threads")
    print(f"before timing: loss ours {r['loss_ours']:.6f} official {r['loss_official']:.6f} "
          f"(rel {r['loss_rel_diff']:.1e}); grad norm ours {r['grad_norm_ours']:.6f} official "
          f"{r['grad_norm_official']:.6f} (rel {r['grad_norm_rel_diff']:.1e})")

    def fmt(s, scale=1.0, spec=".1f"):
        return f"{s['median'] * scale:{spec}} (range {s['min'] * scale:{spec}}-{s['max'] * scale:{spec}})"

    print(f"{r['pairs']} interleaved pairs, model FLOPs per step {r['step_flops'] / 1e9:.1f} G; median (range)")
    for clock, title in (("wall", "wall clock"), ("cpu", "process CPU time per thread")):
        c = r[clock]
        print(f" {title}:")
        print(f"  tokens/s ours:             {fmt(c['tokens_per_s_ours'])}")
        print(f"  tokens/s official:         {fmt(c['tokens_per_s_official'])}")
        print(f"  speed ratio ours/official: {fmt(c['speed_ratio'], spec='.3f')}")
        print(f"  fp32 matmul peak:          {fmt(c['matmul_peak_flops'], 1e-9)} GFLOP/s")
        print(f"  share of peak ours:        {fmt(c['peak_share_ours'], 100)} %")
        print(f"  share of peak official:    {fmt(c['peak_share_official'], 100)} %")
    print("goal (issue 17): ratio >= 1.25 and ours >= 80% of the peak")


if __name__ == "__main__":
    sys.exit(main())
