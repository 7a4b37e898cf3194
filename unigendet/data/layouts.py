"""Image-folder layouts of public AI-image detection datasets, read into :class:`ImageRecord` lists.

Each layout has one ``index_<layout>`` function returning a :class:`LayoutIndex`: the records (image path,
internal label ``1 = fake`` / ``0 = real``, group, split, key, and where the layout has them the object class,
the video and a landmarks file) plus the entries that were left out. The layouts:

=================  ===========================================================================  ====================
layout             on disk                                                                      dataset labels
=================  ===========================================================================  ====================
``genimage``       ``<root>/<generator>/[<subfolder>/]{train,val}/{ai,nature}/<image>``          ai = fake,
                                                                                                nature = real
``ufd``            ``<root>/[{train,val,test}/]<subset>/[<class>/]{0_real,1_fake}/<image>``;     0_real = real,
                   diffusion test sets in ``diffusion_datasets/<subset>/1_fake``, their reals    1_fake = fake
                   in ``diffusion_datasets/{laion,imagenet}/0_real``
``drct2m``         ``<root>/MSCOCO/{train2017,val2017}/<image>`` (real) and                      MSCOCO = real,
                   ``<root>/DRCT-2M/<generator>/{train2017,val2017}/<image>`` (fake)             generator = fake
``deepfakebench``  a DeepfakeBench dataset JSON ``{dataset: {label name: {split: [{compression:]    label names mapped
                   {video: {"label", "frames"}}}}}}``; frames ``.../frames/<video>/<n>.png``,     by a label dict
                   landmarks ``.../landmarks/<video>/<n>.npy``                                   (0 real, 1 fake)
=================  ===========================================================================  ====================

``diffusionforensics`` (DiffusionForensics, released with DIRE): ``<root>/{train,val,test}/<domain>/<generator>/
[<sub-folders>/]<image>`` with root = the dataset's ``images/`` folder; generator folder ``real`` = real, any
other generator folder = fake.

Rules shared by every layout:

* Images are found by extension (:data:`IMAGE_EXTENSIONS`, any case) directly inside their folder (sub-folders of
  a class folder are not searched); other files and names starting with ``.`` (``.DS_Store``, ``._x.png``) are
  ignored. A folder of the layout without any image is an error naming it.
* A layout that does not match raises :class:`LayoutError` naming the path and the expected layout. One image that
  cannot be used (a symlink leaving the root, an undecodable file name, a JSON frame that is missing) is left out
  and listed in ``LayoutIndex.skipped``; an index with no image at all is an error.
* Every path stays inside its root once symlinks are resolved (:func:`unigendet.data.paths.resolve_image_path`).
* Order is deterministic: records sorted by split, group and key. ``groups`` and ``splits`` select (an unknown
  name is an error listing the names found); ``limit_per_group`` keeps at most N real and N fake images per group
  and split, taken in turn from the group's folders (classes, videos) in sorted order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from unigendet.data.paths import check_image_name, resolve_image_path
from unigendet.data.quality import BadSample, DataFormatError
from unigendet.labels import LABEL_FAKE, LABEL_REAL, label_name

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

T = TypeVar("T")


class LayoutError(DataFormatError):
    """A dataset directory or file does not have the layout its loader expects; the message names the path and
    the expected layout."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a layout.

    ``path``: the file, symlinks resolved, inside the layout's root. ``label``: internal (0 = real, 1 = fake).
    ``group``: what per-group metrics are computed over (GenImage / DRCT-2M generator, UFD subset, DeepfakeBench
    dataset). ``split``: ``train`` / ``val`` / ``test``. ``key``: unique and stable within one index (a path
    relative to the root, prefixed where one file serves several groups or splits). ``category``: the UFD object
    class or the DeepfakeBench label name (``FF-DF``); ``video``: the DeepfakeBench video; ``landmarks``: its
    ``.npy`` landmarks file when present.
    """

    path: Path
    label: int
    group: str
    split: str
    key: str
    category: str | None = None
    video: str | None = None
    landmarks: Path | None = None


@dataclass
class LayoutIndex:
    """The records of one layout read with one set of options, and the entries left out (``"reason: detail"``)."""

    layout: str
    root: Path
    records: list[ImageRecord]
    skipped: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        """Group names in record order."""
        return list(dict.fromkeys(r.group for r in self.records))

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(r.split for r in self.records))

    def summary(self) -> dict[str, Any]:
        """Counts per split and group: ``{split: {group: {"real": n, "fake": n}}}``."""
        counts: dict[str, dict[str, dict[str, int]]] = {}
        for rec in self.records:
            per = counts.setdefault(rec.split, {}).setdefault(rec.group, {"real": 0, "fake": 0})
            per[label_name(rec.label)] += 1
        return {"layout": self.layout, "root": str(self.root), "n_records": len(self.records),
                "n_skipped": len(self.skipped), "per_split": counts}


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _root_dir(root: str | Path, layout: str, expected: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise LayoutError(f"{layout}: {path} does not exist; expected {expected}")
    if not path.is_dir():
        raise LayoutError(f"{layout}: {path} is not a directory; expected {expected}")
    return path.resolve()


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if _visible(p.name) and p.is_dir())


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit_per_group must be a positive integer or None, got {limit!r}")


def _check_splits(splits: Sequence[str] | None, known: Sequence[str], layout: str,
                  where: Path | None = None) -> list[str]:
    """The selected splits, sorted (all ``known`` ones by default); LayoutError for one that is not known (not
    one of the layout's, or not found under ``where``)."""
    if splits is None:
        return list(known)
    if isinstance(splits, str):
        raise ValueError(f"{layout}: splits must be a list of names, got the string {splits!r}")
    unknown = [s for s in splits if s not in known]
    if unknown or not splits:
        found = f"found under {where}" if where is not None else "known"
        raise LayoutError(f"{layout}: unknown split(s) {unknown or splits!r}; {found}: {list(known)}")
    return sorted(set(splits))


def _select(found: Sequence[str], wanted: Sequence[str] | None, what: str, where: Path, layout: str,
            expected: str) -> list[str]:
    """The names to read: all ``found`` (sorted), or ``wanted``, each of which must be among them."""
    if wanted is None:
        if not found:
            raise LayoutError(f"{layout}: {where} has no {what} folder; expected {expected}")
        return sorted(found)
    if isinstance(wanted, str):
        raise ValueError(f"{layout}: groups must be a list of names, got the string {wanted!r}")
    missing = [w for w in wanted if w not in found]
    if missing:
        raise LayoutError(f"{layout}: {where} has no {what} {missing}; found {sorted(found)}")
    return sorted(set(wanted))


def _take_evenly(lists: Sequence[Sequence[T]], limit: int | None) -> list[T]:
    """Everything (``limit`` None) or at most ``limit`` items taken in turn from each list, in order."""
    if limit is None:
        return [item for items in lists for item in items]
    taken: list[T] = []
    depth = 0
    while len(taken) < limit and any(depth < len(items) for items in lists):
        for items in lists:
            if depth < len(items) and len(taken) < limit:
                taken.append(items[depth])
        depth += 1
    return taken


def _is_image_name(name: str) -> bool:
    return _visible(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class _Found(NamedTuple):
    listed: Path  # the image as listed in its folder (a symlink's own name)
    path: Path  # the file it designates, symlinks resolved


def _folder_images(folder: Path, root: Path, layout: str, expected: str, skipped: list[str]) -> list[_Found]:
    """Image files directly inside ``folder`` (a path under ``root``, both as listed), kept inside ``root``.

    Regular files of a folder that resolves inside the root are inside it; a symlinked file is resolved and left
    out (listed in ``skipped``) when it leaves the root or dangles. LayoutError when the folder holds no image
    file, or only unusable ones, or itself resolves outside the root.
    """
    rel_folder = folder.relative_to(root).as_posix()
    try:
        real_folder = resolve_image_path(root, rel_folder, f"{layout} folder")
    except BadSample as bad:
        raise LayoutError(f"{layout}: folder {folder} is not usable ({bad}); expected {expected}") from None
    with os.scandir(folder) as scan:
        entries = sorted((e for e in scan if _is_image_name(e.name)), key=lambda e: e.name)
    if not entries:
        raise LayoutError(f"{layout}: {folder} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                          f"expected {expected}")
    images = []
    for entry in entries:
        rel = f"{rel_folder}/{entry.name}"
        try:
            if entry.is_symlink():
                path = resolve_image_path(root, rel, layout)
                if not path.is_file():
                    raise BadSample("missing_file", f"{layout}: {folder / entry.name} is a dangling symlink")
            elif entry.is_file():
                check_image_name(rel, layout)
                path = real_folder / entry.name
            else:
                continue
        except BadSample as bad:
            skipped.append(str(bad))
            continue
        images.append(_Found(folder / entry.name, path))
    if not images:
        problem = f" (first problem: {skipped[-1]})" if skipped else ""
        raise LayoutError(f"{layout}: no usable image file in {folder}{problem}; expected {expected}")
    return images


def _finish(layout: str, root: Path, records: list[ImageRecord], skipped: list[str]) -> LayoutIndex:
    """The index, records sorted by (split, group, key); LayoutError if one key occurs twice (an image listed
    twice)."""
    records = sorted(records, key=lambda r: (r.split, r.group, r.key))
    twice = [a.key for a, b in zip(records, records[1:]) if a.key == b.key]
    if twice:
        raise LayoutError(f"{layout} {root}: {len(twice)} image(s) listed twice, e.g. {twice[0]}")
    if skipped:
        logger.warning("%s %s: %d image(s) left out, e.g. %s", layout, root, len(skipped), skipped[0])
    index = LayoutIndex(layout, root, records, skipped)
    logger.info("%s %s: %d images in %d group(s) %s", layout, root, len(index.records), len(index.groups),
                index.splits)
    return index


# --------------------------------------------------------------------------------------------------
# GenImage

GENIMAGE = "GenImage"
GENIMAGE_EXPECTED = "<generator>/{train,val}/{ai,nature}/ (or <generator>/<subfolder>/{train,val}/{ai,nature}/)"
GENIMAGE_SPLITS = ("train", "val")
GENIMAGE_CLASS_DIRS = {"nature": LABEL_REAL, "ai": LABEL_FAKE}


def _has_split_dir(path: Path, splits: Sequence[str]) -> bool:
    return any((path / s).is_dir() for s in splits)


def _genimage_base(folder: Path) -> Path:
    """The directory holding ``train/`` and ``val/`` of generator folder ``folder``: itself, or its one
    sub-folder that does (the released archives nest ``imagenet_ai_0419_sdv4/`` in ``stable_diffusion_v_1_4/``)."""
    if _has_split_dir(folder, GENIMAGE_SPLITS):
        return folder
    inner = [d for d in _subdirs(folder) if _has_split_dir(d, GENIMAGE_SPLITS)]
    if len(inner) == 1:
        return inner[0]
    if inner:
        raise LayoutError(f"{GENIMAGE}: {folder} has several sub-folders with train/ or val/ "
                          f"({[d.name for d in inner]}); expected {GENIMAGE_EXPECTED}")
    raise LayoutError(f"{GENIMAGE}: {folder} has no train/ or val/ folder (directly or in one sub-folder); "
                      f"expected {GENIMAGE_EXPECTED}")


def index_genimage(root: str | Path, groups: Sequence[str] | None = None, splits: Sequence[str] | None = None,
                   limit_per_group: int | None = None) -> LayoutIndex:
    """GenImage: ``<root>/<generator>/{train,val}/{ai,nature}/<image>``; group = generator folder name.

    Labels: folder ``ai`` = fake (-> 1), ``nature`` = real (-> 0). The generator folder may hold the split
    folders through one sub-folder, as the released archives do (``ADM/imagenet_ai_0508_adm/train/ai``); ``root``
    may also be one generator folder itself. Every selected split of a selected generator must have both ``ai/``
    and ``nature/``. ``groups``: generator folder names; ``splits``: ``train`` / ``val`` (default both).
    """
    _check_limit(limit_per_group)
    root = _root_dir(root, GENIMAGE, GENIMAGE_EXPECTED)
    split_names = _check_splits(splits, GENIMAGE_SPLITS, GENIMAGE)
    single = _has_split_dir(root, GENIMAGE_SPLITS)
    folders = {root.name: root} if single else {d.name: d for d in _subdirs(root)}
    records: list[ImageRecord] = []
    skipped: list[str] = []
    for generator in _select(list(folders), groups, "generator", root, GENIMAGE, GENIMAGE_EXPECTED):
        base = _genimage_base(folders[generator])
        for split in split_names:
            records += _genimage_split(root, generator, base, split, limit_per_group, skipped)
    return _finish("genimage", root, records, skipped)


def _genimage_split(root: Path, generator: str, base: Path, split: str, limit: int | None,
                    skipped: list[str]) -> list[ImageRecord]:
    split_dir = base / split
    if not split_dir.is_dir():
        raise LayoutError(f"{GENIMAGE}: {base} has no '{split}' folder; expected {GENIMAGE_EXPECTED}")
    missing = [c for c in ("ai", "nature") if not (split_dir / c).is_dir()]
    if missing:
        names = " or ".join(f"'{c}'" for c in missing)
        raise LayoutError(f"{GENIMAGE}: {split_dir} has no {names} folder; expected {GENIMAGE_EXPECTED}")
    records = []
    for cls, label in GENIMAGE_CLASS_DIRS.items():
        found = _folder_images(split_dir / cls, root, GENIMAGE, GENIMAGE_EXPECTED, skipped)
        records += [ImageRecord(f.path, label, generator, split, f.listed.relative_to(root).as_posix())
                    for f in _take_evenly([found], limit)]
    return records


# --------------------------------------------------------------------------------------------------
# UniversalFakeDetect / ForenSynths

UFD = "UniversalFakeDetect"
UFD_EXPECTED = ("[{train,val,test}/]<subset>/{0_real,1_fake}/ or <subset>/<class>/{0_real,1_fake}/; "
                "diffusion_datasets/<subset>/1_fake/ with reals in diffusion_datasets/{laion,imagenet}/0_real/")
UFD_SPLITS = ("train", "val", "test")
UFD_CLASS_DIRS = {"0_real": LABEL_REAL, "1_fake": LABEL_FAKE}
UFD_DIFFUSION_DIR = "diffusion_datasets"
# The real folder each UniversalFakeDetect diffusion test set is scored against (its evaluation pairs Guided
# with ImageNet and the LAION-prompted generators with LAION).
UFD_DIFFUSION_REALS = {"guided": "imagenet", "ldm_200": "laion", "ldm_200_cfg": "laion", "ldm_100": "laion",
                       "glide_100_27": "laion", "glide_50_27": "laion", "glide_100_10": "laion", "dalle": "laion"}


@dataclass
class _UfdSubset:
    folder: Path
    leaves: list[tuple[str | None, Path]]  # (object class or None, folder holding 0_real/ and/or 1_fake/)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def real_only(self) -> bool:
        """Only ``0_real/``: a folder of reals other subsets are paired with, not a subset."""
        return all(not (leaf / "1_fake").is_dir() for _, leaf in self.leaves)


def _ufd_classify(folder: Path) -> _UfdSubset:
    """A subset folder: with ``0_real``/``1_fake`` directly, or with one class folder per object class, each
    holding both."""
    if any((folder / c).is_dir() for c in UFD_CLASS_DIRS):
        return _UfdSubset(folder, [(None, folder)])
    children = _subdirs(folder)
    if not any((c / k).is_dir() for c in children for k in UFD_CLASS_DIRS):
        raise LayoutError(f"{UFD}: {folder} has neither 0_real/1_fake folders nor <class>/{{0_real,1_fake}} "
                          f"folders; expected {UFD_EXPECTED}")
    for child in children:
        missing = [c for c in UFD_CLASS_DIRS if not (child / c).is_dir()]
        if missing:
            raise LayoutError(f"{UFD}: class folder {child} has no {' or '.join(missing)} folder; "
                              f"expected {UFD_EXPECTED}")
    return _UfdSubset(folder, [(c.name, c) for c in children])


def _ufd_subsets(split_dir: Path) -> dict[str, _UfdSubset]:
    """Every folder of one split holding a subset or reals: its sub-folders, and those of ``diffusion_datasets/``."""
    found: dict[str, _UfdSubset] = {}
    for folder in _subdirs(split_dir):
        for sub in _subdirs(folder) if folder.name == UFD_DIFFUSION_DIR else [folder]:
            subset = _ufd_classify(sub)
            if subset.name in found:
                raise LayoutError(f"{UFD}: two subsets named {subset.name!r} under {split_dir} "
                                  f"({found[subset.name].folder} and {sub}); expected {UFD_EXPECTED}")
            found[subset.name] = subset
    return found


def _ufd_split_dirs(root: Path, splits: Sequence[str] | None, root_split: str | None) -> dict[str, Path]:
    present = [s for s in UFD_SPLITS if (root / s).is_dir()]
    if present:
        return {s: root / s for s in _check_splits(splits, present, UFD, root)}
    name = root_split or (root.name if root.name in UFD_SPLITS else "test")
    return {s: root for s in _check_splits(splits, [name], UFD, root)}


def index_ufd(root: str | Path, groups: Sequence[str] | None = None, splits: Sequence[str] | None = None,
              limit_per_group: int | None = None, root_split: str | None = None,
              real_sources: Mapping[str, str] | None = None) -> LayoutIndex:
    """UniversalFakeDetect / ForenSynths (CNNDetection): ``<subset>/{0_real,1_fake}/<image>`` or, with an object
    class level, ``<subset>/<class>/{0_real,1_fake}/<image>``; group = subset, category = class.

    Labels: ``0_real`` = real (-> 0), ``1_fake`` = fake (-> 1), the internal convention. ``root`` either holds
    ``train/`` / ``val/`` / ``test/`` folders (``splits`` selects among them) or is one split, named
    ``root_split`` (default: root's own name when it is train/val/test, else ``test``). Subsets in a
    ``diffusion_datasets/`` folder are read one level down; a subset with only ``1_fake/`` is scored against the
    ``0_real/`` of its paired real folder next to it (:data:`UFD_DIFFUSION_REALS`, overridden or extended by
    ``real_sources`` ``{subset: real folder}``), whose images then appear in each subset that uses them (keys
    ``<subset>:<path>``). Folders with only ``0_real/`` are real sources, not subsets. ``groups``: subset names,
    each found in at least one selected split (a split without it is passed over).
    """
    _check_limit(limit_per_group)
    root = _root_dir(root, UFD, UFD_EXPECTED)
    split_dirs = _ufd_split_dirs(root, splits, root_split)
    per_split = {split: _ufd_subsets(folder) for split, folder in split_dirs.items()}
    subset_names = {n for found in per_split.values() for n, s in found.items() if not s.real_only}
    chosen = _select(sorted(subset_names), groups, "subset", root, UFD, UFD_EXPECTED)
    pairs = {**UFD_DIFFUSION_REALS, **(real_sources or {})}
    records: list[ImageRecord] = []
    skipped: list[str] = []
    for split, found in per_split.items():
        for name in chosen:
            if name in found and not found[name].real_only:
                records += _ufd_subset_records(root, split, found[name], pairs, limit_per_group, skipped)
    return _finish("ufd", root, records, skipped)


def _ufd_subset_records(root: Path, split: str, subset: _UfdSubset, pairs: Mapping[str, str], limit: int | None,
                        skipped: list[str]) -> list[ImageRecord]:
    records = []
    for cls, label in UFD_CLASS_DIRS.items():
        per_leaf: list[list[tuple[str | None, _Found]]] = []
        for category, leaf in subset.leaves:
            folder = leaf / cls if (leaf / cls).is_dir() else _ufd_paired_reals(subset, pairs)
            found = _folder_images(folder, root, UFD, UFD_EXPECTED, skipped)
            per_leaf.append([(category, f) for f in found])
        for category, f in _take_evenly(per_leaf, limit):
            key = f.listed.relative_to(root).as_posix()
            if not f.listed.is_relative_to(subset.folder):
                key = f"{subset.name}:{key}"
            records.append(ImageRecord(f.path, label, subset.name, split, key, category=category))
    return records


def _ufd_paired_reals(subset: _UfdSubset, pairs: Mapping[str, str]) -> Path:
    """The ``0_real/`` folder a subset without one is paired with."""
    source = pairs.get(subset.name)
    if source is None:
        raise LayoutError(f"{UFD}: {subset.folder} has no 0_real/ folder and no real folder is paired with "
                          f"subset {subset.name!r} (pass real_sources={{{subset.name!r}: <folder>}}); "
                          f"expected {UFD_EXPECTED}")
    folder = subset.folder.parent / source / "0_real"
    if not folder.is_dir():
        raise LayoutError(f"{UFD}: subset {subset.name!r} takes its reals from {folder}, which does not exist; "
                          f"expected {UFD_EXPECTED}")
    return folder


# --------------------------------------------------------------------------------------------------
# DRCT-2M

DRCT = "DRCT-2M"
DRCT_EXPECTED = ("<root>/MSCOCO/{train2017,val2017}/ and <root>/DRCT-2M/<generator>/{train2017,val2017}/ "
                 "(or root = the DRCT-2M folder and real_root = the MSCOCO folder)")
DRCT_SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
DRCT_REAL_DIR = "MSCOCO"
DRCT_FAKE_DIR = "DRCT-2M"


def index_drct2m(root: str | Path, groups: Sequence[str] | None = None, splits: Sequence[str] | None = None,
                 limit_per_group: int | None = None, real_root: str | Path | None = None,
                 pair_reals: bool = False) -> LayoutIndex:
    """DRCT-2M: fakes in ``DRCT-2M/<generator>/{train2017,val2017}/<image>``, reals in
    ``MSCOCO/{train2017,val2017}/<image>``; group = generator folder name, or the real folder's name (``MSCOCO``).

    Labels: every image of a generator folder is fake (-> 1), every MSCOCO image real (-> 0) (DRCT's own code
    numbers the generators 1..16 with 0 = real; any non-zero is fake here). Split ``train`` = ``train2017``,
    ``val`` = ``val2017`` (DRCT scores ``val2017`` as its test set). ``root`` holds ``MSCOCO/`` and ``DRCT-2M/``,
    or is the generator folder itself with ``real_root`` naming the MSCOCO folder (its own root for containment).
    ``groups``: generator folder names (the inpainting ones included unless left out here).
    ``pair_reals``: give every generator group all reals of its split (keys ``<generator>:<path>``), so that each
    group can be scored alone as in per-generator tables; otherwise the reals are one group of their own.
    """
    _check_limit(limit_per_group)
    root = _root_dir(root, DRCT, DRCT_EXPECTED)
    fake_dir = root / DRCT_FAKE_DIR if (root / DRCT_FAKE_DIR).is_dir() else root
    if real_root is not None:
        real_dir = real_base = _root_dir(real_root, DRCT, DRCT_EXPECTED)
    elif (root / DRCT_REAL_DIR).is_dir():
        real_dir, real_base = root / DRCT_REAL_DIR, root
    else:
        raise LayoutError(f"{DRCT}: no real images: {root} has no {DRCT_REAL_DIR}/ folder and no real_root was "
                          f"given; expected {DRCT_EXPECTED}")
    split_names = _check_splits(splits, list(DRCT_SPLIT_DIRS), DRCT)
    found = [d.name for d in _subdirs(fake_dir) if d.resolve() != real_dir.resolve()]
    generators = _select(found, groups, "generator", fake_dir, DRCT, DRCT_EXPECTED)
    records: list[ImageRecord] = []
    skipped: list[str] = []
    for split in split_names:
        reals = _take_evenly([_drct_images(real_dir, real_base, split, skipped)], limit_per_group)
        for generator in generators:
            fakes = _drct_images(fake_dir / generator, root, split, skipped)
            records += [ImageRecord(path, LABEL_FAKE, generator, split, key)
                        for key, path in _take_evenly([fakes], limit_per_group)]
            if pair_reals:
                records += [ImageRecord(path, LABEL_REAL, generator, split, f"{generator}:{key}")
                            for key, path in reals]
        if not pair_reals:
            records += [ImageRecord(path, LABEL_REAL, real_dir.name, split, key) for key, path in reals]
    return _finish("drct2m", root, records, skipped)


def _drct_images(folder: Path, base: Path, split: str, skipped: list[str]) -> list[tuple[str, Path]]:
    """(key, image) pairs of ``folder/<train2017|val2017>``, inside ``base``; key = ``<folder name>/<split dir>/
    <file>``, the same whichever root the folder was reached from."""
    split_dir = folder / DRCT_SPLIT_DIRS[split]
    if not split_dir.is_dir():
        raise LayoutError(f"{DRCT}: {folder} has no {DRCT_SPLIT_DIRS[split]}/ folder; expected {DRCT_EXPECTED}")
    found = _folder_images(split_dir, base, DRCT, DRCT_EXPECTED, skipped)
    return [(f"{folder.name}/{f.listed.relative_to(folder).as_posix()}", f.path) for f in found]


# --------------------------------------------------------------------------------------------------
# DeepfakeBench face frames

DEEPFAKEBENCH = "DeepfakeBench"
DEEPFAKEBENCH_EXPECTED = ('a JSON object {dataset: {label name: {split: {video: {"label": name, "frames": '
                          '[path, ...]}}}}} (FaceForensics++-style datasets with a compression level such as '
                          '"c23" between split and video), frame paths relative to the frames root')
DEEPFAKEBENCH_SPLITS = ("train", "val", "test")
COMPRESSION_LEVELS = ("c23", "c40", "raw")
# DeepfakeBench's label names (its training configuration's label dictionary): 0 = real, 1 = fake.
DEEPFAKEBENCH_LABELS = {
    "FF-real": LABEL_REAL, "FF-DF": LABEL_FAKE, "FF-F2F": LABEL_FAKE, "FF-FS": LABEL_FAKE, "FF-NT": LABEL_FAKE,
    "FF-FH": LABEL_FAKE, "FF-SH": LABEL_FAKE, "DFD_real": LABEL_REAL, "DFD_fake": LABEL_FAKE,
    "CelebDFv1_real": LABEL_REAL, "CelebDFv1_fake": LABEL_FAKE, "CelebDFv2_real": LABEL_REAL,
    "CelebDFv2_fake": LABEL_FAKE, "DFDCP_Real": LABEL_REAL, "DFDCP_FakeA": LABEL_FAKE, "DFDCP_FakeB": LABEL_FAKE,
    "DFDC_Real": LABEL_REAL, "DFDC_Fake": LABEL_FAKE, "DF_real": LABEL_REAL, "DF_fake": LABEL_FAKE,
    "UADFV_Real": LABEL_REAL, "UADFV_Fake": LABEL_FAKE, "roop_Real": LABEL_REAL, "roop_Fake": LABEL_FAKE,
}
FRAMES_DIR = "frames"
LANDMARKS_DIR = "landmarks"


def deepfakebench_label(name: str, label_dict: Mapping[str, int] | None = None) -> int | None:
    """Internal label of a DeepfakeBench label name: from ``label_dict`` (0 real, 1 fake), else
    :data:`DEEPFAKEBENCH_LABELS`, else a name ending in ``real`` is real and one containing ``fake`` fake (any
    case); None when none applies."""
    for table in (label_dict or {}, DEEPFAKEBENCH_LABELS):
        if name in table:
            value = table[name]
            if value not in (LABEL_REAL, LABEL_FAKE) or isinstance(value, bool):
                raise ValueError(f"label_dict[{name!r}] must be 0 (real) or 1 (fake), got {value!r}")
            return value
    lowered = name.lower()
    if lowered.endswith("real"):
        return LABEL_REAL
    if "fake" in lowered:
        return LABEL_FAKE
    return None


def landmarks_name(frame: str) -> str | None:
    """DeepfakeBench's landmarks file of a frame path: the last ``frames`` folder replaced by ``landmarks`` and
    the extension by ``.npy`` (``.../frames/000/001.png`` -> ``.../landmarks/000/001.npy``); None without one."""
    parts = frame.split("/")
    folders = [i for i, part in enumerate(parts[:-1]) if part == FRAMES_DIR]
    if not folders:
        return None
    parts[folders[-1]] = LANDMARKS_DIR
    parts[-1] = os.path.splitext(parts[-1])[0] + ".npy"
    return "/".join(parts)


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LayoutError(f"{DEEPFAKEBENCH}: JSON file {path} does not exist; expected {DEEPFAKEBENCH_EXPECTED}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayoutError(f"{DEEPFAKEBENCH}: {path} is not valid UTF-8 JSON ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise LayoutError(f"{DEEPFAKEBENCH}: {path} is not a JSON object of datasets; "
                          f"expected {DEEPFAKEBENCH_EXPECTED}")
    return data


def _json_files(json_path: Path, groups: Sequence[str] | None) -> list[Path]:
    """``json_path`` itself, or the JSON files of a folder (only ``<group>.json`` when every selected group has
    one, as DeepfakeBench names them)."""
    if json_path.is_dir():
        if groups is not None and all((json_path / f"{g}.json").is_file() for g in groups):
            return [json_path / f"{g}.json" for g in sorted(set(groups))]
        files = sorted(p for p in json_path.glob("*.json") if _visible(p.name))
        if not files:
            raise LayoutError(f"{DEEPFAKEBENCH}: {json_path} has no .json file; expected {DEEPFAKEBENCH_EXPECTED}")
        return files
    return [json_path]


def _split_videos(block: Any, compression: str, where: str) -> dict[str, Any]:
    """The ``{video: entry}`` mapping of one split, going through the compression level when there is one."""
    if not isinstance(block, dict):
        raise LayoutError(f"{DEEPFAKEBENCH}: {where} is not an object; expected {DEEPFAKEBENCH_EXPECTED}")
    levels = [k for k in block if k in COMPRESSION_LEVELS and isinstance(block[k], dict)
              and "frames" not in block[k]]
    if not levels:
        return block
    if compression not in block:
        raise LayoutError(f"{DEEPFAKEBENCH}: {where} has no compression level {compression!r} (has {levels})")
    return block[compression]


@dataclass
class _FrameContext:
    root: Path
    allow_absolute: bool
    require_landmarks: bool
    skipped: list[str]


def index_deepfakebench(json_path: str | Path, root: str | Path, groups: Sequence[str] | None = None,
                        splits: Sequence[str] | None = None, limit_per_group: int | None = None,
                        categories: Sequence[str] | None = None, compression: str = "c23",
                        frames_per_video: int | None = None, label_dict: Mapping[str, int] | None = None,
                        require_landmarks: bool = False, allow_absolute_paths: bool = False) -> LayoutIndex:
    """DeepfakeBench face frames: a dataset JSON (or a folder of them) listing the frames of each video, frames
    under ``root`` (DeepfakeBench's ``datasets/rgb``); group = dataset (the JSON's top-level key, e.g.
    ``FaceForensics++``, ``FF-DF``, ``Celeb-DF-v2``), category = label name, video = video name.

    Labels: each video's ``label`` name (else the label-name key it is listed under) through ``label_dict``, then
    DeepfakeBench's own dictionary (:data:`DEEPFAKEBENCH_LABELS`, 0 = real, 1 = fake), then the name rule of
    :func:`deepfakebench_label`; an unknown name is an error. FaceForensics++-family entries have a compression
    level between split and video (``compression``, default ``c23``). Frame paths (``\\`` read as ``/``) are
    relative to ``root`` and must stay inside it; absolute ones are left out unless ``allow_absolute_paths``.
    A frame whose file is missing is left out (``skipped``). Landmarks: ``.../landmarks/<video>/<frame>.npy`` next
    to ``.../frames/`` (:func:`landmarks_name`), set when the file exists (``require_landmarks``: an error when
    not). ``frames_per_video``: that many frames spread evenly over each video's sorted frames.
    ``groups``: datasets; ``categories``: label names; ``splits``: train / val / test.
    """
    _check_limit(limit_per_group)
    if frames_per_video is not None:
        _check_limit(frames_per_video)
    root = _root_dir(root, DEEPFAKEBENCH, "the frames root (DeepfakeBench's datasets/rgb)")
    split_names = _check_splits(splits, DEEPFAKEBENCH_SPLITS, DEEPFAKEBENCH)
    datasets: dict[str, tuple[Path, dict[str, Any]]] = {}
    for file in _json_files(Path(json_path), groups):
        for name, labels in _read_json_object(file).items():
            if name in datasets:
                raise LayoutError(f"{DEEPFAKEBENCH}: dataset {name!r} is in both {datasets[name][0]} and {file}")
            datasets[name] = (file, labels)
    chosen = _select(list(datasets), groups, "dataset", Path(json_path), DEEPFAKEBENCH, DEEPFAKEBENCH_EXPECTED)
    label_names = sorted({c for name in chosen for c in datasets[name][1]})
    missing = [c for c in categories or () if c not in label_names]
    if missing:
        raise LayoutError(f"{DEEPFAKEBENCH}: {json_path}: no label name {missing} in datasets {chosen}; "
                          f"found {label_names}")
    ctx = _FrameContext(root, allow_absolute_paths, require_landmarks, [])
    records: list[ImageRecord] = []
    for name in chosen:
        file, labels = datasets[name]
        wanted = [c for c in sorted(labels) if categories is None or c in categories]
        for split in split_names:
            records += _deepfakebench_split(file, name, labels, wanted, split, compression, frames_per_video,
                                            label_dict, limit_per_group, ctx)
    if not records:
        raise LayoutError(f"{DEEPFAKEBENCH}: no usable frame in {json_path} for splits {split_names} under {root} "
                          f"({len(ctx.skipped)} left out{', e.g. ' + ctx.skipped[0] if ctx.skipped else ''}); "
                          f"expected {DEEPFAKEBENCH_EXPECTED}")
    return _finish("deepfakebench", root, records, ctx.skipped)


def _deepfakebench_split(file: Path, dataset: str, labels: dict[str, Any], categories: list[str], split: str,
                         compression: str, frames_per_video: int | None, label_dict: Mapping[str, int] | None,
                         limit: int | None, ctx: _FrameContext) -> list[ImageRecord]:
    """Records of one split of one dataset: per label, at most ``limit`` frames taken in turn from the videos."""
    per_label: dict[int, list[list[ImageRecord]]] = {LABEL_REAL: [], LABEL_FAKE: []}
    for category in categories:
        by_split = labels[category]
        if not isinstance(by_split, dict):
            raise LayoutError(f"{DEEPFAKEBENCH}: {file} [{dataset}][{category}] is not an object of splits; "
                              f"expected {DEEPFAKEBENCH_EXPECTED}")
        if split not in by_split:
            continue
        where = f"{file} [{dataset}][{category}][{split}]"
        videos = _split_videos(by_split[split], compression, where)
        for video in sorted(videos):
            frames = _video_frames(videos[video], f"{where}[{video}]", category, label_dict, ctx)
            if frames is None:
                continue
            label, names = frames
            found = [_frame_record(n, label, dataset, split, category, video, ctx)
                     for n in _spread(names, frames_per_video)]
            per_label[label].append([r for r in found if r is not None])
    return [r for videos in per_label.values() for r in _take_evenly(videos, limit)]


def _spread(items: list[T], count: int | None) -> list[T]:
    """``count`` items spread evenly over ``items`` (every ``len // count``-th from the first), or all."""
    if count is None or count >= len(items):
        return items
    return items[:: len(items) // count][:count]


def _video_frames(entry: Any, where: str, category: str, label_dict: Mapping[str, int] | None,
                  ctx: _FrameContext) -> tuple[int, list[str]] | None:
    """(internal label, sorted frame names) of a video entry; None (listed as skipped) when malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("frames"), list):
        ctx.skipped.append(f"malformed_entry: {where}: expected {{\"label\": name, \"frames\": [path, ...]}}")
        return None
    name = entry.get("label", category)
    label = deepfakebench_label(name, label_dict) if isinstance(name, str) else None
    if label is None:
        raise LayoutError(f"{DEEPFAKEBENCH}: {where}: unknown label name {name!r}; pass label_dict={{name: 0 or 1}} "
                          f"(known: {sorted(DEEPFAKEBENCH_LABELS)})")
    frames = []
    for frame in entry["frames"]:
        if not isinstance(frame, str):
            ctx.skipped.append(f"malformed_entry: {where}: frame {frame!r} is not a path")
            continue
        frame = frame.replace("\\", "/")
        frames.append(frame[2:] if frame.startswith("./") else frame)
    return label, sorted(set(frames))


def _frame_record(frame: str, label: int, dataset: str, split: str, category: str, video: str,
                  ctx: _FrameContext) -> ImageRecord | None:
    """The record of one frame, or None (listed as skipped) when it is not a usable image inside the root."""
    where = f"{DEEPFAKEBENCH} {dataset}/{category}/{split}/{video}"
    try:
        path = resolve_image_path(ctx.root, frame, where, ctx.allow_absolute)
    except BadSample as bad:
        ctx.skipped.append(str(bad))
        return None
    if not _is_image_name(path.name):
        ctx.skipped.append(f"malformed_entry: {where}: {frame!r} is not an image file name")
        return None
    if not path.is_file():
        ctx.skipped.append(f"missing_file: {where}: {path} does not exist")
        return None
    landmarks = _landmarks(frame, where, ctx)
    rel = path.relative_to(ctx.root).as_posix() if path.is_relative_to(ctx.root) else path.as_posix()
    return ImageRecord(path, label, dataset, split, f"{dataset}:{split}:{rel}", category=category, video=video,
                       landmarks=landmarks)


def _landmarks(frame: str, where: str, ctx: _FrameContext) -> Path | None:
    name = landmarks_name(frame)
    path = None
    if name is not None:
        try:
            path = resolve_image_path(ctx.root, name, where, ctx.allow_absolute)
        except BadSample as bad:
            ctx.skipped.append(f"landmarks of {frame!r} not used: {bad}")
    if path is not None and path.is_file():
        return path
    if ctx.require_landmarks:
        raise LayoutError(f"{DEEPFAKEBENCH}: {where}: no landmarks file for frame {frame!r} "
                          f"(expected {name or 'a frame path with a frames/ folder'} under {ctx.root})")
    return None


# --------------------------------------------------------------------------------------------------
# DiffusionForensics (the benchmark released with DIRE)

DIFFUSIONFORENSICS = "DiffusionForensics"
DIFFUSIONFORENSICS_EXPECTED = ("<root>/{train,val,test}/<domain>/<generator>/[<sub-folders>/]<image>, root = the "
                               "dataset's images/ folder (or its parent); <generator> 'real' holds the real images")
DIFFUSIONFORENSICS_SPLITS = ("train", "val", "test")
DIFFUSIONFORENSICS_REAL_DIR = "real"


def _tree_images(folder: Path, root: Path, layout: str, expected: str, skipped: list[str]) -> list[_Found]:
    """Image files anywhere under ``folder`` (sub-folders such as ImageNet class folders included), sorted by path;
    LayoutError when there is none."""
    found: list[_Found] = []
    for current, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        if any(_is_image_name(name) for name in files):
            found += _folder_images(Path(current), root, layout, expected, skipped)
    if not found:
        raise LayoutError(f"{layout}: {folder} has no image files; expected {expected}")
    return sorted(found, key=lambda f: f.listed.as_posix())


def index_diffusionforensics(root: str | Path, groups: Sequence[str] | None = None,
                             splits: Sequence[str] | None = None, limit_per_group: int | None = None,
                             domains: Sequence[str] | None = None, pair_reals: bool = False) -> LayoutIndex:
    """DiffusionForensics: ``<root>/<split>/<domain>/<generator>/[<sub-folders>/]<image>``, as released with DIRE
    (``images/{train,val,test}/{imagenet,celebahq,lsun_bedroom}/{real,adm,sdv1,...}``; ImageNet images sit in
    class or numbered sub-folders, searched to any depth). ``root`` is the ``images/`` folder or the folder
    holding it (the release's ``recons/`` and ``dire/`` trees are not read).

    Labels: the generator folder ``real`` = real (-> 0); every other generator folder = fake (-> 1). Group =
    ``<domain>/<generator>`` (``imagenet/adm``); the reals of a domain are the group ``<domain>/real``, or, with
    ``pair_reals``, are given to every generator group of their domain and split (keys ``<group>:<path>``) so that
    each generator can be scored alone against its domain's reals, as per-generator tables do. ``domains`` and
    ``groups`` (generator folder names, e.g. ``adm``; ``real`` is always read) select; every selected domain of a
    split needs a ``real/`` folder.
    """
    _check_limit(limit_per_group)
    root = _root_dir(root, DIFFUSIONFORENSICS, DIFFUSIONFORENSICS_EXPECTED)
    if not _has_split_dir(root, DIFFUSIONFORENSICS_SPLITS) and (root / "images").is_dir():
        root = root / "images"
    present = [s for s in DIFFUSIONFORENSICS_SPLITS if (root / s).is_dir()]
    if not present:
        raise LayoutError(f"{DIFFUSIONFORENSICS}: {root} has no train/, val/ or test/ folder; expected "
                          f"{DIFFUSIONFORENSICS_EXPECTED}")
    records: list[ImageRecord] = []
    skipped: list[str] = []
    for split in _check_splits(splits, present, DIFFUSIONFORENSICS, root):
        split_dir = root / split
        found_domains = [d.name for d in _subdirs(split_dir)]
        for domain in _select(found_domains, domains, "domain", split_dir, DIFFUSIONFORENSICS,
                              DIFFUSIONFORENSICS_EXPECTED):
            records += _diffusionforensics_domain(root, split, split_dir / domain, groups, limit_per_group,
                                                  pair_reals, skipped)
    return _finish("diffusionforensics", root, records, skipped)


def _diffusionforensics_domain(root: Path, split: str, domain_dir: Path, groups: Sequence[str] | None,
                               limit: int | None, pair_reals: bool, skipped: list[str]) -> list[ImageRecord]:
    domain = domain_dir.name
    if not (domain_dir / DIFFUSIONFORENSICS_REAL_DIR).is_dir():
        raise LayoutError(f"{DIFFUSIONFORENSICS}: {domain_dir} has no '{DIFFUSIONFORENSICS_REAL_DIR}' folder; "
                          f"expected {DIFFUSIONFORENSICS_EXPECTED}")
    generators = [d.name for d in _subdirs(domain_dir) if d.name != DIFFUSIONFORENSICS_REAL_DIR]
    chosen = _select(generators, groups, "generator", domain_dir, DIFFUSIONFORENSICS, DIFFUSIONFORENSICS_EXPECTED) \
        if groups is not None or generators else []
    reals = _take_evenly([_tree_images(domain_dir / DIFFUSIONFORENSICS_REAL_DIR, root, DIFFUSIONFORENSICS,
                                       DIFFUSIONFORENSICS_EXPECTED, skipped)], limit)
    records = []
    for generator in chosen:
        group = f"{domain}/{generator}"
        fakes = _tree_images(domain_dir / generator, root, DIFFUSIONFORENSICS, DIFFUSIONFORENSICS_EXPECTED, skipped)
        records += [ImageRecord(f.path, LABEL_FAKE, group, split, f.listed.relative_to(root).as_posix())
                    for f in _take_evenly([fakes], limit)]
        if pair_reals:
            records += [ImageRecord(f.path, LABEL_REAL, group, split,
                                    f"{group}:{f.listed.relative_to(root).as_posix()}") for f in reals]
    if not pair_reals or not chosen:
        records += [ImageRecord(f.path, LABEL_REAL, f"{domain}/{DIFFUSIONFORENSICS_REAL_DIR}", split,
                                f.listed.relative_to(root).as_posix()) for f in reals]
    return records


# --------------------------------------------------------------------------------------------------
# By name

LAYOUTS: dict[str, Callable[..., LayoutIndex]] = {
    "genimage": index_genimage,
    "ufd": index_ufd,
    "drct2m": index_drct2m,
    "deepfakebench": index_deepfakebench,
    "diffusionforensics": index_diffusionforensics,
}


def index_layout(layout: str, *args: Any, **options: Any) -> LayoutIndex:
    """``LAYOUTS[layout](*args, **options)``; ValueError naming the known layouts for an unknown one."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout](*args, **options)
