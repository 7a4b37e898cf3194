"""Token-budget packing (TokenBudgetPacker) and the resumable, sharded PackedDataLoader."""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections import Counter

import pytest
import torch
from helpers import SPECIAL, geometry, tiny_config

from unigendet.data.packing import (
    CFGDropout,
    PlanSample,
    TextItem,
    VAEImage,
    detection_sample,
    plan_num_tokens,
    text_to_image_sample,
)
from unigendet.data.pipeline import (
    PackedDataLoader,
    PackedIterable,
    PackingConfig,
    TokenBudgetPacker,
)
from unigendet.data.quality import BadSample, DataQualityError
from unigendet.data.sharding import ShardedStream, epoch_permutation

GEOMETRY = geometry(tiny_config())


# ---------------------------------------------------------------- in-memory sources


class TextSource:
    """Record ``i`` is one text item of ``sizes[i]`` packed tokens; indices in ``bad`` are bad records."""

    def __init__(self, name: str, sizes: list[int], bad=()):
        self.name, self.sizes, self.bad = name, list(sizes), set(bad)
        self.loads: list[int] = []

    def __len__(self) -> int:
        return len(self.sizes)

    def load(self, index: int) -> PlanSample:
        self.loads.append(index)
        if index in self.bad:
            raise BadSample("missing_file", f"{self.name}/{index}.png")
        n = self.sizes[index]
        return PlanSample([TextItem([index % 100] * (n - 2))], n, "text", f"{self.name}:{index}")


MARK = {"det": 480, "t2i": 481}  # first id of the question / caption, followed by the record index


def _ident(name: str, index: int) -> list[int]:
    return [MARK[name], index // 100, index % 100]


class ImageSource:
    """Detection (SMSA) or text-to-image records with deterministic random images of a few sizes."""

    def __init__(self, name: str, n: int, bad=()):
        assert name in MARK
        self.name, self.n, self.bad = name, n, set(bad)

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> PlanSample:
        if index in self.bad:
            raise BadSample("missing_file", f"{self.name}/{index}.png")
        g = torch.Generator().manual_seed(1000 * MARK[self.name] + index)
        if self.name == "det":
            items = detection_sample(
                question_ids=_ident(self.name, index) + [5, 6],
                answer_ids=[7, 8, 9, index % 10],
                vae_image=torch.rand(3, 32, 32 * (1 + index % 2), generator=g) * 2 - 1,
                vit_image=torch.rand(3, 28, 14 * (2 + index % 2), generator=g) * 2 - 1,
                label=index % 2,
            )
        else:
            items = text_to_image_sample(_ident(self.name, index) + [1, 2],
                                         torch.rand(3, 16 * (1 + index % 3), 32, generator=g) * 2 - 1)
        return PlanSample(items, plan_num_tokens(items, GEOMETRY), self.name, f"{self.name}:{index}")


def make_packer(sources, weights, mandatory=(), limits=None, seed=0, role=0, num_roles=1,
                rng_seed=None) -> TokenBudgetPacker:
    streams = {s.name: ShardedStream(s, seed=seed, worker_id=role, num_workers=num_roles, min_seen=10**9)
               for s in sources}
    limits = limits or PackingConfig(expected_num_tokens=200, max_num_tokens=240, prefer_buffer_before=120,
                                     max_buffer_size=4)
    rng = random.Random(seed if rng_seed is None else rng_seed)
    return TokenBudgetPacker(streams, weights, list(mandatory), limits, rng)


def refs(pack) -> list[tuple[str, int]]:
    return [(e.source, e.index) for e in pack]


def pending(packer) -> list[tuple[str, int]]:
    return refs(packer.buffer) + ([] if packer.carry is None else refs([packer.carry]))


def sizes(n: int, lo: int, hi: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randint(lo, hi) for _ in range(n)]


# ---------------------------------------------------------------- TokenBudgetPacker


def test_packs_respect_the_budget_and_fill_up_when_possible():
    a = TextSource("a", sizes(60, 10, 110, seed=1))
    b = TextSource("b", sizes(40, 30, 90, seed=2))
    packer = make_packer([a, b], {"a": 1.0, "b": 1.0}, mandatory=["b"])
    lim = packer.limits
    for _ in range(150):
        pack = packer.next_pack()
        total = sum(e.sample.num_tokens for e in pack)
        assert total <= lim.max_num_tokens
        if total < lim.expected_num_tokens:
            # Closed early only because the next sample did not fit: it is carried to the next pack.
            assert packer.carry is not None and total + packer.carry.sample.num_tokens > lim.max_num_tokens
        assert len(packer.buffer) <= lim.max_buffer_size


def test_carry_and_mandatory_samples_never_overflow_the_pack():
    # Mandatory samples of up to 90 tokens plus a carried sample of up to 90 would exceed 160.
    a = TextSource("a", sizes(50, 60, 90, seed=3))
    m1 = TextSource("m1", sizes(50, 40, 70, seed=4))
    m2 = TextSource("m2", sizes(50, 10, 20, seed=5))
    limits = PackingConfig(expected_num_tokens=150, max_num_tokens=160, prefer_buffer_before=100, max_buffer_size=2)
    packer = make_packer([a, m1, m2], {"a": 1.0, "m1": 0.0, "m2": 0.0}, mandatory=["m1", "m2"], limits=limits)
    packed = []
    for _ in range(120):
        pack = packer.next_pack()
        assert sum(e.sample.num_tokens for e in pack) <= limits.max_num_tokens
        assert {"m1", "m2"} <= {e.source for e in pack}
        packed += refs(pack)
    # ... and nothing was dropped to achieve that.
    drawn = [("a", i) for i in a.loads] + [("m1", i) for i in m1.loads] + [("m2", i) for i in m2.loads]
    assert Counter(packed + pending(packer)) == Counter(drawn)


def test_every_record_is_packed_exactly_once_per_epoch():
    a = TextSource("a", sizes(97, 10, 110, seed=6))
    b = TextSource("b", sizes(53, 30, 120, seed=7))
    packer = make_packer([a, b], {"a": 2.0, "b": 1.0})
    packed = []
    while packer.streams["a"].epoch < 2 or packer.streams["b"].epoch < 2:
        packed += refs(packer.next_pack())
    drawn = [("a", i) for i in a.loads] + [("b", i) for i in b.loads]
    # No drops, no duplicates: every drawn sample is in exactly one pack or still waiting (buffer / carry).
    assert Counter(packed + pending(packer)) == Counter(drawn)
    assert len(pending(packer)) <= packer.limits.max_buffer_size + 1
    for src in (a, b):
        n = len(src)
        assert sorted(src.loads[:n]) == list(range(n)) and sorted(src.loads[n:2 * n]) == list(range(n))
        # Everything of the first epoch was trained on (the buffer drains long before two epochs end).
        assert {i for s, i in packed if s == src.name} >= set(range(n))


def test_mandatory_sources_are_in_every_pack():
    a = TextSource("a", sizes(40, 20, 80, seed=8))
    m = TextSource("m", sizes(30, 5, 60, seed=9))
    packer = make_packer([a, m], {"a": 1.0, "m": 1.0}, mandatory=["m"])
    for _ in range(100):
        assert any(e.source == "m" for e in packer.next_pack())


def test_buffer_is_used_below_prefer_buffer_before():
    limits = PackingConfig(expected_num_tokens=200, max_num_tokens=240, prefer_buffer_before=120, max_buffer_size=4)
    small = TextSource("small", [10] * 30)
    big = TextSource("big", [130] * 10)
    # No mandatory source: the pack starts empty (< 120), so the buffer head goes in first.
    packer = make_packer([small], {"small": 1.0}, limits=limits)
    stored = packer._draw("small")
    stored.sample = TextSource("x", [100]).load(0)
    packer.buffer.append(stored)
    pack = packer.next_pack()
    assert pack[0] is stored and not packer.buffer

    # A mandatory sample of 130 tokens puts the pack above prefer_buffer_before: the buffer waits.
    packer = make_packer([small, big], {"small": 1.0, "big": 0.0}, mandatory=["big"], limits=limits)
    stored = packer._draw("small")
    packer.buffer.append(stored)
    pack = packer.next_pack()
    assert stored not in pack and list(packer.buffer) == [stored]
    assert [e.source for e in pack] == ["big"] + ["small"] * 7

    # A sample that does not fit goes to the buffer while there is room, then to the next pack (carry).
    packer = make_packer([TextSource("s", [70] * 20)], {"s": 1.0}, limits=PackingConfig(230, 240, 120, 4))
    pack = packer.next_pack()
    assert len(pack) == 3 and len(packer.buffer) == 4 and packer.carry is not None
    carry, head = packer.carry, packer.buffer[0]
    pack = packer.next_pack()  # the carry, then the buffer head (the pack is below 120 tokens), then new draws
    assert pack[0] is carry and pack[1] is head and len(pack) == 3 and head not in packer.buffer


def test_weights_are_respected():
    limits = PackingConfig(expected_num_tokens=100, max_num_tokens=100, prefer_buffer_before=50, max_buffer_size=4)
    packer = make_packer([TextSource("a", [10] * 50), TextSource("b", [10] * 50)], {"a": 1.0, "b": 3.0},
                         limits=limits)
    counts = Counter(e.source for _ in range(200) for e in packer.next_pack())
    assert counts["a"] + counts["b"] == 2000
    assert 0.22 < counts["a"] / 2000 < 0.28  # expected 0.25; sd ~ 0.01


def _mid_stream_packer(make_sources):
    limits = PackingConfig(expected_num_tokens=200, max_num_tokens=230, prefer_buffer_before=60, max_buffer_size=3)
    packer = make_packer(make_sources(), {"a": 1.0, "b": 1.0}, mandatory=["b"], limits=limits, seed=3)
    for _ in range(200):
        packer.next_pack()
        if packer.buffer and packer.carry is not None:
            return packer, limits
    raise AssertionError("no state with both a buffer and a carry was reached")


def _sources(bad_a=()):
    return [TextSource("a", sizes(80, 10, 150, seed=10), bad=bad_a), TextSource("b", sizes(40, 20, 60, seed=11))]


def test_packer_state_round_trip_continues_identically():
    packer, limits = _mid_stream_packer(_sources)
    state = json.loads(json.dumps(packer.state_dict(), default=list))  # plain data only ...
    state["rng"] = packer.rng.getstate()  # ... except the RNG state, which random wants as a tuple
    expected_pending = pending(packer)
    expected = [refs(packer.next_pack()) for _ in range(40)]

    fresh = make_packer(_sources(), {"a": 1.0, "b": 1.0}, mandatory=["b"], limits=limits, seed=3, rng_seed=99)
    fresh.load_state_dict(state)
    assert pending(fresh) == expected_pending
    assert [refs(fresh.next_pack()) for _ in range(40)] == expected


def test_buffered_record_gone_bad_on_resume_is_skipped_and_counted():
    packer, limits = _mid_stream_packer(_sources)
    state = copy.deepcopy(packer.state_dict())
    gone = [i for s, i in pending(packer) if s == "a"]
    assert gone
    bad_before = packer.streams["a"].counter.num_bad

    fresh = make_packer(_sources(bad_a=gone), {"a": 1.0, "b": 1.0}, mandatory=["b"], limits=limits, seed=3)
    fresh.load_state_dict(state)
    assert all(s != "a" for s, _ in pending(fresh))
    assert fresh.streams["a"].counter.num_bad == bad_before + len(gone)
    assert fresh.streams["a"].counter.bad["missing_file"] >= len(gone)
    for _ in range(20):  # packing goes on
        assert fresh.next_pack()


# ---------------------------------------------------------------- PackedDataLoader

LIMITS = PackingConfig(expected_num_tokens=60, max_num_tokens=72, prefer_buffer_before=40, max_buffer_size=2)


def make_iterable(sources=None, rank=0, world=1, dropout=CFGDropout(0.1, 0.3, 0.3), max_bad=0.05, min_seen=50,
                  limits=LIMITS):
    sources = sources or {"det": ImageSource("det", 14), "t2i": ImageSource("t2i", 11)}
    return PackedIterable(sources, {"det": 1.0, "t2i": 2.0}, ["det"] if "det" in sources else [], limits, SPECIAL,
                          GEOMETRY, dropout, seed=5, rank=rank, world_size=world, max_bad_fraction=max_bad,
                          min_seen=min_seen)


def make_loader(num_workers=0, overfit=0, **kw) -> PackedDataLoader:
    return PackedDataLoader(make_iterable(**kw), num_workers, 2, kw.get("max_bad", 0.05), kw.get("min_seen", 50),
                            overfit_batches=overfit)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_same_batch(a, b):
    assert a.sample_lens == b.sample_lens and a.split_lens == b.split_lens and a.attn_modes == b.attn_modes
    assert a.sample_kinds == b.sample_kinds and a.latent_shapes == b.latent_shapes
    for f in ("text_ids", "text_indexes", "position_ids", "vit_tokens", "vit_position_ids", "vae_noised",
              "latent_position_ids", "ce_label_ids", "det_labels"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert len(a.vae_images) == len(b.vae_images)
    assert all(torch.equal(x, y) for x, y in zip(a.vae_images, b.vae_images))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_continues_exactly(num_workers):
    k, m = 5, 6  # k odd: the resumed loader must start on the second worker's role
    reference = make_loader(num_workers)
    expected = take(iter(reference), k + m)
    reference.close()
    assert any(a.sample_lens != b.sample_lens for a, b in zip(expected, expected[1:]))

    first = make_loader(num_workers)
    it = iter(first)
    for got, want in zip(take(it, k), expected):
        assert_same_batch(got, want)
    state = first.state_dict()
    saved = copy.deepcopy(state)
    # The interrupted loader goes on: the saved state must not move with it.
    for got, want in zip(take(it, m), expected[k:]):
        assert_same_batch(got, want)
    it.close()
    first.close()
    assert state == saved

    resumed = make_loader(num_workers)
    resumed.load_state_dict(state)
    it = iter(resumed)
    got = take(it, m)
    it.close()
    assert len(got) == m
    for a, b in zip(got, expected[k:]):
        assert_same_batch(a, b)


def test_loader_refuses_a_different_worker_count():
    loader = make_loader(0)
    it = iter(loader)
    take(it, 2)
    it.close()
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(2).load_state_dict(loader.state_dict())


def _identities(batch) -> set[tuple[str, int]]:
    ids = batch.text_ids.tolist()
    names = {v: k for k, v in MARK.items()}
    return {(names[t], 100 * ids[i + 1] + ids[i + 2]) for i, t in enumerate(ids) if t in names}


def test_ranks_see_disjoint_samples():
    no_drop = CFGDropout(0.0, 0.0, 0.0)
    seen = {}
    for rank in (0, 1):
        loader = make_loader(0, rank=rank, world=2, dropout=no_drop)
        ids: set = set()
        it = iter(loader)
        for batch in it:
            streams = loader.state_dict()["role_states"][0]["packer"]["streams"]
            if any(s["epoch"] > 0 for s in streams.values()):
                break  # only the first epoch: later epochs reshuffle the shards
            ids |= _identities(batch)
            assert len(_identities(batch)) == len(batch.sample_lens)
        it.close()
        seen[rank] = ids
        # Each rank draws from its own slice of the epoch permutation.
        for name, n in (("det", 14), ("t2i", 11)):
            shard = set(epoch_permutation(n, 5, 0)[rank::2].tolist())
            assert {i for s, i in ids if s == name} <= shard
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_overfit_batches_cycles_the_first_packs():
    normal = make_loader(0)
    it = iter(normal)
    first = take(it, 3)
    it.close()
    loader = make_loader(0, overfit=2)
    it = iter(loader)
    got = take(it, 6)
    it.close()
    for i, batch in enumerate(got):
        assert_same_batch(batch, first[i % 2])
    assert first[0].sample_lens != first[1].sample_lens or not torch.equal(first[0].text_ids, first[1].text_ids)


# ---------------------------------------------------------------- bad data on disk


def _fakeclue(tmp_path, n: int, present: int):
    """A FakeClue dataset of ``n`` entries of which only the first ``present`` have an image file."""
    from PIL import Image

    from unigendet.data.encoding import SampleEncoder
    from unigendet.data.fakeclue import FakeClueSource
    from unigendet.data.tokenizer import build_tiny_tokenizer
    from unigendet.data.transforms import vae_transform, vit_transform

    root = tmp_path / "train"
    root.mkdir()
    entries = []
    for i in range(n):
        if i < present:
            Image.new("RGB", (40, 30), (10 * i, 80, 160)).save(root / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nIs this image real or fake?"},
                {"from": "gpt", "value": "This is a fake image."}]
        entries.append({"image": f"{i}.png", "label": i % 2, "conversations": conv})
    json_path = tmp_path / "train.json"
    json_path.write_text(json.dumps(entries))
    tokenizer = build_tiny_tokenizer(["Is this image real or fake?", "This is a fake image."], vocab_size=300)
    encoder = SampleEncoder(tokenizer, GEOMETRY, vit_transform(max_size=56, min_size=28),
                            vae_transform(max_size=64, min_size=32))
    return FakeClueSource(json_path, root, encoder, name="det")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_mostly_bad_dataset_raises_data_quality_error(tmp_path, num_workers):
    sources = {"det": _fakeclue(tmp_path, n=30, present=3)}
    loader = PackedDataLoader(make_iterable(sources, max_bad=0.2, min_seen=8), num_workers, 2, 0.2, 8)
    with pytest.raises(DataQualityError, match="missing_file"):
        for _ in zip(range(50), loader):
            pass


def test_check_quality_names_the_reason(tmp_path):
    sources = {"det": _fakeclue(tmp_path, n=30, present=6)}
    # The streams tolerate everything; the loader-level check (run by the trainer every step) does not.
    loader = PackedDataLoader(make_iterable(sources, max_bad=1.0, min_seen=8), 0, 2, 0.2, 8)
    it = iter(loader)
    take(it, 3)
    it.close()
    assert loader.counter().bad["missing_file"] > 0
    with pytest.raises(DataQualityError, match="missing_file"):
        loader.check_quality()
    assert "missing_file" in loader.summary()


# ---------------------------------------------------------------- sample hooks


class _CaptionedCopy:
    """A stage-agnostic sample hook: a clean copy of the target image behind its caption."""

    def __call__(self, encoder, sample, record):
        sample.views["copy"] = [TextItem(encoder.encode(record.caption)), VAEImage(record.vae_image, noised=False)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_packs_the_views_its_hooks_attach(tmp_path, num_workers):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from unigendet.data.pipeline import DataConfig, SourceConfig, TransformConfig
    from unigendet.data.tokenizer import build_tiny_tokenizer, special_token_ids

    captions = ["a red square", "a blue circle", "green stripes"]
    cells = []
    for i in range(len(captions)):
        buf = io.BytesIO()
        Image.new("RGB", (48, 32 + 16 * i), (80 * i, 90, 160)).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"image": cells, "caption": captions}), tmp_path / "t2i.parquet")
    source = SourceConfig(kind="t2i", data_files=[str(tmp_path / "t2i.parquet")], cache_dir=str(tmp_path / "hf"))
    cfg = DataConfig(sources={"t2i": source}, cfg_dropout=CFGDropout(0.0, 0.0, 0.0), num_workers=num_workers,
                     packing=PackingConfig(expected_num_tokens=30, max_num_tokens=300, prefer_buffer_before=10,
                                           max_buffer_size=2, max_num_tokens_per_sample=300),
                     vit_transform=TransformConfig(56, 28, 14, 4096), vae_transform=TransformConfig(64, 32, 16, 4096))
    tokenizer = build_tiny_tokenizer(captions, vocab_size=300)
    special = special_token_ids(tokenizer)

    loader = PackedDataLoader.build(cfg, tokenizer, special, GEOMETRY, 0, 1, t2i_hooks=(_CaptionedCopy(),))
    it = iter(loader)
    batch = next(it)
    it.close()
    loader.close()
    copy_pack = batch.views["copy"]
    assert copy_pack.sample_kinds == ["copy"] * len(batch.sample_lens)
    assert copy_pack.attn_modes == ["causal", "full"] * len(batch.sample_lens)
    assert all(torch.equal(a, b) for a, b in zip(copy_pack.vae_images, batch.vae_images))

    plain = PackedDataLoader.build(cfg, tokenizer, special, GEOMETRY, 0, 1)
    it = iter(plain)
    assert next(it).views == {}
    it.close()
    plain.close()
