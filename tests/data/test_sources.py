"""On-disk datasets -> PlanSamples: FakeClue JSON, parquet / JSON / save_to_disk tables, bad inputs."""

from __future__ import annotations

import io
import json
import logging
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import builder, geometry, tiny_config
from PIL import Image

from unigendet.data.encoding import SampleEncoder
from unigendet.data.fakeclue import FakeClueSource
from unigendet.data.images import load_image_file
from unigendet.data.packing import TextItem, VAEImage, ViTImage
from unigendet.data.quality import BadSample, BadSampleCounter, DataFormatError, DataQualityError
from unigendet.data.splits import balanced_subset, heldout
from unigendet.data.t2i import TextToImageSource
from unigendet.data.tokenizer import build_tiny_tokenizer, encode_text
from unigendet.data.transforms import vae_transform, vit_transform
from unigendet.labels import LABEL_FAKE, LABEL_REAL, UnknownLabelError, label_name, parse_label

CORPUS = [
    "This is a fake image. The fur texture is too smooth and the shadows disagree.",
    "This is a real image. Lighting and reflections are consistent.",
    "Is this image real or fake? Explain.",
    "a photo of a cat on a red sofa",
]
QUESTION = "\nIs this image real or fake? Explain."
FAKE_ANSWER = "This is a fake image. The fur texture is too smooth."
REAL_ANSWER = "This is a real image. Lighting is consistent."


@pytest.fixture(autouse=True)
def _quiet_datasets():
    logging.getLogger("datasets").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return make_encoder(tokenizer)


def make_encoder(tokenizer, **kw) -> SampleEncoder:
    return SampleEncoder(
        tokenizer=tokenizer,
        geometry=geometry(tiny_config()),
        vit_transform=vit_transform(max_size=56, min_size=28),
        vae_transform=vae_transform(max_size=64, min_size=32),
        **kw,
    )


def png_bytes(size=(40, 30), color=(200, 30, 60), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def entry(image: str, label, human=f"<image>{QUESTION}", answer=FAKE_ANSWER, **extra) -> dict:
    conv = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return {"image": image, "label": label, "cate": "animal", "conversations": conv, **extra}


def write_fakeclue(root, entries, images: dict[str, bytes]):
    """FakeClue layout: <root>/data_json/train.json and images under <root>/train."""
    (root / "data_json").mkdir(parents=True, exist_ok=True)
    for rel, data in images.items():
        path = root / "train" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "train").mkdir(exist_ok=True)
    json_path = root / "data_json" / "train.json"
    json_path.write_text(json.dumps(entries))
    return json_path, root / "train"


def assert_packs(sample, cfg=None) -> None:
    batch = builder(cfg or tiny_config()).build([sample.items], kinds=[sample.kind])
    assert batch.sequence_length == sample.num_tokens


# ---------------------------------------------------------------- FakeClue


def test_fakeclue_smsa_layout_and_label_mapping(tmp_path, encoder, tokenizer):
    entries = [entry("animal/fake/a.png", 0), entry("animal/real/b.jpg", 1, answer=REAL_ANSWER)]
    images = {"animal/fake/a.png": png_bytes(), "animal/real/b.jpg": png_bytes((30, 50), fmt="JPEG")}
    json_path, root = write_fakeclue(tmp_path, entries, images)
    src = FakeClueSource(json_path, root, encoder)
    assert len(src) == 2 and src.label_of(0) == LABEL_FAKE and src.label_of(1) == LABEL_REAL

    s = src.load(0)
    assert s.kind == "detection" and s.key == "animal/fake/a.png"
    vae, vit, question, answer = s.items
    assert isinstance(vae, VAEImage) and not vae.noised
    assert isinstance(vit, ViTImage) and isinstance(question, TextItem) and isinstance(answer, TextItem)
    original = Image.open(root / "animal/fake/a.png").convert("RGB")
    # Both image blocks are transforms of the original image (no VAE pre-resize before the ViT).
    assert torch.equal(vae.image, encoder.vae_transform(original))
    assert torch.equal(vit.image, encoder.vit_transform(original))
    assert question.ids == encode_text(tokenizer, QUESTION) and not question.loss
    assert question.ids[0] == encode_text(tokenizer, "\n")[0]  # leading newline kept
    assert answer.ids == encode_text(tokenizer, FAKE_ANSWER)
    assert answer.loss and answer.detection_label == LABEL_FAKE
    assert src.load(1).items[-1].detection_label == LABEL_REAL  # FakeClue 1 = real -> internal 0
    assert_packs(s)
    assert_packs(src.load(1))


def test_fakeclue_prefix_and_no_smsa(tmp_path, tokenizer):
    entries = [entry("a.png", 0, human="Look closely. <image>\nReal?")]
    json_path, root = write_fakeclue(tmp_path, entries, {"a.png": png_bytes()})
    s = FakeClueSource(json_path, root, make_encoder(tokenizer)).load(0)
    assert [type(i) for i in s.items] == [TextItem, VAEImage, ViTImage, TextItem, TextItem]
    assert s.items[0].ids == encode_text(tokenizer, "Look closely. ")
    assert s.items[3].ids == encode_text(tokenizer, "\nReal?")
    plain = FakeClueSource(json_path, root, make_encoder(tokenizer, smsa=False)).load(0)
    assert [type(i) for i in plain.items] == [TextItem, ViTImage, TextItem, TextItem]  # "w/o SMSA"
    assert_packs(plain)


def test_label_conventions(tmp_path, encoder):
    entries = [entry("a.png", 0), entry("a.png", 1), entry("a.png", "Fake"), entry("a.png", "real")]
    json_path, root = write_fakeclue(tmp_path, entries, {"a.png": png_bytes()})
    fc = FakeClueSource(json_path, root, encoder)
    assert [fc.label_of(i) for i in range(4)] == [LABEL_FAKE, LABEL_REAL, LABEL_FAKE, LABEL_REAL]
    r0f1 = FakeClueSource(json_path, root, encoder, label_convention="real0_fake1")
    assert [r0f1.label_of(i) for i in range(4)] == [LABEL_REAL, LABEL_FAKE, LABEL_FAKE, LABEL_REAL]
    assert parse_label("1", "fakeclue", "x") == LABEL_REAL
    for bad in (2, -1, True, None, "maybe", 0.0):
        with pytest.raises(UnknownLabelError, match=r"^x: label"):
            parse_label(bad, "real0_fake1", "x")
    with pytest.raises(ValueError, match="label convention"):
        FakeClueSource(json_path, root, encoder, label_convention="fake1")


def test_label_name():
    assert (label_name(LABEL_REAL), label_name(LABEL_FAKE)) == ("real", "fake")
    for bad in (2, -1, True, None):
        with pytest.raises(ValueError, match="internal label"):
            label_name(bad)


def test_fakeclue_bad_entries_are_bad_samples(tmp_path, encoder):
    good = png_bytes()
    truncated = png_bytes((64, 64))[:60]
    images = {"ok.png": good, "trunc.png": truncated, "text.png": b"this is not an image"}
    cases = {
        "missing_file": entry("gone.png", 0),
        "unreadable_image": entry("trunc.png", 0),
        "unreadable_image ": entry("text.png", 1),  # non-image file with an image suffix
        "malformed_entry": ["not", "an", "object"],
        "malformed_entry ": {"label": 0, "conversations": []},  # no image path
        "unknown_label": entry("ok.png", 7),
        "empty_conversation": entry("ok.png", 0) | {"conversations": []},
        "empty_conversation ": entry("ok.png", 0, answer="  "),
        "no_image_tag": entry("ok.png", 0, human="Is this real?"),
    }
    json_path, root = write_fakeclue(tmp_path, [entry("ok.png", 0), *cases.values()], images)
    src = FakeClueSource(json_path, root, encoder)  # construction does not fail on bad entries
    assert len(src) == 1 + len(cases)
    src.load(0)
    for i, expected in enumerate(cases, start=1):
        with pytest.raises(BadSample) as err:
            src.load(i)
        assert err.value.reason == expected.strip(), (expected, err.value)
    # The detail names the offending file or record.
    with pytest.raises(BadSample, match="gone.png"):
        src.load(1)
    with pytest.raises(BadSample, match=r"train.json\[4\]"):
        src.load(4)


def test_fakeclue_file_errors(tmp_path, encoder):
    (tmp_path / "img").mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.png", ')
    with pytest.raises(DataFormatError, match="broken.json"):
        FakeClueSource(broken, tmp_path / "img", encoder)
    obj = tmp_path / "obj.json"
    obj.write_text('{"image": "a.png"}')
    with pytest.raises(DataFormatError, match="obj.json.*list"):
        FakeClueSource(obj, tmp_path / "img", encoder)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        FakeClueSource(tmp_path / "nope.json", tmp_path / "img", encoder)
    with pytest.raises(FileNotFoundError, match="no_root"):
        FakeClueSource(obj, tmp_path / "no_root", encoder)


def test_fakeclue_balance_classes(tmp_path, encoder):
    entries = [entry(f"r{i}.png", 1) for i in range(6)] + [entry(f"f{i}.png", 0) for i in range(2)]
    entries.append(entry("x.png", 5))  # invalid label: kept so that it is counted as bad when loaded
    json_path, root = write_fakeclue(tmp_path, entries, {})
    src = FakeClueSource(json_path, root, encoder, balance_classes=True, seed=3)
    assert src.label_counts() == {LABEL_REAL: 2, LABEL_FAKE: 2, None: 1}
    again = FakeClueSource(json_path, root, encoder, balance_classes=True, seed=3)
    assert [src.key_of(i) for i in range(len(src))] == [again.key_of(i) for i in range(len(again))]
    kept_real = {
        frozenset(balanced_subset([LABEL_REAL] * 6 + [LABEL_FAKE] * 2, seed)) - {6, 7} for seed in range(10)
    }
    assert len(kept_real) > 1  # the seed chooses which majority records survive


def test_too_long_is_a_bad_sample(tmp_path, tokenizer):
    json_path, root = write_fakeclue(tmp_path, [entry("a.png", 0)], {"a.png": png_bytes()})
    src = FakeClueSource(json_path, root, make_encoder(tokenizer, max_tokens_per_sample=10))
    with pytest.raises(BadSample) as err:
        src.load(0)
    assert err.value.reason == "too_long"


def test_encoder_rejects_transforms_the_packer_cannot_take(tokenizer):
    with pytest.raises(ValueError, match="stride"):
        SampleEncoder(tokenizer, geometry(tiny_config()), vit_transform(56, 28, stride=16), vae_transform(64, 32))
    with pytest.raises(ValueError, match="position table"):
        SampleEncoder(tokenizer, geometry(tiny_config()), vit_transform(56, 28), vae_transform(1024, 512))


def test_alpha_images_are_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert load_image_file(path).getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- held-out split


def test_heldout_is_deterministic_and_monotone():
    keys = [f"laion-{i}.parquet:{i % 97}" for i in range(2000)]
    small = {k for k in keys if heldout(k, 0.1)}
    assert small == {k for k in keys if heldout(k, 0.1)}
    assert 120 < len(small) < 280
    assert small <= {k for k in keys if heldout(k, 0.3)}  # growing the fraction only adds records
    assert {k for k in keys if heldout(k, 0.1, salt="other")} != small
    assert not any(heldout(k, 0.0) for k in keys) and all(heldout(k, 1.0) for k in keys)
    with pytest.raises(ValueError):
        heldout("k", 1.5)


def test_fakeclue_split_is_disjoint(tmp_path, encoder):
    entries = [entry(f"img{i}.png", i % 2) for i in range(60)]
    json_path, root = write_fakeclue(tmp_path, entries, {})
    keys = {}
    for split in ("train", "heldout", "all"):
        src = FakeClueSource(json_path, root, encoder, split=split, heldout_fraction=0.3)
        keys[split] = {src.key_of(i) for i in range(len(src))}
    assert keys["train"].isdisjoint(keys["heldout"])
    assert keys["train"] | keys["heldout"] == keys["all"] and len(keys["all"]) == 60
    assert keys["heldout"] == {f"img{i}.png" for i in range(60) if heldout(f"img{i}.png", 0.3)}


# ---------------------------------------------------------------- text-to-image tables


def write_parquet(path, images, captions, image_col="image", caption_col="caption", struct=True, **extra):
    cells = [{"bytes": b, "path": None} for b in images] if struct else images
    pq.write_table(pa.table({image_col: cells, caption_col: captions, **extra}), path)


@pytest.fixture
def t2i_kw(encoder, tmp_path):
    return {"encoder": encoder, "cache_dir": tmp_path / "hf_cache"}


def test_parquet_shards_struct_and_binary_columns(tmp_path, t2i_kw, tokenizer):
    write_parquet(tmp_path / "part-0.parquet", [png_bytes(), png_bytes((48, 20))], ["a photo of a cat", "a red sofa"])
    write_parquet(tmp_path / "part-1.parquet", [png_bytes(fmt="JPEG")], ["a cat"])
    src = TextToImageSource(str(tmp_path / "part-*.parquet"), **t2i_kw)
    assert [src.key_of(i) for i in range(len(src))] == ["part-0.parquet:0", "part-0.parquet:1", "part-1.parquet:0"]
    s = src.load(1)
    assert s.kind == "t2i" and s.key == "part-0.parquet:1"
    caption, image = s.items
    assert isinstance(caption, TextItem) and caption.enable_cfg and caption.ids == encode_text(tokenizer, "a red sofa")
    assert isinstance(image, VAEImage) and image.noised
    original = Image.open(io.BytesIO(png_bytes((48, 20)))).convert("RGB")
    assert torch.equal(image.image, t2i_kw["encoder"].vae_transform(original))
    for i in range(3):
        assert_packs(src.load(i))

    # Plain binary image column with custom column names and a key column.
    write_parquet(tmp_path / "bin.parquet", [png_bytes()], ["x"], "jpg", "txt", struct=False, uid=["id-7"])
    binary = TextToImageSource(
        tmp_path / "bin.parquet", image_column="jpg", caption_column="txt", key_column="uid", **t2i_kw
    )
    assert binary.load(0).key == "id-7" and binary.key_of(0) == "id-7"


def test_t2i_bad_rows(tmp_path, t2i_kw):
    write_parquet(
        tmp_path / "s.parquet",
        [png_bytes(), b"\x89PNG\r\n\x1a\ncorrupt", png_bytes()[:50], None, png_bytes(), png_bytes()],
        ["ok", "corrupt bytes", "truncated", "no image", "", None],
    )
    src = TextToImageSource(tmp_path / "s.parquet", **t2i_kw)
    src.load(0)
    for i, reason in enumerate(
        ["unreadable_image", "unreadable_image", "missing_image", "empty_caption", "empty_caption"], start=1
    ):
        with pytest.raises(BadSample) as err:
            src.load(i)
        assert err.value.reason == reason and "s.parquet" in err.value.detail


def test_t2i_construction_errors(tmp_path, t2i_kw):
    write_parquet(tmp_path / "s.parquet", [png_bytes()], ["x"])
    expected = r"missing column\(s\) \['text'\].*available columns: \['image', 'caption'\]"
    with pytest.raises(DataFormatError, match=expected):
        TextToImageSource(tmp_path / "s.parquet", caption_column="text", **t2i_kw)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        TextToImageSource([tmp_path / "s.parquet", tmp_path / "missing.parquet"], **t2i_kw)
    with pytest.raises(FileNotFoundError, match="nomatch"):
        TextToImageSource(str(tmp_path / "nomatch-*.parquet"), **t2i_kw)
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DataFormatError, match="junk.parquet"):
        TextToImageSource(tmp_path / "junk.parquet", **t2i_kw)


def test_t2i_save_to_disk_and_json_metadata(tmp_path, t2i_kw):
    import datasets

    ds = datasets.Dataset.from_dict({"img": [{"bytes": png_bytes(), "path": None}] * 2, "text": ["a cat", "a sofa"]})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    src = TextToImageSource(tmp_path / "saved", image_column="img", caption_column="text", **t2i_kw)
    assert len(src) == 2 and src.load(1).key == "saved:1"
    assert_packs(src.load(0))
    datasets.DatasetDict({"val": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataFormatError, match=r"no split 'train'; available: \['val'\]"):
        TextToImageSource(tmp_path / "dict", image_column="img", caption_column="text", **t2i_kw)
    val = TextToImageSource(tmp_path / "dict", image_column="img", caption_column="text", hf_split="val", **t2i_kw)
    assert len(val) == 2

    # LAION final_metadata.json: image paths relative to the metadata file's directory.
    (tmp_path / "laion" / "images").mkdir(parents=True)
    (tmp_path / "laion" / "images" / "0.png").write_bytes(png_bytes())
    meta = [{"image_path": "images/0.png", "prompt": "a cat"}, {"image_path": "images/9.png", "prompt": "gone"}]
    (tmp_path / "laion" / "final_metadata.json").write_text(json.dumps(meta))
    metadata = tmp_path / "laion" / "final_metadata.json"
    laion = TextToImageSource(metadata, image_column="image_path", caption_column="prompt", **t2i_kw)
    assert_packs(laion.load(0))
    with pytest.raises(BadSample) as err:
        laion.load(1)
    assert err.value.reason == "missing_file" and "9.png" in err.value.detail


def test_t2i_split_is_disjoint(tmp_path, t2i_kw):
    write_parquet(tmp_path / "a.parquet", [png_bytes()] * 40, [f"c{i}" for i in range(40)])
    write_parquet(tmp_path / "b.parquet", [png_bytes()] * 30, [f"d{i}" for i in range(30)])
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    keys = {}
    for split in ("train", "heldout", "all"):
        src = TextToImageSource(files, split=split, heldout_fraction=0.25, **t2i_kw)
        keys[split] = [src.key_of(i) for i in range(len(src))]
    assert set(keys["train"]).isdisjoint(keys["heldout"]) and len(keys["heldout"]) > 0
    assert sorted(keys["train"] + keys["heldout"]) == sorted(keys["all"]) and len(keys["all"]) == 70
    # Loading returns the record the key names (row lookup across files after filtering).
    src = TextToImageSource(files, split="heldout", heldout_fraction=0.25, **t2i_kw)
    assert [src.load(i).key for i in range(len(src))] == keys["heldout"]


# ---------------------------------------------------------------- counter


def test_bad_sample_counter():
    a = BadSampleCounter()
    a.add_good(8)
    a.add_bad("missing_file")
    a.add_bad("unreadable_image")
    assert a.seen == 10 and a.bad_fraction == pytest.approx(0.2)
    assert "missing_file=1" in a.summary() and "unreadable_image=1" in a.summary()
    a.check(0.5, min_seen=1)
    a.check(0.1, min_seen=11)  # not enough seen yet
    with pytest.raises(DataQualityError, match="missing_file=1, unreadable_image=1"):
        a.check(0.1, min_seen=10)
    b = BadSampleCounter()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    b.merge(a)
    assert b.good == 16 and b.bad == {"missing_file": 2, "unreadable_image": 2}



def test_sources_and_bad_samples_pickle(tmp_path, encoder, t2i_kw):
    """DataLoader workers started with spawn receive the sources pickled."""
    json_path, root = write_fakeclue(tmp_path, [entry("a.png", 0)], {"a.png": png_bytes()})
    write_parquet(tmp_path / "s.parquet", [png_bytes()], ["a cat"])
    for src in (FakeClueSource(json_path, root, encoder), TextToImageSource(tmp_path / "s.parquet", **t2i_kw)):
        original, copied = src.load(0), pickle.loads(pickle.dumps(src)).load(0)
        assert copied.key == original.key and copied.num_tokens == original.num_tokens
        assert all(torch.equal(a.image, b.image) for a, b in zip(original.items, copied.items) if hasattr(a, "image"))
    bad = pickle.loads(pickle.dumps(BadSample("missing_file", "x.png")))
    assert (bad.reason, bad.detail) == ("missing_file", "x.png")
