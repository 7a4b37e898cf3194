"""Tiny random-weight transformers models saved with ``save_pretrained`` for offline backend tests: a CLIP model
with its image processor and a byte-level CLIP tokenizer, and a Mask2Former COCO instance-segmentation model with
its image processor. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

# The 80 COCO instance classes as transformers' Mask2Former COCO-instance checkpoints name them (their id2label is
# huggingface/label-files coco-detection-mmdet-id2label.json, i.e. mmdet's CocoDataset.CLASSES).
COCO_INSTANCE_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def _byte_level_vocab() -> dict[str, int]:
    """Every byte-level character, alone and word-final (``</w>``), then the specials last (as in OpenAI's vocab,
    so the legacy arg-max pooling over token ids finds the end-of-text token): with no merges every word becomes
    its characters."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def save_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor

    directory = Path(directory)
    vocab = _byte_level_vocab()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    return directory


def save_tiny_mask2former(directory: str | Path, seed: int = 0, num_queries: int = 4,
                          force_label: str | None = None) -> Path:
    """A 2-decoder-layer Mask2Former with a 1-block-per-stage Swin backbone and the 80 COCO instance labels.

    ``force_label``: make the output input-independent: every query predicts that class (probability ~0.996) with
    a whole-image mask (mask probability ~1), so every image yields ``num_queries`` detections of it, each with
    score ~0.996 (above the counting threshold) and box ``(0, 0, W, H)``."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    try:
        from transformers import Mask2FormerImageProcessorPil as Mask2FormerImageProcessor
    except ImportError:  # transformers 4.x
        from transformers import Mask2FormerImageProcessor

    directory = Path(directory)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    id2label = dict(enumerate(COCO_INSTANCE_NAMES))
    config = Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False, feature_size=32,
                               mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32,
                               encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=num_queries,
                               id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if force_label is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[config.label2id[force_label]] = 10.0
            # Pixel embeddings all 1 and mask embeddings all 1: every mask logit is +mask_feature_size.
            projection = model.model.pixel_level_module.decoder.mask_projection
            projection.weight.zero_()
            projection.bias.fill_(1.0)
            embedder = model.model.transformer_module.decoder.mask_predictor.mask_embedder
            last = [m for m in embedder.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.zero_()
            last.bias.fill_(1.0)
    model.save_pretrained(directory)
    Mask2FormerImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(directory)
    return directory
