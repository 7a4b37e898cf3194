"""Embedded demo data: format, determinism, split hygiene, and proof that the fakes are learnable."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

pytest.importorskip("skimage")  # only its bundled files are read; the module never imports it
pq = pytest.importorskip("pyarrow.parquet")

from unigendet.demo import data as demo_data  # noqa: E402
from unigendet.demo.data import (  # noqa: E402
    DEMO_QUESTION,
    DEMO_SOURCES,
    FAKE_ANSWER_PREFIX,
    REAL_ANSWER_PREFIX,
    demo_captions,
    make_demo_dataset,
)
from unigendet.labels import FAKECLUE_FAKE, FAKECLUE_REAL  # noqa: E402

NUM_TRAIN, NUM_HELDOUT, SIZE = 320, 128, 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The demo's default-sized build, shared by the tests that only read it."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), NUM_TRAIN, NUM_HELDOUT, SIZE, seed=0)


def _entries(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def _pixels(root: Path, entries: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(root / e["image"]), dtype=np.float64) / 255.0 for e in entries])


def _tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --------------------------------------------------------------------------- determinism, no network
def test_deterministic_and_offline(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the demo data must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    demo_data._load_source.cache_clear()  # really read the bundled files under the patch
    a = make_demo_dataset(tmp_path / "a", num_train=24, num_heldout=12, seed=3)
    b = make_demo_dataset(tmp_path / "b", num_train=24, num_heldout=12, seed=3)
    c = make_demo_dataset(tmp_path / "c", num_train=24, num_heldout=12, seed=4)
    digest_a, digest_b, digest_c = _tree_digest(a.root), _tree_digest(b.root), _tree_digest(c.root)
    assert digest_a == digest_b  # same seed -> identical bytes, file by file
    assert digest_a != digest_c  # the seed matters
    # Rebuilding smaller into the same folder leaves no stale, unreferenced images.
    small = make_demo_dataset(tmp_path / "a", num_train=4, num_heldout=2, seed=3)
    assert len(list((small.image_root / "images").rglob("*.png"))) == 4 + 4 * 2  # train + four held-out sets


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, num_train=1)
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, image_size=60)
    with pytest.raises(ValueError, match="train_generator_instances must be >= 1"):
        make_demo_dataset(tmp_path, train_generator_instances=0)


def test_training_fakes_cycle_through_the_requested_generator_instances(tmp_path):
    data = make_demo_dataset(tmp_path, num_train=96, num_heldout=12, seed=0, train_generator_instances=8)
    fakes = [m for m in _entries(data.manifest) if m["set"] == "train" and m["label"] == FAKECLUE_FAKE]
    for process in demo_data.FAKE_PROCESSES:
        assert sorted({m["instance"] for m in fakes if m["process"] == process}) == list(range(8))


# --------------------------------------------------------------------------- formats and counts
def test_counts_and_files(dataset):
    c = dataset.counts
    assert (c["train_real"], c["train_fake"]) == (NUM_TRAIN // 2, NUM_TRAIN // 2)
    assert (c["heldout_real"], c["heldout_fake"]) == (NUM_HELDOUT // 2, NUM_HELDOUT // 2)
    assert c["t2i"] == c["t2i_heldout"] == 12 * len(DEMO_SOURCES)
    sets = ("train", "heldout", "heldout_photos", "heldout_generators", "heldout_domains")
    assert len(list((dataset.root / "images" / "real").glob("*.png"))) == sum(c[f"{s}_real"] for s in sets)
    assert len(list((dataset.root / "images" / "fake").glob("*.png"))) == sum(c[f"{s}_fake"] for s in sets)
    assert len(_entries(dataset.train_json)) == NUM_TRAIN
    assert set(dataset.heldout_sets) == set(sets[1:]) and dataset.heldout_sets["heldout"] == dataset.heldout_json
    for name in sets[1:]:
        assert len(_entries(dataset.heldout_sets[name])) == NUM_HELDOUT


@pytest.mark.parametrize("which", ["train", "heldout", "heldout_photos", "heldout_generators", "heldout_domains"])
def test_fakeclue_format_and_labels(dataset, which):
    path = dataset.train_json if which == "train" else dataset.heldout_sets[which]
    for e in _entries(path):
        assert set(e) == {"image", "label", "cate", "conversations"}
        assert e["cate"] == "demo" and isinstance(e["label"], int)
        human, gpt = e["conversations"]
        assert human == {"from": "human", "value": DEMO_QUESTION}
        assert gpt["from"] == "gpt"
        answer = gpt["value"]
        # FakeClue convention: 1 = real, 0 = fake; the folder and the answer's first sentence agree.
        if e["label"] == FAKECLUE_REAL:
            assert e["image"].startswith("images/real/") and answer.startswith(REAL_ANSWER_PREFIX)
            assert "this is a fake image" not in answer.lower()
        else:
            assert e["label"] == FAKECLUE_FAKE
            assert e["image"].startswith("images/fake/") and answer.startswith(FAKE_ANSWER_PREFIX)
            assert "this is a real image" not in answer.lower()
        assert len(answer) > len(FAKE_ANSWER_PREFIX) + 20  # an explanation follows
        img = Image.open(dataset.image_root / e["image"])
        assert img.mode == "RGB" and img.size == (SIZE, SIZE)


def test_explanations_name_the_process_artefacts(dataset):
    manifest = {r["image"]: r for r in _entries(dataset.manifest)}
    answers = {e["image"]: e["conversations"][1]["value"] for e in _entries(dataset.train_json)}
    for image, answer in answers.items():
        process = manifest[image]["process"]
        clues = demo_data._REAL_CLUES if process is None else demo_data._FAKE_CLUES[process]
        assert sum(clue.lower() in answer.lower() for clue in clues) == 2
    assert len(set(answers.values())) > len(answers) // 2  # templates and clues vary


def test_t2i_parquets_hold_captioned_wide_views_of_each_photo(dataset):
    names = {s.name for s in DEMO_SOURCES}
    for path, band in ((dataset.t2i_parquet, "train"), (dataset.t2i_heldout_parquet, "heldout")):
        table = pq.read_table(path)
        assert table.column_names == ["image", "caption", "key", "photo"]
        rows = table.to_pylist()
        assert len({r["key"] for r in rows}) == len(rows)
        assert {r["photo"] for r in rows} == names and all(r["photo"] in r["key"] for r in rows)
        for r in rows:
            img = Image.open(io.BytesIO(r["image"]))
            img.load()
            assert img.size == (SIZE, SIZE)
            source = next(s for s in DEMO_SOURCES if s.name == r["photo"])
            assert any(subject in r["caption"] for subject in source.subjects)  # the caption names its photo
    captions = demo_captions()
    assert len(captions) == len(DEMO_SOURCES) and len(set(captions)) == len(captions)
    assert "a grayscale photo of a camera man" in captions
    assert demo_data.demo_photo_names() == [s.name for s in DEMO_SOURCES]


def test_detection_crops_are_close_ups_and_text_to_image_views_wide(dataset):
    records = _entries(dataset.manifest)
    assert {r["framing"] for r in records} == {"close"}
    side = lambda r: r["box"][2] - r["box"][0]  # noqa: E731
    assert max(side(r) for r in records) <= round(1.5 * SIZE)
    # Wide views: most of the band, downscaled; their pixels differ from every detection image's.
    views = pq.read_table(dataset.t2i_parquet).to_pylist()
    detection = {hashlib.sha256((dataset.root / r["image"]).read_bytes()).hexdigest() for r in records}
    assert not detection & {hashlib.sha256(r["image"]).hexdigest() for r in views}


# --------------------------------------------------------------------------- split hygiene
def test_splits_are_disjoint(dataset):
    root = dataset.root
    train, held = _entries(dataset.train_json), _entries(dataset.heldout_json)
    assert not {e["image"] for e in train} & {e["image"] for e in held}

    def digest(e: dict) -> str:  # of the decoded pixels, so re-encoded duplicates are caught too
        return hashlib.sha256(np.asarray(Image.open(root / e["image"])).tobytes()).hexdigest()

    assert not {digest(e) for e in train} & {digest(e) for e in held}

    # Source windows: every held-out crop box is disjoint from every training crop box of the same photo.
    records = _entries(dataset.manifest)
    for source in DEMO_SOURCES:
        boxes = {s: np.array([r["box"] for r in records if r["source"] == source.name and r["split"] == s])
                 for s in ("train", "heldout")}  # "heldout" covers both held-out sets cut from the training photos
        tr, he = boxes["train"], boxes["heldout"]
        assert len(tr) and len(he)
        # [x0, y0, x1, y1], half-open: overlap iff both intervals overlap.
        ox = (tr[:, None, 0] < he[None, :, 2]) & (he[None, :, 0] < tr[:, None, 2])
        oy = (tr[:, None, 1] < he[None, :, 3]) & (he[None, :, 1] < tr[:, None, 3])
        assert not (ox & oy).any(), source.name


def test_heldout_photos_and_generators_are_unseen(dataset):
    records = _entries(dataset.manifest)
    train_sources = {r["source"] for r in records if r["set"] == "train"}
    photo_sources = {r["source"] for r in records if r["set"] == "heldout_photos"}
    assert photo_sources == {s.name for s in demo_data.HELDOUT_SOURCES} and not photo_sources & train_sources
    domain_sources = {r["source"] for r in records if r["set"] == "heldout_domains"}
    assert domain_sources == {s.name for s in demo_data.HELDOUT_DOMAIN_SOURCES}
    assert not domain_sources & (train_sources | photo_sources)
    assert all(r["split"] == "all" for r in records if r["set"] in ("heldout_photos", "heldout_domains"))
    # Other random instances of the generator families: the same crop through a training instance and an unseen
    # instance differs, and a classifier's decision for the unseen set is not read off the training instances.
    rng = np.random.default_rng(0)
    seeds = np.random.SeedSequence(0).spawn(10)
    seen = demo_data.generator_instances(seeds[0], demo_data.TRAIN_GENERATOR_INSTANCES, 1.0)
    unseen = demo_data.generator_instances(seeds[1], demo_data.HELDOUT_GENERATOR_INSTANCES, 1.0)
    crop = rng.uniform(0, 1, (3, SIZE, SIZE))
    for a_gens in seen:
        for b_gens in unseen:
            assert not np.allclose(a_gens.deconv[0], b_gens.deconv[0])
            for process in demo_data.FAKE_PROCESSES:
                a = demo_data.make_fake(crop, process, a_gens, np.random.default_rng(1))
                b = demo_data.make_fake(crop, process, b_gens, np.random.default_rng(1))
                assert np.abs(a - b).max() > 0.01, process
    # Training fakes use every training instance of every family; the unseen set every unseen instance.
    fakes = [r for r in records if r["process"] is not None]
    for name, count in (("train", len(seen)), ("heldout_generators", len(unseen))):
        used = {(r["process"], r["instance"]) for r in fakes if r["set"] == name}
        assert used == {(p, k) for p in demo_data.FAKE_PROCESSES for k in range(count)}, name
    gen_sets = {r["set"] for r in records if r["process"] is not None}
    assert gen_sets == {"train", "heldout", "heldout_photos", "heldout_generators", "heldout_domains"}
    # Photograph and process are not confounded: each unseen photograph's fakes come from every family.
    for name, sources in (("heldout_photos", photo_sources), ("heldout_domains", domain_sources)):
        for source in sources:
            processes = {r["process"] for r in fakes if r["set"] == name and r["source"] == source}
            assert processes == set(demo_data.FAKE_PROCESSES), (name, source)


def test_paired_training_fakes_are_made_from_the_real_before_them(tmp_path):
    data = make_demo_dataset(tmp_path, num_train=24, num_heldout=12, seed=0, paired_train=True)
    manifest = {m["image"]: m for m in _entries(data.manifest)}
    train = _entries(data.train_json)
    for real, fake in zip(train[0::2], train[1::2], strict=True):
        r, f = manifest[real["image"]], manifest[fake["image"]]
        assert (r["label"], f["label"]) == (FAKECLUE_REAL, FAKECLUE_FAKE)
        assert f["paired_with"] == real["image"] and (f["source"], f["box"], f["flip"]) == (r["source"], r["box"],
                                                                                          r["flip"])
        # The fake is the real crop through a generator process: the same picture at a coarse scale (8x8-pixel
        # block means of the gray image), where the processes leave the content alone. Measured: paired >= 0.94,
        # unpaired crops of the same photographs up to 0.63.
        x, y = (_pixels(data.image_root, [e])[0].mean(axis=-1).reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()
                for e in (real, fake))
        assert np.corrcoef(x, y)[0, 1] > 0.9
    assert not any("paired_with" in m for m in manifest.values() if m["set"] != "train")
    unpaired = make_demo_dataset(tmp_path / "unpaired", num_train=24, num_heldout=12, seed=0)
    assert not any("paired_with" in m for m in _entries(unpaired.manifest))


def test_fake_process_meets_every_photograph():
    for num_sources in (1, 2, 3, 6, 13):
        pairs = {(i % num_sources, demo_data.fake_process(i, num_sources)) for i in range(3 * num_sources)}
        assert len(pairs) == 3 * num_sources, num_sources


def test_gray_sources_stay_gray(dataset):
    records = _entries(dataset.manifest)
    gray = {s.name for s in DEMO_SOURCES if s.gray}
    fakes = [r for r in records if r["source"] in gray and r["label"] == FAKECLUE_FAKE]
    assert fakes
    for r in fakes:
        a = np.asarray(Image.open(dataset.root / r["image"]))
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


# --------------------------------------------------------------------------- statistics and learnability
def _spectral_features(x: np.ndarray) -> np.ndarray:
    """Log power spectrum of the gray image, pooled 4x4 (a classic frequency-domain fake detector)."""
    g = x.mean(-1)
    g = g - g.mean(axis=(1, 2), keepdims=True)
    power = np.log(np.abs(np.fft.fft2(g)) ** 2 + 1e-8)
    n = g.shape[1] // 4
    return power.reshape(len(x), n, 4, n, 4).mean(axis=(2, 4)).reshape(len(x), -1)


def _colour_features(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def _ridge_accuracy(f_train, y_train, f_test, y_test, lam: float = 10.0) -> float:
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-8
    a = np.c_[(f_train - mu) / sd, np.ones(len(f_train))]
    b = np.c_[(f_test - mu) / sd, np.ones(len(f_test))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (2.0 * y_train - 1.0))
    return float(((b @ w > 0) == y_test).mean())


@pytest.fixture(scope="module")
def arrays(dataset):
    train, held = _entries(dataset.train_json), _entries(dataset.heldout_json)
    return (
        _pixels(dataset.root, train),
        np.array([e["label"] for e in train]),
        _pixels(dataset.root, held),
        np.array([e["label"] for e in held]),
    )


def test_real_and_fake_share_global_statistics(arrays):
    x_train, y_train, _, _ = arrays
    real, fake = x_train[y_train == FAKECLUE_REAL], x_train[y_train == FAKECLUE_FAKE]
    assert np.abs(real.mean(axis=(0, 1, 2)) - fake.mean(axis=(0, 1, 2))).max() < 0.05
    assert np.abs(real.std(axis=(1, 2)).mean(0) - fake.std(axis=(1, 2)).mean(0)).max() < 0.02


def test_fakes_are_learnable_from_texture_not_colour(arrays):
    x_train, y_train, x_held, y_held = arrays
    spectral = _ridge_accuracy(_spectral_features(x_train), y_train, _spectral_features(x_held), y_held)
    colour = _ridge_accuracy(_colour_features(x_train), y_train, _colour_features(x_held), y_held)
    assert spectral > 0.85, spectral  # measured 0.97 at seed 0
    assert colour < 0.7, colour  # global colour statistics carry (almost) no label


# --------------------------------------------------------------------------- single-purpose reference detectors
def _reference_script():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import demo_detection_reference

    return demo_detection_reference


def test_reference_detectors_score_every_held_out_set(dataset, capsys):
    threads = torch.get_num_threads()
    other = "2" if threads == 1 else "1"  # a count the script must change and then restore
    argv = ["--data", str(dataset.root), "--seeds", "0", "--epochs", "1", "--threads", other]
    result = _reference_script().main(argv)
    assert torch.get_num_threads() == threads  # the script restores the caller's thread count
    sets = {"heldout", "heldout_photos", "heldout_generators", "heldout_domains"}
    # The spectral ridge learns the demo's fakes (measured 93.8% on unseen crops; chance is 50%).
    assert set(result["spectral_ridge"]) == sets and result["spectral_ridge"]["heldout"] > 0.8
    (record,) = result["cnn_records"]  # one epoch only: the CNN leaves chance after about four (benchmark figures)
    assert record["epoch"] == 1 and record["image_views"] == NUM_TRAIN
    assert sets <= set(record) and all(0.0 <= record[name] <= 1.0 for name in sets)
    assert "spectral ridge: heldout " in capsys.readouterr().out


def test_reference_script_names_what_a_folder_lacks(tmp_path):
    with pytest.raises(SystemExit, match="missing fakeclue_train.json"):
        _reference_script().main(["--data", str(tmp_path), "--seeds", "0", "--epochs", "1"])
