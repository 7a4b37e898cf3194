"""p(fake) from the detection head for detection samples, packed several per forward.

The head reads the answer's ``<|im_start|>``, which attends only to what precedes it (VAE block,
ViT block, question), so the answer text is removed: scoring never sees the label.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from unigendet.data.packing import PackBuilder, PlanSample, TextItem
from unigendet.models.bridges import fake_probability
from unigendet.models.latents import encode_pack_latents


def without_answer(sample: PlanSample) -> PlanSample:
    """The same detection sample with an empty answer (the head position is kept)."""
    items = list(sample.items)
    last = items[-1]
    if not (isinstance(last, TextItem) and last.detection_label is not None):
        raise ValueError(f"sample {sample.key!r} is not a detection sample (its last item is not a labelled answer)")
    items[-1] = replace(last, ids=[])
    return replace(sample, items=items, num_tokens=sample.num_tokens - len(last.ids))


@torch.no_grad()
def head_fake_probabilities(model, vae, samples: list[PlanSample], builder: PackBuilder, max_tokens: int = 4096,
                            seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(p_fake [n], labels [n]) for detection samples; labels use the internal convention (1 = fake)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    probs, labels = [], []
    chunk: list[PlanSample] = []

    def flush():
        batch = builder.build([s.items for s in chunk], [s.kind for s in chunk]).to(device)
        clean = encode_pack_latents(batch, vae, model.config.latent_patch_size, generator)
        timesteps = None
        if clean is not None:
            # Training draws flow noise for every latent after the posterior samples; drawing (and dropping)
            # it here too gives each later chunk the posterior samples the training input path would draw.
            torch.randn(clean.shape, generator=generator, device=clean.device)
            timesteps = torch.zeros(clean.shape[0], device=clean.device)
        out = model(batch, clean, timesteps)
        probs.append(fake_probability(out.det_logits, model.config.detection_loss).cpu())
        labels.append(batch.det_labels.cpu())
        chunk.clear()

    tokens = 0
    for sample in map(without_answer, samples):
        if chunk and tokens + sample.num_tokens > max_tokens:
            flush()
            tokens = 0
        chunk.append(sample)
        tokens += sample.num_tokens
    if chunk:
        flush()
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)
