"""Image-folder dataset layouts (GenImage, UniversalFakeDetect / ForenSynths, DRCT-2M, DeepfakeBench face frames)
written in miniature under tmp_path: records, labels, groups, order, selection, limits, containment and the
errors that name the path and the expected layout."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from unigendet.data.layouts import (
    LAYOUTS,
    ImageRecord,
    LayoutError,
    deepfakebench_label,
    index_deepfakebench,
    index_drct2m,
    index_genimage,
    index_layout,
    index_ufd,
    landmarks_name,
)
from unigendet.labels import LABEL_FAKE, LABEL_REAL


def png(path, value=0):
    """An 8x8 grey PNG at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format="PNG")
    return path


def pngs(folder, names):
    for i, name in enumerate(names):
        png(folder / name, i)


def keys(index):
    return [r.key for r in index.records]


def labels_by_key(index):
    return {r.key: r.label for r in index.records}


# --------------------------------------------------------------------------------------------------
# GenImage


def genimage_tree(root, generators=("sdv4", "adm"), nested=False):
    for gen in generators:
        base = root / gen / f"imagenet_ai_{gen}" if nested else root / gen
        for split in ("train", "val"):
            pngs(base / split / "ai", ["b.png", "a.PNG"])
            pngs(base / split / "nature", ["n1.jpg", "n2.png"])
    return root


def test_genimage_records_labels_groups_and_sorted_order(tmp_path):
    root = genimage_tree(tmp_path / "GenImage")
    index = index_genimage(root)
    assert index.layout == "genimage" and index.skipped == []
    assert index.groups == ["adm", "sdv4"]
    assert index.splits == ["train", "val"]
    assert len(index.records) == 2 * 2 * 4
    rec = next(r for r in index.records if r.key == "sdv4/val/ai/a.PNG")
    assert rec == ImageRecord((root / "sdv4/val/ai/a.PNG").resolve(), LABEL_FAKE, "sdv4", "val", "sdv4/val/ai/a.PNG")
    assert labels_by_key(index)["adm/train/nature/n2.png"] == LABEL_REAL
    assert all(r.label == (LABEL_FAKE if "/ai/" in r.key else LABEL_REAL) for r in index.records)
    assert [(r.split, r.group, r.key) for r in index.records] == sorted((r.split, r.group, r.key)
                                                                        for r in index.records)
    assert index.summary()["per_split"]["val"]["adm"] == {"real": 2, "fake": 2}


def test_genimage_nested_release_layout_and_single_generator_root(tmp_path):
    root = genimage_tree(tmp_path / "g", generators=("Midjourney",), nested=True)
    index = index_genimage(root, splits=["val"])
    assert index.groups == ["Midjourney"]
    assert set(keys(index)) == {f"Midjourney/imagenet_ai_Midjourney/val/{c}" for c in
                                ("ai/a.PNG", "ai/b.png", "nature/n1.jpg", "nature/n2.png")}
    single = index_genimage(root / "Midjourney" / "imagenet_ai_Midjourney", splits=["train"])
    assert single.groups == ["imagenet_ai_Midjourney"] and len(single.records) == 4


def test_genimage_selection_and_limit(tmp_path):
    root = genimage_tree(tmp_path / "g", generators=("a", "b", "c"))
    index = index_genimage(root, groups=["c", "a"], splits=["val"], limit_per_group=1)
    assert index.groups == ["a", "c"] and index.splits == ["val"]
    assert sorted(keys(index)) == ["a/val/ai/a.PNG", "a/val/nature/n1.jpg", "c/val/ai/a.PNG", "c/val/nature/n1.jpg"]
    with pytest.raises(LayoutError, match=r"no generator \['zz'\]; found \['a', 'b', 'c'\]"):
        index_genimage(root, groups=["zz"])
    with pytest.raises(ValueError, match="unknown split"):
        index_genimage(root, splits=["test"])
    with pytest.raises(ValueError, match="positive integer"):
        index_genimage(root, limit_per_group=0)


def test_genimage_ignores_other_files_and_hidden_names(tmp_path):
    root = genimage_tree(tmp_path / "g", generators=("a",))
    folder = root / "a" / "train" / "ai"
    for name in ("notes.txt", "x.gif", ".DS_Store", "._a.png"):
        (folder / name).write_bytes(b"junk")
    png(folder / "sub" / "deeper.png")
    for ext in (".PNG", ".BMP", ".TIF", ".TIFF"):
        png(folder / f"z{ext}")
    index = index_genimage(root, splits=["train"])
    names = sorted(r.path.name for r in index.records if r.label == LABEL_FAKE)
    assert names == ["a.PNG", "b.png", "z.BMP", "z.PNG", "z.TIF", "z.TIFF"]


def test_genimage_missing_class_folder_names_path_and_layout(tmp_path):
    root = genimage_tree(tmp_path / "g", generators=("sdv4",))
    for f in (root / "sdv4/train/nature").iterdir():
        f.unlink()
    (root / "sdv4/train/nature").rmdir()
    with pytest.raises(LayoutError) as err:
        index_genimage(root)
    msg = str(err.value)
    assert f"{root.resolve() / 'sdv4/train'} has no 'nature' folder" in msg
    assert "expected <generator>/{train,val}/{ai,nature}" in msg
    (root / "sdv4/train/ai").rename(root / "sdv4/train/fake")
    with pytest.raises(LayoutError, match="has no 'ai' or 'nature' folder"):
        index_genimage(root)
    assert len(index_genimage(root, splits=["val"]).records) == 4


def test_genimage_empty_folder_and_wrong_generator_folder_are_errors(tmp_path):
    root = genimage_tree(tmp_path / "g", generators=("sdv4",))
    for f in (root / "sdv4/val/ai").iterdir():
        f.unlink()
    (root / "sdv4/val/ai/readme.txt").write_text("no images here")
    with pytest.raises(LayoutError, match=r"sdv4/val/ai has no image files"):
        index_genimage(root)
    (root / "stray" / "x").mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"stray has no train/ or val/ folder"):
        index_genimage(root, splits=["train"])
    with pytest.raises(LayoutError, match="does not exist"):
        index_genimage(tmp_path / "nowhere")


def test_symlink_leaving_the_root_is_left_out(tmp_path):
    outside = png(tmp_path / "secret.png")
    root = genimage_tree(tmp_path / "g", generators=("a",))
    os.symlink(outside, root / "a/val/ai/c_escape.png")
    os.symlink(root / "a/val/ai/b.png", root / "a/val/ai/d_inside.png")
    os.symlink(root / "a/val/gone.png", root / "a/val/ai/e_dangling.png")
    index = index_genimage(root, splits=["val"])
    fake = {r.key: r.path for r in index.records if r.label == LABEL_FAKE}
    assert sorted(fake) == ["a/val/ai/a.PNG", "a/val/ai/b.png", "a/val/ai/d_inside.png"]
    assert fake["a/val/ai/d_inside.png"] == (root / "a/val/ai/b.png").resolve()
    assert len(index.skipped) == 2
    assert any(s.startswith("path_outside_root") for s in index.skipped)
    assert any(s.startswith("missing_file") for s in index.skipped)


def test_symlinked_folder_outside_the_root_is_an_error(tmp_path):
    root = genimage_tree(tmp_path / "g", generators=("a",))
    pngs(tmp_path / "elsewhere", ["x.png"])
    for f in (root / "a/val/ai").iterdir():
        f.unlink()
    (root / "a/val/ai").rmdir()
    os.symlink(tmp_path / "elsewhere", root / "a/val/ai")
    with pytest.raises(LayoutError, match="path_outside_root"):
        index_genimage(root, splits=["val"])


# --------------------------------------------------------------------------------------------------
# UniversalFakeDetect / ForenSynths


def ufd_tree(root):
    for cls in ("airplane", "bird"):
        for label in ("0_real", "1_fake"):
            pngs(root / "progan" / cls / label, ["1.png", "2.png"])
    pngs(root / "biggan/0_real", ["r.png"])
    pngs(root / "biggan/1_fake", ["f.png"])
    diffusion = root / "diffusion_datasets"
    pngs(diffusion / "laion/0_real", ["l1.png", "l2.png"])
    pngs(diffusion / "imagenet/0_real", ["i1.png"])
    pngs(diffusion / "guided/1_fake", ["g.png"])
    pngs(diffusion / "ldm_200/1_fake", ["d.png"])
    return root


def test_ufd_class_level_no_class_level_and_diffusion_pairs(tmp_path):
    root = ufd_tree(tmp_path / "test")
    index = index_ufd(root)
    assert index.splits == ["test"]
    assert index.groups == ["biggan", "guided", "ldm_200", "progan"]
    progan = [r for r in index.records if r.group == "progan"]
    assert len(progan) == 8 and {r.category for r in progan} == {"airplane", "bird"}
    assert labels_by_key(index)["progan/bird/1_fake/2.png"] == LABEL_FAKE
    assert labels_by_key(index)["progan/bird/0_real/2.png"] == LABEL_REAL
    biggan = [r for r in index.records if r.group == "biggan"]
    assert [(r.key, r.label, r.category) for r in biggan] == [("biggan/0_real/r.png", 0, None),
                                                              ("biggan/1_fake/f.png", 1, None)]
    guided = {r.key: r.label for r in index.records if r.group == "guided"}
    assert guided == {"diffusion_datasets/guided/1_fake/g.png": 1,
                      "guided:diffusion_datasets/imagenet/0_real/i1.png": 0}
    ldm = {r.key: r.label for r in index.records if r.group == "ldm_200"}
    assert ldm == {"diffusion_datasets/ldm_200/1_fake/d.png": 1,
                   "ldm_200:diffusion_datasets/laion/0_real/l1.png": 0,
                   "ldm_200:diffusion_datasets/laion/0_real/l2.png": 0}
    assert "laion" not in index.groups and "imagenet" not in index.groups


def test_ufd_split_folders_selection_and_even_limit(tmp_path):
    ufd_tree(tmp_path / "data" / "test")
    for cls in ("car", "cat"):
        for label in ("0_real", "1_fake"):
            pngs(tmp_path / "data/train/progan" / cls / label, ["a.png", "b.png", "c.png"])
    index = index_ufd(tmp_path / "data", groups=["progan"], limit_per_group=3)
    assert index.splits == ["test", "train"] and index.groups == ["progan"]
    train_fakes = [r for r in index.records if r.split == "train" and r.label == LABEL_FAKE]
    assert [r.key for r in train_fakes] == ["train/progan/car/1_fake/a.png", "train/progan/car/1_fake/b.png",
                                            "train/progan/cat/1_fake/a.png"]
    only_train = index_ufd(tmp_path / "data", splits=["train"])
    assert only_train.groups == ["progan"] and only_train.splits == ["train"]
    with pytest.raises(LayoutError, match=r"no subset \['nope'\]"):
        index_ufd(tmp_path / "data", groups=["nope"])
    named = index_ufd(tmp_path / "data/train", root_split="val")
    assert named.splits == ["val"]


def test_ufd_layout_errors_name_the_folder(tmp_path):
    root = ufd_tree(tmp_path / "test")
    pngs(root / "weird/images", ["x.png"])
    with pytest.raises(LayoutError) as err:
        index_ufd(root)
    assert f"{root.resolve() / 'weird'} has neither 0_real/1_fake folders" in str(err.value)
    assert "expected [{train,val,test}/]<subset>/{0_real,1_fake}/" in str(err.value)
    (root / "weird/images/x.png").unlink()
    (root / "weird/images").rmdir()
    (root / "weird").rmdir()
    pngs(root / "diffusion_datasets/mystery/1_fake", ["m.png"])
    with pytest.raises(LayoutError, match="no real folder is paired with subset 'mystery'"):
        index_ufd(root)
    index = index_ufd(root, real_sources={"mystery": "imagenet"})
    assert {r.key for r in index.records if r.group == "mystery"} == {
        "diffusion_datasets/mystery/1_fake/m.png", "mystery:diffusion_datasets/imagenet/0_real/i1.png"}
    pngs(root / "progan/horse/0_real", ["h.png"])
    with pytest.raises(LayoutError, match=r"class folder .*progan/horse has no 1_fake folder"):
        index_ufd(root)


def test_ufd_empty_class_folder_is_an_error(tmp_path):
    root = ufd_tree(tmp_path / "test")
    (root / "biggan/1_fake/f.png").unlink()
    with pytest.raises(LayoutError, match=r"biggan/1_fake has no image files"):
        index_ufd(root)
    assert "biggan" not in index_ufd(root, groups=["progan"]).groups


# --------------------------------------------------------------------------------------------------
# DRCT-2M


def drct_tree(root, generators=("sd-turbo", "stable-diffusion-v1-4")):
    for split in ("train2017", "val2017"):
        pngs(root / "MSCOCO" / split, ["000001.jpg", "000002.jpg"])
        for gen in generators:
            pngs(root / "DRCT-2M" / gen / split, ["000001.png", "000002.png", "000003.png"])
    return root


def test_drct2m_reals_as_one_group(tmp_path):
    root = drct_tree(tmp_path / "DRCT_data")
    index = index_drct2m(root, splits=["val"])
    assert index.splits == ["val"]
    assert index.groups == ["MSCOCO", "sd-turbo", "stable-diffusion-v1-4"]
    reals = [r for r in index.records if r.label == LABEL_REAL]
    assert [r.key for r in reals] == ["MSCOCO/val2017/000001.jpg", "MSCOCO/val2017/000002.jpg"]
    assert {r.group for r in reals} == {"MSCOCO"}
    fakes = [r for r in index.records if r.group == "sd-turbo"]
    assert [r.key for r in fakes] == [f"sd-turbo/val2017/00000{i}.png" for i in (1, 2, 3)]
    assert all(r.label == LABEL_FAKE for r in fakes)
    assert fakes[0].path == (root / "DRCT-2M/sd-turbo/val2017/000001.png").resolve()


def test_drct2m_paired_reals_separate_real_root_and_limit(tmp_path):
    root = drct_tree(tmp_path / "DRCT_data")
    index = index_drct2m(root / "DRCT-2M", real_root=root / "MSCOCO", groups=["sd-turbo"], splits=["train"],
                         pair_reals=True, limit_per_group=2)
    assert index.groups == ["sd-turbo"]
    assert keys(index) == ["sd-turbo/train2017/000001.png", "sd-turbo/train2017/000002.png",
                           "sd-turbo:MSCOCO/train2017/000001.jpg", "sd-turbo:MSCOCO/train2017/000002.jpg"]
    assert [r.label for r in index.records] == [1, 1, 0, 0]
    both = index_drct2m(root, splits=["val"], pair_reals=True)
    assert both.groups == ["sd-turbo", "stable-diffusion-v1-4"]
    assert all(both.summary()["per_split"]["val"][g] == {"real": 2, "fake": 3} for g in both.groups)


def test_drct2m_errors(tmp_path):
    root = drct_tree(tmp_path / "d")
    (root / "DRCT-2M/sd-turbo/val2017").rename(root / "DRCT-2M/sd-turbo/val")
    with pytest.raises(LayoutError) as err:
        index_drct2m(root, splits=["val"])
    assert f"{root.resolve() / 'DRCT-2M/sd-turbo'} has no val2017/ folder" in str(err.value)
    assert "expected <root>/MSCOCO/{train2017,val2017}/" in str(err.value)
    assert index_drct2m(root, splits=["train"]).groups == ["MSCOCO", "sd-turbo", "stable-diffusion-v1-4"]
    with pytest.raises(LayoutError, match="has no MSCOCO/ folder and no real_root"):
        index_drct2m(root / "DRCT-2M", splits=["train"])


# --------------------------------------------------------------------------------------------------
# DeepfakeBench face frames


def dfb_tree(rgb, frames=4, with_landmarks=True):
    """FF-DF-style JSON (compression level) with one real and one fake video per split, plus a Celeb-DF entry."""
    data = {"FF-DF": {"FF-real": {}, "FF-DF": {}}, "Celeb-DF-v2": {"CelebDFv2_real": {}, "CelebDFv2_fake": {}}}
    for split in ("train", "test"):
        for label, video, base in (("FF-real", f"{split}0", "FaceForensics++/original_sequences/youtube/c23"),
                                   ("FF-DF", f"{split}0_{split}1", "FaceForensics++/manipulated_sequences/Deepfakes/c23")):
            names = []
            for i in range(frames):
                rel = f"{base}/frames/{video}/{i:03d}.png"
                png(rgb / rel, i)
                if with_landmarks:
                    (rgb / f"{base}/landmarks/{video}").mkdir(parents=True, exist_ok=True)
                    np.save(rgb / f"{base}/landmarks/{video}/{i:03d}.npy", np.zeros((81, 2), np.float32))
                names.append(rel.replace("/", "\\"))
            data["FF-DF"][label][split] = {"c23": {video: {"label": label, "frames": names}}, "c40": {}}
    for label, folder in (("CelebDFv2_real", "Celeb-real"), ("CelebDFv2_fake", "Celeb-synthesis")):
        rel = f"Celeb-DF-v2/{folder}/frames/id0/000.png"
        png(rgb / rel)
        data["Celeb-DF-v2"][label]["test"] = {"id0": {"label": label, "frames": [rel]}}
    path = rgb.parent / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def test_deepfakebench_records_labels_landmarks_and_groups(tmp_path):
    rgb = tmp_path / "rgb"
    json_path = dfb_tree(rgb)
    index = index_deepfakebench(json_path, rgb, splits=["test"])
    assert index.groups == ["Celeb-DF-v2", "FF-DF"] and index.splits == ["test"]
    ff = [r for r in index.records if r.group == "FF-DF"]
    assert len(ff) == 8
    fake = next(r for r in ff if r.label == LABEL_FAKE)
    assert (fake.category, fake.video) == ("FF-DF", "test0_test1")
    assert fake.path == (rgb / "FaceForensics++/manipulated_sequences/Deepfakes/c23/frames/test0_test1/000.png").resolve()
    assert fake.landmarks == (rgb / "FaceForensics++/manipulated_sequences/Deepfakes/c23/landmarks/test0_test1/000.npy").resolve()
    assert fake.key == "FF-DF:test:FaceForensics++/manipulated_sequences/Deepfakes/c23/frames/test0_test1/000.png"
    assert {r.label for r in ff if r.category == "FF-real"} == {LABEL_REAL}
    celeb = {r.category: (r.label, r.landmarks) for r in index.records if r.group == "Celeb-DF-v2"}
    assert celeb == {"CelebDFv2_real": (LABEL_REAL, None), "CelebDFv2_fake": (LABEL_FAKE, None)}


def test_deepfakebench_selection_frames_per_video_and_limit(tmp_path):
    rgb = tmp_path / "rgb"
    json_path = dfb_tree(rgb, frames=8)
    spread = index_deepfakebench(json_path, rgb, groups=["FF-DF"], splits=["train"], frames_per_video=3)
    assert [r.path.name for r in spread.records if r.label == LABEL_REAL] == ["000.png", "002.png", "004.png"]
    limited = index_deepfakebench(json_path, rgb, groups=["FF-DF"], categories=["FF-DF"], limit_per_group=2)
    assert {r.category for r in limited.records} == {"FF-DF"}
    assert len(limited.records) == 4 and limited.splits == ["test", "train"]
    with pytest.raises(LayoutError, match="no compression level 'raw'"):
        index_deepfakebench(json_path, rgb, groups=["FF-DF"], compression="raw")
    with pytest.raises(LayoutError, match=r"no dataset \['DFDC'\]"):
        index_deepfakebench(json_path, rgb, groups=["DFDC"])
    with pytest.raises(LayoutError, match=r"no label name \['FF-NT'\]"):
        index_deepfakebench(json_path, rgb, categories=["FF-NT"])


def test_deepfakebench_hostile_and_missing_frames_are_left_out(tmp_path):
    rgb = tmp_path / "rgb"
    png(rgb / "v/frames/a/000.png")
    png(tmp_path / "outside.png")
    frames = ["v/frames/a/000.png", "../outside.png", str(tmp_path / "outside.png"), "v/frames/a/001.png", 7]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"DS": {"DS_real": {"test": {"a": {"label": "DS_real", "frames": frames},
                                                             "b": "not an entry"}}}}))
    index = index_deepfakebench(path, rgb)
    assert [r.key for r in index.records] == ["DS:test:v/frames/a/000.png"]
    reasons = sorted(s.split(":")[0] for s in index.skipped)
    assert reasons == ["absolute_path", "malformed_entry", "malformed_entry", "missing_file", "path_outside_root"]
    with pytest.raises(LayoutError, match="no landmarks file"):
        index_deepfakebench(path, rgb, require_landmarks=True)
    (rgb / "v/frames/a/000.png").unlink()
    with pytest.raises(LayoutError, match="no usable frame"):
        index_deepfakebench(path, rgb)


def test_deepfakebench_label_names(tmp_path):
    assert deepfakebench_label("FF-NT") == LABEL_FAKE and deepfakebench_label("DFDCP_Real") == LABEL_REAL
    assert deepfakebench_label("uniface_Fake") == LABEL_FAKE and deepfakebench_label("youtube-real") == LABEL_REAL
    assert deepfakebench_label("FF-DF", {"FF-DF": 0}) == LABEL_REAL
    assert deepfakebench_label("mystery") is None
    rgb = tmp_path / "rgb"
    png(rgb / "x/frames/v/0.png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"DS": {"weird": {"test": {"v": {"label": "mystery", "frames": ["x/frames/v/0.png"]}}}}}))
    with pytest.raises(LayoutError, match="unknown label name 'mystery'"):
        index_deepfakebench(path, rgb)
    assert index_deepfakebench(path, rgb, label_dict={"mystery": 1}).records[0].label == LABEL_FAKE
    path.write_text("[1, 2]")
    with pytest.raises(LayoutError, match="not a JSON object of datasets"):
        index_deepfakebench(path, rgb)


def test_landmarks_name():
    assert landmarks_name("a/frames/v/001.png") == "a/landmarks/v/001.npy"
    assert landmarks_name("frames/x/frames/v/1.jpg") == "frames/x/landmarks/v/1.npy"
    assert landmarks_name("a/v/001.png") is None


# --------------------------------------------------------------------------------------------------
# By name


def test_index_layout_dispatches_by_name(tmp_path):
    root = genimage_tree(tmp_path / "g", generators=("a",))
    assert sorted(LAYOUTS) == ["deepfakebench", "diffusionforensics", "drct2m", "genimage", "ufd"]
    assert keys(index_layout("genimage", root, splits=["val"])) == keys(index_genimage(root, splits=["val"]))
    with pytest.raises(ValueError, match="unknown dataset layout 'imagefolder'"):
        index_layout("imagefolder", root)
