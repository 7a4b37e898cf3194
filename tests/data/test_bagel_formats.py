"""BAGEL's data formats: JSON caption dicts, JSONL annotations, dataset_info configs, streaming parquet reads."""

from __future__ import annotations

import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import geometry, tiny_config
from PIL import Image

from unigendet.cli import main
from unigendet.config.loader import ConfigError, from_dict
from unigendet.data.bagel_formats import caption_index, choose_caption, convert_bagel_data_config, write_data_config
from unigendet.data.encoding import SampleEncoder
from unigendet.data.fakeclue import FakeClueSource, read_json_list
from unigendet.data.pipeline import DataConfig
from unigendet.data.quality import BadSample, DataFormatError
from unigendet.data.t2i import TextToImageSource, caption_texts
from unigendet.data.tokenizer import build_tiny_tokenizer, encode_text
from unigendet.data.transforms import vae_transform, vit_transform

CAPTIONS = ["a photo of a cat", "a red sofa", "a dog on grass", "a blue car", "is this image real or fake?"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(CAPTIONS + ["this is a fake image", "this is a real image"] * 3, vocab_size=320)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return SampleEncoder(tokenizer=tokenizer, geometry=geometry(tiny_config()),
                         vit_transform=vit_transform(max_size=56, min_size=28),
                         vae_transform=vae_transform(max_size=64, min_size=32))


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return buf.getvalue()


def bagel_parquet(path, n: int, row_group_size: int = 3):
    """BAGEL's T2I layout: encoded image bytes in ``image``, a JSON caption dict in ``captions``."""
    captions = [json.dumps({"caption_a": CAPTIONS[i % 5], "caption_b": CAPTIONS[(i + 1) % 5], "blank": " "})
                for i in range(n)]
    table = pa.table({"image": [png((i * 9 % 256, 40, 80)) for i in range(n)], "captions": captions})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_caption_dict_rule_is_seeded_and_documented():
    cell = json.dumps({"z": "third", "a": "first", "m": "second", "empty": ""})
    ordered = ["first", "second", "third"]  # non-blank captions sorted by name
    for key in ("x.parquet:0", "x.parquet:1", "y:7"):
        assert choose_caption(cell, key, seed=3) == ordered[caption_index(key, 3, 3)]
    assert choose_caption({"only": "one"}, "k", 0) == "one"
    picks = {choose_caption(cell, f"k{i}", seed) for i in range(20) for seed in (0, 1)}
    assert picks == set(ordered)  # every caption gets used across rows and seeds
    with pytest.raises(BadSample, match="malformed_entry"):
        choose_caption("a photo of a cat", "k", 0)  # a plain string is not a caption dict
    with pytest.raises(BadSample, match="empty_caption"):
        choose_caption('{"a": " "}', "k", 0)


def test_bagel_parquet_captions_become_one_caption(tmp_path, encoder, tokenizer):
    path = bagel_parquet(tmp_path / "t2i-0.parquet", 6)
    src = TextToImageSource(path, encoder, caption_column="captions", caption_format="json_dict", caption_seed=5,
                            cache_dir=tmp_path / "cache")
    for i in range(len(src)):
        key, caption, _ = src.raw_record(i)
        expected = choose_caption(json.loads(pq.read_table(path)["captions"][i].as_py()), key, 5)
        assert caption == expected and caption in CAPTIONS
        assert src.load(i).items[0].ids == encode_text(tokenizer, expected)
    raw = TextToImageSource(path, encoder, caption_column="captions", cache_dir=tmp_path / "cache")
    assert raw.raw_record(0)[1].startswith("{")  # without caption_format the JSON text would be the prompt
    assert set(caption_texts(path, "captions", "json_dict")) == set(CAPTIONS)


def test_streaming_parquet_equals_cached_read(tmp_path, encoder, monkeypatch):
    import datasets

    files = [bagel_parquet(tmp_path / f"t2i-{i}.parquet", 7 + i, row_group_size=2) for i in range(2)]
    kw = dict(caption_column="captions", caption_format="json_dict", split="train", heldout_fraction=0.3)
    cached = TextToImageSource(files, encoder, cache_dir=tmp_path / "cache", **kw)

    def no_arrow_copy(*args, **kwargs):
        raise AssertionError("streaming must not build an Arrow cache copy")

    monkeypatch.setattr(datasets, "load_dataset", no_arrow_copy)
    streamed = TextToImageSource(files, encoder, streaming=True, cached_row_groups=1, **kw)
    assert len(streamed) == len(cached) and len(cached) < 15
    for i in reversed(range(len(cached))):  # reverse order: row groups are re-read, not only scanned once
        assert streamed.raw_record(i) == cached.raw_record(i)
        a, b = streamed.load(i), cached.load(i)
        assert a.key == b.key and a.items[0].ids == b.items[0].ids and torch.equal(a.items[1].image, b.items[1].image)
    copy = pickle.loads(pickle.dumps(streamed))  # as DataLoader workers receive it: the reader reopens the file
    assert copy.raw_record(0) == cached.raw_record(0)
    with pytest.raises(DataFormatError, match="missing column"):
        TextToImageSource(files, encoder, streaming=True, caption_column="caption")


def fakeclue_entries(n: int) -> list[dict]:
    return [{"image": f"img{i}.png", "label": i % 2, "cate": "animal",
             "conversations": [{"from": "human", "value": "<image>\nis this image real or fake?"},
                               {"from": "gpt", "value": "this is a real image" if i % 2 else "this is a fake image"}]}
            for i in range(n)]


def test_jsonl_annotations_equal_json_list(tmp_path, encoder):
    entries = fakeclue_entries(4)
    for i in range(4):
        (tmp_path / f"img{i}.png").write_bytes(png((i * 50, 0, 0)))
    (tmp_path / "train.json").write_text(json.dumps(entries))
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(e) for e in entries))  # JSONL under .json
    assert read_json_list(tmp_path / "train.jsonl") == read_json_list(tmp_path / "lines.json") == entries
    listed = FakeClueSource(tmp_path / "train.json", tmp_path, encoder)
    lined = FakeClueSource(tmp_path / "train.jsonl", tmp_path, encoder)
    assert [lined.load(i).items[-1].ids for i in range(4)] == [listed.load(i).items[-1].ids for i in range(4)]
    (tmp_path / "bad.jsonl").write_text(json.dumps(entries[0]) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2"):
        read_json_list(tmp_path / "bad.jsonl")


DATASET_INFO_PY = '''
from .t2i_dataset import T2IIterableDataset

DATASET_INFO = {
    't2i_pretrain': {'t2i': {'data_dir': '%s/t2i', 'num_files': 10, 'num_total_samples': 1000}},
    'vlm_sft': {'fakeclue': {'data_dir': '%s/images', 'jsonl_path': '%s/train.jsonl', 'num_total_samples': 4}},
}
'''


def test_dataset_info_converts_to_our_sources(tmp_path):
    root = tmp_path.as_posix()
    (tmp_path / "dataset_info.py").write_text(DATASET_INFO_PY % (root, root, root))
    groups = {
        "t2i_pretrain": {"dataset_names": ["t2i"], "weight": 1, "is_mandatory": True, "num_used_data": [10],
                         "image_transform_args": {"image_stride": 16, "max_image_size": 512, "min_image_size": 256}},
        "vlm_sft": {"dataset_names": ["fakeclue"], "weight": 5, "is_mandatory": True,
                    "image_transform_args": {"image_stride": 14, "max_image_size": 980, "min_image_size": 378,
                                             "max_pixels": 2_007_040}},
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(groups))
    sections = convert_bagel_data_config(tmp_path / "dataset_info.py", tmp_path / "data.yaml")
    t2i, vlm = sections["sources"]["t2i"], sections["sources"]["fakeclue"]
    assert t2i["data_files"] == [f"{root}/t2i/*.parquet"] and t2i["caption_format"] == "json_dict"
    assert t2i["caption_column"] == "captions" and t2i["mandatory"] and t2i["weight"] == 1.0
    assert vlm == {"kind": "fakeclue", "weight": 5.0, "mandatory": True, "json_path": f"{root}/train.jsonl",
                   "image_root": f"{root}/images"}
    assert sections["vae_transform"] == {"max_size": 512, "min_size": 256, "stride": 16, "max_pixels": 1_806_336}
    data = from_dict(DataConfig, sections)
    data.validate()
    assert data.vit_transform.min_size == 378 and data.sources["t2i"].caption_format == "json_dict"
    written = yaml.safe_load(write_data_config(sections, tmp_path / "ours.yaml").read_text())
    assert written["data"] == sections
    out = tmp_path / "cli" / "data.yaml"
    assert main(["convert-data", "--dataset-info", str(tmp_path / "dataset_info.py"), "--data-yaml",
                 str(tmp_path / "data.yaml"), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["data"] == sections
    with pytest.raises(ConfigError, match="unified_edit"):
        convert_bagel_data_config(tmp_path / "dataset_info.py", {"unified_edit": {"dataset_names": ["x"]}})
    with pytest.raises(ConfigError, match="'missing' is not in dataset_info"):
        convert_bagel_data_config(tmp_path / "dataset_info.py", {"vlm_sft": {"dataset_names": ["missing"]}})
