"""Packed-sequence layout: splits, RoPE ids, indexes, CFG dropout and the two training layouts."""

import pytest
import torch
from helpers import SPECIAL, builder, det_sample, t2i_sample, tiny_config

from unigendet.data.packing import (
    CFGDropout,
    TextItem,
    VAEImage,
    detection_sample,
)
from unigendet.labels import LABEL_FAKE


def test_smsa_detection_layout(gen):
    cfg = tiny_config()
    sample = det_sample(gen, vae_hw=(32, 48), vit_hw=(28, 42))
    b = builder(cfg).build([sample])
    h, w = 32 // 16, 48 // 16  # latent grid
    n_vit = (28 // 14) * (42 // 14)
    assert b.attn_modes == ["full", "full", "causal", "causal"]
    assert b.split_lens == [h * w + 2, n_vit + 2, 5 + 2, 7 + 2]
    # RoPE: VAE block at 0, ViT block at 1, question continues from 2, answer after it.
    pos = b.position_ids.tolist()
    assert set(pos[: h * w + 2]) == {0}
    assert set(pos[h * w + 2 : h * w + n_vit + 4]) == {1}
    q_start = h * w + n_vit + 4
    assert pos[q_start : q_start + 7] == list(range(2, 9))
    assert pos[q_start + 7 :] == list(range(9, 18))
    # Latent tokens go to the gen expert; the markers around them are text (und expert).
    assert b.vae_token_indexes.tolist() == list(range(1, 1 + h * w))
    text_pos = set(b.text_indexes.tolist())
    assert {0, h * w + 1, h * w + 2, h * w + n_vit + 3} <= text_pos
    assert b.text_ids[b.text_indexes.tolist().index(0)] == SPECIAL.start_of_image
    # CE on the answer only: <|im_start|> a1..a7 predict a1..a7 <|im_end|>.
    a_start = q_start + 7
    assert b.ce_loss_indexes.tolist() == list(range(a_start, a_start + 8))
    assert b.ce_label_ids[-1] == SPECIAL.eos
    # The detection head reads the answer's <|im_start|>.
    assert b.det_indexes.tolist() == [a_start] and b.det_labels.tolist() == [LABEL_FAKE]
    assert b.mse_loss_indexes.numel() == 0 and not b.vae_noised.any()


def test_smsa_off_drops_the_vae_block(gen):
    b = builder(tiny_config()).build([det_sample(gen, smsa=False)])
    assert b.attn_modes == ["full", "causal", "causal"]
    assert b.vae_token_indexes.numel() == 0 and b.position_ids[0] == 0


def test_t2i_layout(gen):
    b = builder(tiny_config()).build([t2i_sample(gen, (32, 16))])
    assert b.attn_modes == ["causal", "noise"]
    n = 2 * 1
    pos = b.position_ids.tolist()
    assert pos[:8] == list(range(8)) and set(pos[8:]) == {8}
    assert b.mse_loss_indexes.tolist() == list(range(9, 9 + n))
    assert b.vae_noised.tolist() == [True] and b.ce_loss_indexes.numel() == 0


def test_noised_image_does_not_advance_rope_clean_does(gen):
    img = torch.zeros(3, 16, 16)
    items = [VAEImage(img, noised=True), TextItem([1, 2]), VAEImage(img, noised=False), TextItem([3])]
    b = builder(tiny_config()).build([items])
    pos = b.position_ids.tolist()
    assert pos[:3] == [0, 0, 0]          # noised block at 0
    assert pos[3:7] == [0, 1, 2, 3]      # text starts at the same id
    assert pos[7:10] == [4, 4, 4]        # clean block
    assert pos[10:] == [5, 6, 7]         # advanced by one


def test_cfg_dropout_of_caption_starts_image_at_rope_zero(gen):
    drop_all = CFGDropout(text=1.0, vit=0.0, vae=0.0)
    b = builder(tiny_config(), drop_all).build([t2i_sample(gen)])
    assert b.attn_modes == ["noise"] and set(b.position_ids.tolist()) == {0}


def test_cfg_dropout_only_touches_enabled_items(gen):
    drop_all = CFGDropout(text=1.0, vit=1.0, vae=1.0)
    b = builder(tiny_config(), drop_all).build([det_sample(gen)])
    assert b.attn_modes == ["full", "full", "causal", "causal"]  # detection items have enable_cfg=False


def test_cfg_dropout_rate_is_respected(gen):
    b = builder(tiny_config(), CFGDropout(text=0.3, vit=0.0, vae=0.0), seed=3)
    kept = sum(len(b.build([t2i_sample(gen, (16, 16))]).attn_modes) == 2 for _ in range(400))
    assert 0.6 < kept / 400 < 0.8


def test_positions_restart_per_sample_and_indexes_are_global(mixed_samples):
    b = builder(tiny_config()).build(mixed_samples)
    assert sum(b.sample_lens) == b.sequence_length == b.position_ids.numel()
    starts = [0]
    for n in b.sample_lens[:-1]:
        starts.append(starts[-1] + n)
    assert all(b.position_ids[s] == 0 for s in starts)
    covered = torch.cat([b.text_indexes, b.vit_token_indexes, b.vae_token_indexes]).sort().values
    assert covered.tolist() == list(range(b.sequence_length))  # every position exactly once
    assert b.det_labels.tolist() == [1, 0] and len(b.vae_images) == 4
    assert b.vae_noised.tolist() == [False, True, False, True]
    assert b.mse_token_mask.sum() == b.mse_loss_indexes.numel()


def test_bad_inputs_raise_clear_errors(gen):
    cfg = tiny_config()
    with pytest.raises(ValueError, match="not a multiple of the latent token stride"):
        builder(cfg).build([[VAEImage(torch.zeros(3, 20, 16))]])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        builder(cfg).build([detection_sample([1], [2], torch.zeros(3, 16, 16), torch.zeros(3, 15, 14), 1)])
    with pytest.raises(ValueError, match="label"):
        detection_sample([1], [2], torch.zeros(3, 16, 16), torch.zeros(3, 14, 14), label=2)
    with pytest.raises(ValueError, match="empty"):
        builder(cfg).build([])
