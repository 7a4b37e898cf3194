"""FID: Fréchet distance math, the FID Inception layout (strict loading of a file in the official layout),
preprocessing, held-out prompt selection, sharded/resumable generation, and one CLI generate -> FID run on the
tiny model with a random Inception written by the test. No real weights are needed."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

from unigendet.data.splits import DEFAULT_HELDOUT_SALT, heldout
from unigendet.data.t2i import TextToImageSource
from unigendet.evaluation.fid import generate_fid_images, run_fid_generation
from unigendet.evaluation.harness import ShardSpec, resolve_shard
from unigendet.evaluation.image_generation import (
    GenerationSettings,
    crop_black_border,
    folder_name,
    write_run_file,
)
from unigendet.evaluation.prompts import PromptSelection, PromptTable, select_prompts
from unigendet.metrics.fid import (
    FID_WEIGHTS_NAME,
    FIDInceptionV3,
    activation_statistics,
    fid_preprocess,
    frechet_distance,
    inception_activations,
    load_fid_inception,
)

# --------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.5, 3, size=5), rng.uniform(0.5, 3, size=5)
    # Commuting covariances: Tr(sqrt(S1 S2)) = sum sqrt(d1 d2).
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-9)
    # Same eigenvalues in a rotated basis: the distance is basis-independent.
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2, q @ np.diag(d2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(mu1, np.diag(d1), mu1, np.diag(d1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_errors_and_singular_retry(monkeypatch):
    with pytest.raises(ValueError, match="mean vectors differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    # A non-PSD "covariance" gives sqrt(-4) = 2i on the diagonal: a large imaginary part is an error.
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -4.0]))

    from scipy import linalg

    real_sqrtm, calls = linalg.sqrtm, []

    def flaky_sqrtm(matrix, *args, **kwargs):
        calls.append(matrix.copy())
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix, *args, **kwargs)

    monkeypatch.setattr(linalg, "sqrtm", flaky_sqrtm)
    value = frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([4.0, 0.0]), eps=1e-3)
    assert len(calls) == 2 and np.allclose(calls[1], np.diag([1.001 * 4.001, 1e-6]))  # (S1 + eps I)(S2 + eps I)
    # Traces of the original covariances, minus twice the trace of diag(sqrt(1.001 * 4.001), 1e-3).
    assert value == pytest.approx(1 + 4 - 2 * (np.sqrt(1.001 * 4.001) + 1e-3), abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Network layout and loading


# Parameter/buffer names and shapes of pt_inception-2015-12-05-6726825d.pth: pytorch-fid builds torchvision's
# inception_v3(num_classes=1008, aux_logits=False), swaps in the FID blocks (same parameters) and loads the file
# strictly; torchvision's BasicConv2d is conv (no bias) + bn (eps 0.001).
KNOWN_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_state_dict_layout_matches_the_official_file():
    model = FIDInceptionV3()
    state = model.state_dict()
    for key, shape in KNOWN_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    # torchvision's inception_v3 has 27,161,264 parameters with its aux head (3,326,696) and 1000 classes;
    # without the aux head and with 1008 classes (+8 x 2049): 23,850,960.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960


def test_fid_block_pooling_variants():
    from unigendet.metrics.fid import FIDInceptionE, _tf_avg_pool

    # TensorFlow average pooling ignores the zero padding: a constant map stays constant up to the border.
    assert torch.equal(_tf_avg_pool(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    model = FIDInceptionV3()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    torch.manual_seed(0)
    block = FIDInceptionE(8, pool="max").eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        pooled = block(x)[:, -192:]  # branch_pool comes last
        assert torch.allclose(pooled, block.branch_pool(torch.nn.functional.max_pool2d(x, 3, 1, 1)))
        assert not torch.allclose(pooled, block.branch_pool(_tf_avg_pool(x)))


def _random_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights that keep activations O(1) through the 90+ layers (default init makes them vanish)."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / FID_WEIGHTS_NAME
    torch.save(_random_inception().state_dict(), path)
    return path


def test_weights_load_strictly_and_errors(inception_file, tmp_path):
    model = load_fid_inception(inception_file)
    assert not model.training
    saved = torch.load(inception_file)
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, saved["Mixed_7c.branch_pool.conv.weight"])
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME):
        load_fid_inception(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        load_fid_inception(None)
    state = torch.load(inception_file)
    del state["fc.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="fc.bias"):
        load_fid_inception(tmp_path / "partial.pth")
    torch.save({**torch.load(inception_file), "AuxLogits.fc.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="AuxLogits"):
        load_fid_inception(tmp_path / "extra.pth")


# --------------------------------------------------------------------------------------------------
# Preprocessing and activations


def test_preprocess_centre_crop_then_lanczos_299():
    array = np.zeros((30, 60, 3), dtype=np.uint8)
    array[:, :15] = (0, 0, 255)  # only the 15-px side strips are blue: the centre square is red
    array[:, 15:45] = (255, 0, 0)
    array[:, 45:] = (0, 0, 255)
    out = fid_preprocess(Image.fromarray(array))
    assert out.size == (299, 299) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    assert pixels[..., 0].min() > 250 and pixels[..., 2].max() < 5
    square = Image.fromarray(np.full((299, 299, 3), 7, dtype=np.uint8))
    assert np.array_equal(np.asarray(fid_preprocess(square)), np.asarray(square))  # already 299²: untouched
    # The kernel is LANCZOS (the official script's), which differs from bilinear/bicubic on noise.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 64, 3), dtype=np.uint8))
    lanczos = noise.crop((7, 0, 57, 50)).resize((299, 299), Image.LANCZOS)
    assert np.array_equal(np.asarray(fid_preprocess(noise)), np.asarray(lanczos))
    assert not np.array_equal(np.asarray(lanczos), np.asarray(noise.crop((7, 0, 57, 50)).resize((299, 299))))
    gray = Image.fromarray(np.full((20, 20), 100, dtype=np.uint8), mode="L")
    assert fid_preprocess(gray).mode == "RGB"


def _noise_images(n: int, seed: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # N < dims: singular covariances
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    model = _random_inception()
    images = _noise_images(8, seed=1)
    shifted = [Image.fromarray(np.clip(np.asarray(im).astype(int) + 60, 0, 255).astype(np.uint8)) for im in images]
    acts = inception_activations(model, images, batch_size=3, dims=192)
    assert acts.shape == (8, 192) and acts.dtype == np.float64
    # Batching does not change activations (each image is independent).
    assert np.allclose(acts, inception_activations(model, images, batch_size=8, dims=192), atol=1e-5)
    same = frechet_distance(*activation_statistics(acts), *activation_statistics(acts))
    other = frechet_distance(*activation_statistics(acts),
                             *activation_statistics(inception_activations(model, shifted, dims=192)))
    assert abs(same) < 1e-6 * other and other > 0


def test_pool3_features_are_2048_wide():
    model = _random_inception()
    acts = inception_activations(model, _noise_images(2, seed=2, size=24))
    assert acts.shape == (2, 2048) and np.isfinite(acts).all() and not np.allclose(acts[0], acts[1])
    with pytest.raises(ValueError, match="dims"):
        model(torch.zeros(1, 3, 8, 8), dims=100)


# --------------------------------------------------------------------------------------------------
# Prompt selection


def _laion(root, n=40, missing=()):
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rows.append({"image_path": f"images/{i}.png", "prompt": f"a photo number {i}"})
        if i not in missing:
            Image.fromarray(np.full((20, 28, 3), (i * 5) % 256, dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "final_metadata.json").write_text(json.dumps(rows))
    return PromptTable([str(root / "final_metadata.json")], cache_dir=str(root / "hf_cache"))


def test_heldout_prompts_follow_the_training_rule(tmp_path):
    table = _laion(tmp_path, n=40)
    prompts = select_prompts(PromptSelection(table, rule="heldout", heldout_fraction=0.3, limit=None))
    keys = [p.key for p in prompts]
    expected = [f"final_metadata.json:{i}" for i in range(40) if heldout(f"final_metadata.json:{i}", 0.3)]
    assert keys == expected and 0 < len(keys) < 40
    # The training loader with split="train" and the same fraction/salt sees none of them.
    train = TextToImageSource(table.data_files, encoder=None, image_column="image_path", caption_column="prompt",
                              cache_dir=table.cache_dir, split="train", heldout_fraction=0.3)
    assert set(keys).isdisjoint(train.key_of(i) for i in range(len(train)))
    assert [p.index for p in prompts] == list(range(len(prompts)))
    assert prompts[0].prompt == f"a photo number {keys[0].split(':')[1]}"
    assert prompts[0].image_path == f"images/{keys[0].split(':')[1]}.png"
    capped = select_prompts(PromptSelection(table, heldout_fraction=0.3, limit=2))
    assert [p.key for p in capped] == keys[:2]
    salted = select_prompts(PromptSelection(table, heldout_fraction=0.3, heldout_salt="other", limit=None))
    assert [p.key for p in salted] != keys and DEFAULT_HELDOUT_SALT == "unigendet"


def test_official_slice_is_positional(tmp_path):
    table = _laion(tmp_path, n=12)
    prompts = select_prompts(PromptSelection(table, rule="official_slice", slice_start=5, slice_stop=9))
    assert [p.key for p in prompts] == [f"final_metadata.json:{i}" for i in range(5, 9)]
    assert "NOT a verified held-out split" in PromptSelection(table, rule="official_slice").describe()
    with pytest.raises(ValueError, match="past the table"):
        select_prompts(PromptSelection(table, rule="official_slice"))  # [10000:15000] of 12 rows
    with pytest.raises(ValueError, match="selection rule"):
        PromptSelection(table, rule="random")


# --------------------------------------------------------------------------------------------------
# Generation: shards, resume, layout


class FakeGenerator:
    """Records calls; returns a grey image with a black border (so the getbbox crop is visible)."""

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.calls = []

    def generate(self, prompts, seed, height, width, **kwargs):
        self.calls.append((list(prompts), list(seed), kwargs))
        images = []
        for s in seed:
            array = np.zeros((height, width, 3), dtype=np.uint8)
            array[2:-2, 3:-3] = 100 + s % 100
            images.append(Image.fromarray(array))
        return images


def test_shards_resume_and_layout(tmp_path):
    table = _laion(tmp_path / "laion", n=30)
    prompts = select_prompts(PromptSelection(table, heldout_fraction=0.5, limit=5))
    settings = GenerationSettings(height=16, width=20, num_steps=3, seed=7, batch_size=2)
    out = tmp_path / "gen"
    gen = FakeGenerator()
    first = generate_fid_images(gen, prompts, out, settings, ShardSpec(0, 2))
    assert first == {"assigned": 3, "generated": 3, "skipped_existing": 0}
    assert sorted(s for _, seeds, _ in gen.calls for s in seeds) == [7 + 0, 7 + 2, 7 + 4]
    assert gen.calls[0][2]["cfg_interval"] == (0.0, 1.0) and gen.calls[0][2]["cfg_text_scale"] == 4.0
    second = generate_fid_images(gen, prompts, out, settings, ShardSpec(1, 2))
    assert second["generated"] == 2
    again = generate_fid_images(FakeGenerator(), prompts, out, settings, ShardSpec(0, 1))
    assert again == {"assigned": 5, "generated": 0, "skipped_existing": 5}
    folder = out / folder_name(prompts[1])
    assert folder.name == f"00001_{prompts[1].image_path.split('/')[1][:-4]}"
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["prompt"] == prompts[1].prompt and meta["image_path"] == prompts[1].image_path
    assert meta["seed"] == 8 and meta["key"] == prompts[1].key
    assert Image.open(folder / "00000.png").size == (14, 12)  # black border cropped
    assert not list(out.rglob("*.tmp"))
    # A folder with an image but no metadata (killed mid-write) is redone.
    (folder / "metadata.json").unlink()
    assert generate_fid_images(FakeGenerator(), prompts, out, settings)["generated"] == 1


def test_run_files_and_shard_parsing(tmp_path, monkeypatch):
    write_run_file(tmp_path / "run.json", {"a": 1, "b": 2})
    write_run_file(tmp_path / "run.json", {"a": 1, "b": 3}, ignore=("b",))
    with pytest.raises(ValueError, match=r"different \['a'\]"):
        write_run_file(tmp_path / "run.json", {"a": 2, "b": 2})
    assert resolve_shard("1/4") == ShardSpec(1, 4)
    with pytest.raises(ValueError, match="I/N"):
        resolve_shard("4/4")
    with pytest.raises(ValueError, match="I/N"):
        resolve_shard("two")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resolve_shard(None) == ShardSpec(3, 8)
    black = Image.new("RGB", (5, 5))
    assert crop_black_border(black).size == (5, 5)


def test_generation_refuses_to_mix_settings(tmp_path):
    table = _laion(tmp_path / "laion", n=10)
    selection = PromptSelection(table, heldout_fraction=0.5, limit=2)
    settings = GenerationSettings(height=16, width=16)
    run_fid_generation(FakeGenerator(), selection, tmp_path / "gen", settings)
    assert (tmp_path / "gen" / "samples_grid.png").is_file()
    # Another batch size is fine (images do not depend on it); another CFG scale is not.
    run_fid_generation(FakeGenerator(), selection, tmp_path / "gen", GenerationSettings(height=16, width=16,
                                                                                         batch_size=4))
    with pytest.raises(ValueError, match="generation.json"):
        run_fid_generation(FakeGenerator(), selection, tmp_path / "gen",
                           GenerationSettings(height=16, width=16, cfg_text_scale=2.0))


# --------------------------------------------------------------------------------------------------
# End to end: CLI generate -> FID on the tiny model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from unigendet.checkpoint.export import save_model_directory
    from unigendet.data.tokenizer import build_tiny_tokenizer
    from unigendet.models.unigendet import UniGenDet
    from unigendet.models.vae import FluxVAE

    torch.manual_seed(0)
    model = UniGenDet(tiny_config()).eval()
    torch.nn.init.normal_(model.llm2vae.weight, std=0.02)
    vae = FluxVAE(tiny_config().vae)
    tokenizer = build_tiny_tokenizer(["a photo number one two three of a red cat"] * 4, vocab_size=300)
    directory = tmp_path_factory.mktemp("export") / "model"
    save_model_directory(directory, model, model.state_dict(), vae, tokenizer)
    return directory


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_cli_generate_then_fid(model_dir, inception_file, tmp_path, capsys, monkeypatch):
    from unigendet.cli import main

    table = _laion(tmp_path / "laion", n=12, missing=(0, 1, 2, 3, 4, 5))
    gen = tmp_path / "gen"
    common = ["--model", str(model_dir), "--device", "cpu", "--gen-dir", str(gen)]
    data = ["--data-files", table.data_files[0], "--cache-dir", table.cache_dir, "--selection", "official-slice",
            "--slice", "3", "9"]
    sampler = ["--steps", "3", "--size", "32", "--seed", "5"]
    for shard in ("0/2", "1/2"):
        assert main(["eval", "fid", "--stage", "generate", *common, *data, *sampler, "--shard", shard]) == 0
    assert len(list(gen.glob("*/00000.png"))) == 6
    capsys.readouterr()
    score = ["eval", "fid", "--stage", "score", *common, "--inception-weights", str(inception_file), "--dims", "64",
             "--out", str(tmp_path / "report")]
    assert main(score) == 0
    printed = json.loads(capsys.readouterr().out)["fid"]
    # Rows 3..8 of which 3, 4, 5 have no real image: 3 pairs, 3 skipped.
    assert printed["n_pairs"] == 3 and printed["n_missing_real"] == 3 and printed["fid"] >= 0
    assert any("not pool3" in n for n in printed["notes"]) and any("positional" in n for n in printed["notes"])
    report = json.loads((tmp_path / "report" / "fid.json").read_text())
    assert report["metrics"]["fid"] == printed
    config = report["config"]
    assert config["fid"]["inception_weights"]["official_pytorch_fid_weights"] is False
    assert config["prompts"]["rule"] == "official_slice" and config["generation"]["sampler"]["num_steps"] == 3
    assert config["seed"] == 5 and config["weights_sha256"] and config["dtype"] == "float32"
    # Scoring again reuses the cached activations: the network is not run.
    import unigendet.metrics.fid as fid_module

    monkeypatch.setattr(fid_module, "inception_activations", lambda *a, **k: pytest.fail("cache not used"))
    assert main(score) == 0
    assert json.loads(capsys.readouterr().out)["fid"]["fid"] == printed["fid"]
    # A missing weights file is a user error: one line naming the file, exit 2; --debug raises it instead.
    assert main(["eval", "fid", "--stage", "score", *common]) == 2
    assert FID_WEIGHTS_NAME in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME):
        main(["eval", "fid", "--stage", "score", *common, "--debug"])
