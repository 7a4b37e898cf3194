"""Diversity: LPIPS (AlexNet + v0.1 heads) and CLIP similarity built from test-made weights (CLIP's text path
with a test-made tokenizer too), pair counting, aggregation, sample generation layout, missing-weights errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unigendet.evaluation.diversity import (
    ClipModel,
    DiversityConfig,
    diversity_scores,
    generate_diversity_images,
    intra_prompt_clip_similarity,
    intra_prompt_lpips,
    lpips_input,
    pair_indices,
    run_diversity,
)
from unigendet.evaluation.harness import ShardSpec
from unigendet.evaluation.image_generation import GenerationSettings
from unigendet.evaluation.prompts import EvalPrompt
from unigendet.metrics.lpips import (
    ALEXNET_WEIGHTS_NAME,
    LPIPS,
    LPIPS_CHANNELS,
    load_lpips,
)

# torchvision AlexNet.features parameters (alexnet-owt-7be5be79.pth) and lpips v0.1 alex heads.
ALEXNET_SHAPES = {"features.0.weight": (64, 3, 11, 11), "features.3.weight": (192, 64, 5, 5),
                  "features.6.weight": (384, 192, 3, 3), "features.8.weight": (256, 384, 3, 3),
                  "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,)}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A random trunk (plus a stand-in classifier entry, which loading must ignore) and random positive heads."""
    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    model = LPIPS()
    trunk = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save({**trunk, "classifier.6.bias": torch.zeros(1000)}, root / ALEXNET_WEIGHTS_NAME)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}
    torch.save(heads, root / "alex.pth")
    return root / ALEXNET_WEIGHTS_NAME, root / "alex.pth"


def _images(n, seed, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_pairs():
    assert pair_indices(2) == [(0, 1)]
    pairs = pair_indices(16)
    assert len(pairs) == 120 == len(set(pairs)) and all(i < j for i, j in pairs)
    assert pair_indices(1) == []


def test_lpips_layout_loading_and_errors(lpips_files, tmp_path):
    model = load_lpips(*lpips_files)
    trunk = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    for key, shape in ALEXNET_SHAPES.items():
        assert tuple(trunk[key].shape) == shape
    assert [tuple(lin.model[1].weight.shape) for lin in model.lins] == [(1, c, 1, 1) for c in LPIPS_CHANNELS]
    heads = torch.load(lpips_files[1])
    assert torch.equal(model.lins[3].model[1].weight, heads["lin3.model.1.weight"])
    with pytest.raises(FileNotFoundError, match=ALEXNET_WEIGHTS_NAME):
        load_lpips(tmp_path / "missing.pth", lpips_files[1])
    with pytest.raises(FileNotFoundError, match="v0.1/alex.pth"):
        load_lpips(lpips_files[0], None)
    torch.save({k: v for k, v in heads.items() if not k.startswith("lin4")}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin|4"):
        load_lpips(lpips_files[0], tmp_path / "short.pth")


def test_lpips_values(lpips_files):
    model = load_lpips(*lpips_files)
    a, b = lpips_input(_images(2, seed=1), size=64)
    with torch.no_grad():
        same = model(a[None], a[None])
        ab, ba = model(a[None], b[None]), model(b[None], a[None])
    assert same.item() == 0.0 and ab.item() > 0 and ab.item() == pytest.approx(ba.item(), rel=1e-5)
    # With zero conv biases the trunk is positively homogeneous, so an input whose *scaled* version is twice
    # another's gives identical unit-normalised features: LPIPS 0. This pins the v0.1 shift/scale constants
    # and the per-position channel normalisation.
    for module in model.features:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.bias)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    x0 = a[None]
    x1 = shift + 2 * (x0 - shift)
    with torch.no_grad():
        assert model(x0, x1).item() == pytest.approx(0.0, abs=1e-6)
        assert model(x0, 2 * x0).item() > 1e-3  # plain doubling is not a pure rescale after the shift


def test_intra_prompt_lpips_is_the_mean_over_pairs(lpips_files):
    model = load_lpips(*lpips_files)
    images = _images(4, seed=2)
    x = lpips_input(images, size=64)
    with torch.no_grad():
        by_pair = [model(x[i][None], x[j][None]).item() for i, j in pair_indices(4)]
    assert intra_prompt_lpips(model, images, size=64) == pytest.approx(np.mean(by_pair), rel=1e-5)
    assert intra_prompt_lpips(model, [images[0]] * 3, size=64) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        intra_prompt_lpips(model, images[:1])
    assert lpips_input(images).shape == (4, 3, 256, 256) and lpips_input(images).min() >= -1


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    directory = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def test_clip_similarity(clip_dir, tmp_path):
    clip = ClipModel(clip_dir)
    images = _images(3, seed=3)
    emb = clip.image_embeddings(images + [images[0]], batch_size=2)
    assert emb.shape == (4, 8) and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(emb[0], emb[3], atol=1e-5)  # batch-independent
    assert intra_prompt_clip_similarity(clip.image_embeddings([images[0]] * 3)) == pytest.approx(1.0, abs=1e-5)
    sims = emb[:3] @ emb[:3].T
    expected = (sims[0, 1] + sims[0, 2] + sims[1, 2]).item() / 3
    assert intra_prompt_clip_similarity(emb[:3]) == pytest.approx(expected, abs=1e-6) and expected < 1
    with pytest.raises(FileNotFoundError, match="CLIP model not found"):
        ClipModel(tmp_path)
    with pytest.raises(RuntimeError, match="tokenizer"):
        clip.text_embeddings(["a red car"])


def test_clip_text_path_with_a_tokenizer(tmp_path):
    from helpers.tiny_hf import save_tiny_clip

    directory = save_tiny_clip(tmp_path / "clip")
    clip = ClipModel(directory, need_text=True)
    texts = ["a red car", "a photo of a blue-colored tv remote", "a photo of a red object"]
    emb = clip.text_embeddings(texts)
    assert emb.shape == (3, 8) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.cdist(emb, emb).fill_diagonal_(1).min() > 1e-4  # pooled at the end token, not a shared position
    alone = torch.cat([clip.text_embeddings([t]) for t in texts])
    assert torch.allclose(emb, alone, atol=1e-5)  # padding in a batch changes nothing
    assert clip.text_embeddings(["A  Red CAR"]).allclose(emb[0], atol=1e-6)  # CLIP's lower-casing and spaces
    image = clip.image_embeddings(_images(1, seed=6))
    assert (image @ emb.T).shape == (1, 3)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 49407  # an id this tokenizer never emits
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token_id"):
        ClipModel(directory, need_text=True)


def test_aggregation_is_mean_over_prompts(lpips_files, clip_dir):
    model, clip = load_lpips(*lpips_files), ClipModel(clip_dir)
    groups = [_images(3, seed=4), [_images(1, seed=5)[0]] * 2]
    scores = diversity_scores(groups, model, clip, lpips_size=64)
    assert scores["per_prompt_lpips"][1] == 0.0 and scores["per_prompt_lpips"][0] > 0
    assert scores["lpips"] == pytest.approx(scores["per_prompt_lpips"][0] / 2)
    assert scores["per_prompt_clip_similarity"][1] == pytest.approx(1.0, abs=1e-5)
    assert scores["clip_similarity"] == pytest.approx(np.mean(scores["per_prompt_clip_similarity"]))
    assert scores["n_prompts"] == 2 and scores["samples_per_prompt"] == [2, 3]
    only_clip = diversity_scores(groups, clip=clip)
    assert "lpips" not in only_clip and only_clip["clip_similarity"] == scores["clip_similarity"]


class FakeGenerator:
    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.calls = []

    def generate(self, prompts, seed, height, width, **kwargs):
        self.calls.append(list(seed))
        return [Image.fromarray(np.full((height, width, 3), 10 + s, dtype=np.uint8)) for s in seed]


def test_generation_layout_and_scoring_job(tmp_path, lpips_files, clip_dir):
    prompts = [EvalPrompt(i, f"k{i}", f"prompt {i}", None, i) for i in range(3)]
    settings = GenerationSettings(height=8, width=8, seed=3, batch_size=2)
    gen = FakeGenerator()
    generate_diversity_images(gen, prompts, tmp_path, 4, settings, ShardSpec(0, 2))
    assert gen.calls == [[3, 4], [5, 6]] * 2  # prompts 0 and 2, sample k uses seed + k
    assert generate_diversity_images(gen, prompts, tmp_path, 4, settings)["generated"] == 1
    meta = json.loads((tmp_path / "00001" / "metadata.json").read_text())
    assert meta == {"prompt": "prompt 1", "key": "k1", "index": 1, "seeds": [3, 4, 5, 6]}
    assert sorted(p.name for p in (tmp_path / "00001" / "samples").iterdir()) == [f"{k:05d}.png" for k in range(4)]
    with pytest.raises(ValueError, match="at least 2"):
        generate_diversity_images(gen, prompts, tmp_path, 1, settings)
    cfg = DiversityConfig(gen_dir=str(tmp_path), out_dir=str(tmp_path / "report"), lpips_alexnet=str(lpips_files[0]),
                          lpips_lin=str(lpips_files[1]), clip_dir=str(clip_dir), lpips_size=64)
    metrics = run_diversity(cfg)
    summary = metrics["diversity"]
    assert summary["n_prompts"] == 3 and summary["samples_per_prompt"] == 4 and summary["pairs_per_prompt"] == 6
    assert summary["lpips"] > 0 and summary["clip_similarity"] <= 1 + 1e-6
    report = json.loads((tmp_path / "report" / "diversity.json").read_text())
    assert report["metrics"]["diversity"]["lpips"] == pytest.approx(summary["lpips"])
    assert "not name them" in report["config"]["protocol"]
    per_prompt = json.loads((tmp_path / "report" / "diversity_per_prompt.json").read_text())
    assert per_prompt["folders"] == [0, 1, 2] and np.mean(per_prompt["per_prompt_lpips"]) == pytest.approx(
        summary["lpips"])
    with pytest.raises(ValueError, match="LPIPS weights"):
        run_diversity(DiversityConfig(gen_dir=str(tmp_path)))
