"""Hostile and unusual input to the data sources: path traversal, decompression bombs and oversized files,
high-bit-depth / float / palette / CMYK / alpha images, text that is not valid Unicode, malformed tokenizer
and corpus files, and the start-up path check."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import warnings
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import geometry, tiny_config
from PIL import Image

from unigendet.data.encoding import SampleEncoder
from unigendet.data.fakeclue import FakeClueSource, conversation_texts
from unigendet.data.images import DecodeLimits, decode_image_bytes, load_image_file, to_rgb
from unigendet.data.paths import check_source_paths, resolve_image_path
from unigendet.data.pipeline import SourceConfig, build_source
from unigendet.data.quality import BadSample, DataFormatError
from unigendet.data.sharding import ShardedStream
from unigendet.data.t2i import TextToImageSource, caption_texts
from unigendet.data.tokenizer import build_tiny_tokenizer, encode_text, load_tokenizer
from unigendet.data.transforms import vae_transform, vit_transform

QUESTION = "\nIs this image real or fake?"
ANSWER = "This is a fake image."


@pytest.fixture(autouse=True)
def _quiet_datasets():
    logging.getLogger("datasets").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer([QUESTION, ANSWER, "a photo of a cat"], vocab_size=300)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return SampleEncoder(tokenizer, geometry(tiny_config()), vit_transform(56, 28), vae_transform(64, 32))


def png_bytes(size=(40, 30), color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def entry(image: str, answer: str = ANSWER, question: str = QUESTION) -> dict:
    conv = [{"from": "human", "value": f"<image>{question}"}, {"from": "gpt", "value": answer}]
    return {"image": image, "label": 0, "conversations": conv}


def write_json(path, entries) -> None:
    # ensure_ascii keeps lone surrogates as "\ud800" escapes, exactly what a hostile JSON file holds.
    path.write_text(json.dumps(entries, ensure_ascii=True), encoding="utf-8")


def reasons(source) -> list[str | None]:
    """Per record: None if it loads, else its BadSample reason."""
    out = []
    for i in range(len(source)):
        try:
            source.load(i)
            out.append(None)
        except BadSample as bad:
            out.append(bad.reason)
    return out


def png_chunks(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: PIL cannot write 16-bit RGB, nor a header that lies about the size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def tree(tmp_path):
    """<tmp>/root holds the images; <tmp>/secret holds a file outside it."""
    root, secret = tmp_path / "root", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    secret.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    (secret / "private.png").write_bytes(png_bytes(color=(1, 2, 3)))
    (root / "escape.png").symlink_to(secret / "private.png")
    (root / "sub" / "inside.png").symlink_to(root / "a.png")
    (root / "dirlink").symlink_to(secret, target_is_directory=True)
    return root, secret


# ---------------------------------------------------------------- containment


def test_fakeclue_paths_stay_inside_the_image_root(tmp_path, tree, encoder, monkeypatch):
    root, secret = tree
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    cases = {
        "a.png": None,
        "sub/../a.png": None,
        "sub/inside.png": None,  # a symlink that stays inside the root
        "../secret/private.png": "path_outside_root",
        "sub/../../secret/private.png": "path_outside_root",
        "escape.png": "path_outside_root",  # a symlink out of the root
        "dirlink/private.png": "path_outside_root",  # through a symlinked directory
        str(secret / "private.png"): "absolute_path",
        "/etc/passwd": "absolute_path",
        "a\x00.png": "malformed_entry",
    }
    write_json(tmp_path / "t.json", [entry(name) for name in cases])
    src = FakeClueSource(tmp_path / "t.json", root, encoder)
    assert reasons(src) == list(cases.values())
    assert not [p for p in opened if "secret" in p or p == "/etc/passwd"]
    with pytest.raises(BadSample, match=r"escape.png.*resolves to .*private.png, outside"):
        src.load(5)

    allowed = FakeClueSource(tmp_path / "t.json", root, encoder, allow_absolute_paths=True)
    # Absolute paths load when allowed; relative ones must still stay inside the root.
    assert reasons(allowed)[3:9] == ["path_outside_root"] * 4 + [None, "unreadable_image"]


def test_bad_paths_are_counted_by_the_stream(tmp_path, tree, encoder):
    root, secret = tree
    names = ["a.png", "sub/inside.png"] * 2 + ["../secret/private.png", "escape.png", str(secret / "private.png")]
    write_json(tmp_path / "t.json", [entry(name) for name in names])
    stream = ShardedStream(FakeClueSource(tmp_path / "t.json", root, encoder), seed=0, worker_id=0, num_workers=1,
                           max_bad_fraction=1.0)
    for _ in range(8):  # two epochs' worth of good records: the first epoch was seen whole
        next(stream)
    assert stream.counter.bad["path_outside_root"] >= 2 and stream.counter.bad["absolute_path"] >= 1
    assert set(stream.counter.bad) == {"path_outside_root", "absolute_path"}


def test_t2i_image_paths_stay_inside_their_root(tmp_path, tree, encoder):
    root, secret = tree
    meta = [{"image_path": p, "prompt": "a cat"}
            for p in ("a.png", "../secret/private.png", "escape.png", str(secret / "private.png"))]
    (root / "meta.json").write_text(json.dumps(meta))
    kw = {"image_column": "image_path", "caption_column": "prompt", "cache_dir": tmp_path / "cache"}
    src = TextToImageSource(root / "meta.json", encoder, **kw)  # root: the metadata file's directory
    assert reasons(src) == [None, "path_outside_root", "path_outside_root", "absolute_path"]
    allowed = TextToImageSource(root / "meta.json", encoder, allow_absolute_paths=True, **kw)
    assert reasons(allowed) == [None, "path_outside_root", "path_outside_root", None]
    # An explicit image_root replaces the file's directory as the root.
    (tmp_path / "other").mkdir()
    elsewhere = TextToImageSource(root / "meta.json", encoder, image_root=tmp_path / "other", **kw)
    assert reasons(elsewhere)[:2] == ["missing_file", "path_outside_root"]


def test_resolve_image_path_reports_symlink_loops(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(BadSample) as err:
        resolve_image_path(tmp_path.resolve(), "loop", "w")
    assert err.value.reason == "unreadable_image"


def test_evaluation_fakeclue_rejects_escaping_paths(tmp_path, tree):
    from unigendet.evaluation.benchmarks import load_fakeclue

    root, secret = tree
    write_json(tmp_path / "t.json", [entry("a.png"), entry("../secret/private.png"), entry("/etc/passwd")])
    bench = load_fakeclue(tmp_path / "t.json", root)
    assert [r.path for r in bench.records] == [str(root / "a.png")]
    assert [line.split(":")[0] for line in bench.invalid] == ["path_outside_root", "absolute_path"]


def test_source_config_passes_the_options(tmp_path, tree, encoder):
    root, secret = tree
    write_json(tmp_path / "t.json", [entry(str(secret / "private.png")), entry("a.png")])
    sc = SourceConfig(kind="fakeclue", json_path=str(tmp_path / "t.json"), image_root=str(root), split="all")
    assert reasons(build_source("det", sc, encoder, seed=0)) == ["absolute_path", None]
    sc.allow_absolute_paths, sc.max_image_pixels = True, 100
    assert reasons(build_source("det", sc, encoder, seed=0)) == ["too_large", "too_large"]
    sc.max_image_bytes = 0
    with pytest.raises(Exception, match="max_image_bytes"):
        sc.validate()


# ---------------------------------------------------------------- decode limits


def test_oversized_files_and_bytes_are_too_large(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    size = path.stat().st_size
    assert load_image_file(path, DecodeLimits(max_bytes=size)).size == (40, 30)
    for load in (lambda lim: load_image_file(path, lim), lambda lim: decode_image_bytes(path.read_bytes(), "x", lim)):
        with pytest.raises(BadSample) as err:
            load(DecodeLimits(max_bytes=size - 1))
        assert err.value.reason == "too_large" and f"{size} bytes > max_image_bytes" in err.value.detail
    with pytest.raises(BadSample) as err:
        load_image_file(path, DecodeLimits(max_pixels=40 * 30 - 1))
    assert err.value.reason == "too_large" and "40x30" in err.value.detail
    with pytest.raises(ValueError, match="positive"):
        DecodeLimits(max_pixels=0)


@pytest.mark.parametrize("side", [10_000, 20_000])  # above PIL's warning threshold; above its error threshold
def test_decompression_bombs_are_too_large_without_decoding_or_warnings(tmp_path, side):
    # The header claims side x side pixels; the data holds ten bytes. Decoding would fail as truncated (or
    # allocate side**2 bytes), so "too_large" shows the size was checked from the header first.
    bomb = png_chunks(side, side, 8, 0, b"\x00" * 10)
    (tmp_path / "bomb.png").write_bytes(bomb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for load in (lambda: load_image_file(tmp_path / "bomb.png"), lambda: decode_image_bytes(bomb, "bomb")):
            with pytest.raises(BadSample) as err:
                load()
            assert err.value.reason == "too_large"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_special_files_are_not_read(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")  # opening it would block forever
    with pytest.raises(BadSample) as err:
        load_image_file(tmp_path / "fifo.png")
    assert err.value.reason == "unreadable_image" and "not a regular file" in err.value.detail
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BadSample) as err:
        load_image_file(tmp_path / "dir.png")
    assert err.value.reason == "missing_file"


# ---------------------------------------------------------------- decoding by mode


def saved(img: Image.Image, fmt: str) -> Image.Image:
    """``img`` written as ``fmt`` and decoded by load_image_file (the data path)."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    return decode_image_bytes(buf.getvalue(), f"test.{fmt}")


def grey_of(rgb: Image.Image) -> np.ndarray:
    array = np.asarray(rgb)
    assert rgb.mode == "RGB" and (array == array[..., :1]).all()
    return array[..., 0].astype(np.int64)


U16 = np.array([[0, 1, 128, 129, 257, 32767, 32768, 65279, 65534, 65535]], dtype=np.uint16)


def expected_from_16bit(values: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(values.astype(np.float64), 0, 65535) * 255 / 65535 + 0.5).astype(np.int64)


def test_16_bit_grey_png_is_scaled_not_saturated():
    img = Image.fromarray(U16)
    assert img.mode == "I;16"
    out = grey_of(saved(img, "PNG"))
    assert out.tolist() == expected_from_16bit(U16).tolist()
    assert out[0].tolist() == [0, 0, 0, 1, 1, 127, 128, 254, 255, 255]
    ramp = Image.fromarray(np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32))
    assert (grey_of(saved(ramp, "PNG")) == 255).mean() < 0.01  # the bug: 99.7% of pixels became 255


def test_16_bit_big_endian_and_32_bit_integer_tiff():
    big = Image.frombytes("I;16B", (U16.shape[1], 1), U16.astype(">u2").tobytes())
    decoded = Image.open(io.BytesIO(_tiff(big)))
    assert decoded.mode == "I;16B"
    assert grey_of(to_rgb(decoded)).tolist() == expected_from_16bit(U16).tolist()
    ints = np.array([[-5, 0, 257, 32768, 65535, 70000]], dtype=np.int32)
    assert Image.open(io.BytesIO(_tiff(Image.fromarray(ints, "I")))).mode == "I"
    assert grey_of(saved(Image.fromarray(ints, "I"), "TIFF")).tolist() == expected_from_16bit(ints).tolist()


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    return buf.getvalue()


def test_16_bit_grey_with_a_transparency_key_is_white_there():
    img = Image.fromarray(U16)
    img.info["transparency"] = 257
    assert grey_of(to_rgb(img)).tolist() == [[0, 0, 0, 1, 255, 127, 128, 254, 255, 255]]


def test_16_bit_rgb_png_keeps_the_high_byte():
    rgb = np.array([[[0, 257, 65535], [32768, 1000, 65280]]], dtype=np.uint16)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    out = np.asarray(decode_image_bytes(png_chunks(2, 1, 16, 2, raw), "rgb48"))
    assert out.tolist() == (rgb >> 8).tolist()


def test_float_tiff_is_scaled_from_unit_range():
    values = np.array([[-1.0, 0.0, 0.001, 0.25, 0.5, 0.999, 1.0, 2.0, np.nan]], dtype=np.float32)
    img = Image.fromarray(values, "F")
    out = grey_of(saved(img, "TIFF"))
    clean = np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0, 1)
    assert out.tolist() == np.floor(clean * 255 + 0.5).astype(np.int64).tolist()
    assert out[0].tolist() == [0, 0, 0, 64, 128, 255, 255, 255, 0]


def test_palette_images_with_and_without_transparency():
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    indices = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette(palette)
    colours = np.array(palette[:9]).reshape(3, 3)
    assert np.asarray(saved(img, "PNG")).tolist() == colours[indices].tolist()
    img.info["transparency"] = 1  # index 1 is transparent: composited over white
    expected = colours[indices]
    expected[indices == 1] = 255
    assert np.asarray(saved(img, "PNG")).tolist() == expected.tolist()


def test_cmyk():
    v = np.arange(0, 256, 15, dtype=np.int64)
    c, k = np.meshgrid(v, v)
    cmyk = np.stack([c, 255 - c, k // 2, k], -1).astype(np.uint8)
    out = np.asarray(saved(Image.fromarray(cmyk, "CMYK"), "TIFF")).astype(np.int64)
    ink = cmyk.astype(np.int64)
    expected = np.floor((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255 + 0.5)
    assert (out == expected).all()


def test_alpha_is_composited_over_white():
    colour, alpha = np.meshgrid(np.arange(0, 256, 3), np.arange(0, 256, 5))
    expected = np.floor(colour * alpha / 255 + 255 * (1 - alpha / 255) + 0.5)
    rgba = np.stack([colour, 255 - colour, colour, alpha], -1).astype(np.uint8)
    out = np.asarray(saved(Image.fromarray(rgba, "RGBA"), "PNG")).astype(np.int64)
    assert (out[..., 0] == expected).all() and (out[..., 2] == expected).all()
    assert (out[..., 1] == np.floor((255 - colour) * alpha / 255 + 255 * (1 - alpha / 255) + 0.5)).all()
    la = np.stack([colour, alpha], -1).astype(np.uint8)
    assert (grey_of(saved(Image.fromarray(la, "LA"), "PNG")) == expected).all()
    # 16-bit grey + alpha PNG (PIL reads it as 8-bit RGBA)
    raw = b"\x00" + np.array([65535, 0, 0, 65535], dtype=">u2").tobytes()
    assert np.asarray(decode_image_bytes(png_chunks(2, 1, 16, 4, raw), "la16")).tolist() == [[[255] * 3, [0] * 3]]


def test_grey_and_bilevel_become_rgb():
    grey = np.array([[0, 77, 255]], dtype=np.uint8)
    assert grey_of(saved(Image.fromarray(grey, "L"), "PNG")).tolist() == grey.tolist()
    bilevel = Image.fromarray(grey > 100)
    assert bilevel.mode == "1"
    assert grey_of(saved(bilevel, "PNG")).tolist() == [[0, 0, 255]]


# ---------------------------------------------------------------- text that is not valid Unicode


def test_lone_surrogates_are_bad_text_not_a_crash(tmp_path, tree, encoder):
    root, _ = tree
    cases = {
        "answer": entry("a.png", answer="fake \ud800"),
        "question": entry("a.png", question="real? \udfff"),
        "escaped byte": entry("a.png", answer="x \udc80"),  # what surrogateescape makes of a bad byte
    }
    write_json(tmp_path / "t.json", [entry("a.png"), *cases.values(), entry("a\ud800.png"), *[entry("a.png")] * 4])
    src = FakeClueSource(tmp_path / "t.json", root, encoder, split="train", heldout_fraction=0.5)
    src_all = FakeClueSource(tmp_path / "t.json", root, encoder, split="all")
    assert reasons(src_all) == [None, "bad_text", "bad_text", "bad_text", "malformed_entry"] + [None] * 4
    with pytest.raises(BadSample, match=r"t.json\[1\]: gpt turn: not valid Unicode"):
        src_all.load(1)
    assert len(src) >= 1  # hashing the keys of a split survives a surrogate in an image path
    stream = ShardedStream(src_all, seed=0, worker_id=0, num_workers=1, max_bad_fraction=1.0)
    for _ in range(10):  # two epochs' worth of good records: the first epoch was seen whole
        next(stream)
    assert stream.counter.bad["bad_text"] >= 3 and stream.counter.bad["malformed_entry"] >= 1
    assert set(stream.counter.bad) == {"bad_text", "malformed_entry"}


def test_t2i_caption_with_a_lone_surrogate_is_bad_text(tmp_path, encoder, monkeypatch):
    pq.write_table(pa.table({"image": [png_bytes()], "caption": ["a cat"]}), tmp_path / "s.parquet")
    src = TextToImageSource(tmp_path / "s.parquet", encoder, cache_dir=tmp_path / "cache")
    # Arrow cannot store a lone surrogate; a row reader that yields one (another format) must not crash.
    monkeypatch.setattr(src, "_row", lambda part, row: {"image": png_bytes(), "caption": "a \ud800 cat"})
    with pytest.raises(BadSample, match=r"s.parquet:0: caption: not valid Unicode") as err:
        src.load(0)
    assert err.value.reason == "bad_text"


def test_encode_text_rejects_lone_surrogates(tokenizer):
    with pytest.raises(BadSample) as err:
        encode_text(tokenizer, "a \ud800 b")
    assert err.value.reason == "bad_text" and "'\\ud800' at 2" in err.value.detail
    assert encode_text(tokenizer, "a \x00 b")  # odd but valid Unicode still encodes


# ---------------------------------------------------------------- corpus and tokenizer files


def test_tiny_tokenizer_corpora_name_the_broken_file(tmp_path):
    write_json(tmp_path / "t.json", [entry("a.png"), entry("b.png", answer="bad \ud800"), "junk"])
    assert conversation_texts(tmp_path / "t.json") == [QUESTION, ANSWER, QUESTION]
    (tmp_path / "broken.json").write_text('[{"image": ')
    with pytest.raises(DataFormatError, match="broken.json"):
        conversation_texts(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        conversation_texts(tmp_path / "missing.json")

    pq.write_table(pa.table({"caption": ["a cat", None]}), tmp_path / "c.parquet")
    assert caption_texts(str(tmp_path / "*.parquet"), "caption") == ["a cat", "None"]
    with pytest.raises(DataFormatError, match=r"'text' of .*c.parquet"):
        caption_texts(tmp_path / "c.parquet", "text")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="junk.parquet"):
        caption_texts(tmp_path / "junk.parquet", "caption")
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        caption_texts(tmp_path / "gone.parquet", "caption")


@pytest.mark.parametrize("broken, content, named", [
    ("tokenizer.json", '{"version": ', "tokenizer.json"),
    ("tokenizer_config.json", "{", "tokenizer_config.json"),
    ("tokenizer.json", '{"version": "1.0"}', "tok"),  # valid JSON, not a tokenizer: the directory is named
])
def test_load_tokenizer_names_the_malformed_file(tmp_path, tokenizer, broken, content, named):
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / broken).write_text(content)
    with pytest.raises(OSError, match=rf"could not load the tokenizer from \S*{named}:"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------- start-up path check


def test_check_source_paths_names_the_config_key(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "t.json").write_text("[]")
    (tmp_path / "a.parquet").write_bytes(b"")
    good = SourceConfig(kind="fakeclue", json_path=str(tmp_path / "t.json"), image_root=str(tmp_path / "img"))
    assert check_source_paths(good, "data.sources.det") == []
    bad = SourceConfig(kind="fakeclue", json_path=str(tmp_path / "nope.json"), image_root=str(tmp_path / "noimg"))
    assert check_source_paths(bad, "data.sources.det") == [
        f"data.sources.det.json_path: no such file: {tmp_path / 'nope.json'}",
        f"data.sources.det.image_root: not a directory: {tmp_path / 'noimg'}",
    ]
    t2i = SourceConfig(kind="t2i", data_files=[str(tmp_path / "a.parquet"), str(tmp_path / "b-*.parquet"),
                                               str(tmp_path / "c.parquet")])
    assert check_source_paths(t2i, "data.sources.laion") == [
        f"data.sources.laion.data_files[1]: no file matches {tmp_path / 'b-*.parquet'}",
        f"data.sources.laion.data_files[2]: data file not found: {tmp_path / 'c.parquet'}",
    ]
