"""Detection benchmarks on disk (FakeClue, DMimage, ARForensics, and the image-folder layouts of
:mod:`unigendet.data.layouts`: GenImage, UniversalFakeDetect, DRCT-2M, DeepfakeBench) -> :class:`EvalRecord`
lists, with labels in the internal convention (``0 = real, 1 = fake``).

A dataset that cannot be used as a whole raises :class:`BenchmarkError` naming the path and the expected layout;
a malformed single entry is listed in ``Benchmark.invalid``. Images are not opened here: unreadable files are
counted when the harness loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unigendet.config.loader import ConfigError
from unigendet.data.fakeclue import parse_fakeclue_entry, read_json_list
from unigendet.data.layouts import (
    LayoutError,
    LayoutIndex,
    index_deepfakebench,
    index_diffusionforensics,
    index_drct2m,
    index_genimage,
    index_ufd,
)
from unigendet.data.paths import resolve_image_path
from unigendet.data.quality import BadSample
from unigendet.labels import LABEL_FAKE, LABEL_REAL

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# Paper column order (D3QE test set after the MAR -> Switti correction).
ARFORENSICS_GENERATORS = ("LlamaGen", "VAR", "Infinity", "Janus_Pro", "RAR", "Switti", "Open_MAGVIT2")
ARFORENSICS_CLASS_DIRS = {"0_real": LABEL_REAL, "1_fake": LABEL_FAKE}
DMIMAGE_REAL_MARKER = "real"


class BenchmarkError(ConfigError):
    """A benchmark directory or file cannot be used as given (missing, empty, or another layout): an input error,
    reported by the command line as one line (exit status 2)."""


@dataclass(frozen=True)
class EvalRecord:
    """One image to score. ``key`` is unique and stable within a benchmark (a path relative to the
    benchmark root, or ``<index>:<image>`` for FakeClue); perturbation seeds and resume use it."""

    key: str
    path: str
    label: int
    group: str
    question: str | None = None
    reference: str | None = None


@dataclass
class Benchmark:
    name: str
    root: str
    records: list[EvalRecord]
    invalid: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        counts: dict[str, dict[str, int]] = {}
        for rec in self.records:
            per = counts.setdefault(rec.group, {"real": 0, "fake": 0})
            per["real" if rec.label == LABEL_REAL else "fake"] += 1
        return {"benchmark": self.name, "root": self.root, "n_records": len(self.records),
                "n_invalid": len(self.invalid), "per_group": counts}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _existing_dir(root: str | Path, what: str, expected: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise BenchmarkError(f"{what} root {path} does not exist (expected {expected})")
    if not path.is_dir():
        raise BenchmarkError(f"{what} root {path} is not a directory (expected {expected})")
    return path


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir())


def _has_class_dirs(path: Path) -> bool:
    """True if ``path`` holds ARForensics' ``0_real/`` and ``1_fake/`` folders."""
    return set(ARFORENSICS_CLASS_DIRS) <= {d.name for d in _subdirs(path)}


def _limited(files: list[Path], limit: int | None) -> list[Path]:
    return files if limit is None else files[:limit]


# --------------------------------------------------------------------------------------------------
# DMimage

_DMIMAGE_EXPECTED = "one folder per source, e.g. real_coco_valid/, biggan_256/, a folder named *real* is real"


def dmimage_is_real(folder_name: str) -> bool:
    return DMIMAGE_REAL_MARKER in folder_name.lower()


def load_dmimage(root: str | Path, limit_per_group: int | None = None) -> Benchmark:
    """DMimage test directory -> records; group = source folder name.

    One folder per source; a folder whose name contains ``real`` (any case) holds real images, every other
    folder is one generator. Images are found recursively inside each source folder.
    """
    root = _existing_dir(root, "DMimage", _DMIMAGE_EXPECTED)
    folders = _subdirs(root)
    if not folders:
        raise BenchmarkError(f"DMimage root {root} has no sub-folders (expected {_DMIMAGE_EXPECTED})")
    if _has_class_dirs(root) or any(_has_class_dirs(f) for f in folders):
        raise BenchmarkError(f"{root} has 0_real/1_fake folders: that is the ARForensics layout, not DMimage "
                             f"(expected {_DMIMAGE_EXPECTED}); use the arforensics benchmark")
    records, groups = [], []
    for folder in folders:
        files = _limited(_image_files(folder), limit_per_group)
        if not files:
            logger.warning("DMimage: no images in %s, skipped", folder)
            continue
        label = LABEL_REAL if dmimage_is_real(folder.name) else LABEL_FAKE
        groups.append(folder.name)
        records += [EvalRecord(p.relative_to(root).as_posix(), str(p), label, folder.name) for p in files]
    if not records:
        raise BenchmarkError(f"no images found under {root} (suffixes {sorted(IMAGE_SUFFIXES)}; "
                             f"expected {_DMIMAGE_EXPECTED})")
    labels = {r.label for r in records}
    if LABEL_REAL not in labels:
        logger.warning("DMimage %s: no folder with 'real' in its name: Real Acc/F1 will be undefined", root)
    if LABEL_FAKE not in labels:
        logger.warning("DMimage %s: only real folders: Fake Acc/F1 will be undefined", root)
    return Benchmark("dmimage", str(root), records, groups=groups)


# --------------------------------------------------------------------------------------------------
# ARForensics

_ARF_EXPECTED = "<root>/test/<Gen>/{0_real,1_fake}/ or <root>/<Gen>/{0_real,1_fake}/"


def _arforensics_test_dir(root: Path) -> Path:
    """The directory holding the generator folders: ``root/test`` if present, else ``root`` itself."""
    names = {d.name for d in _subdirs(root)}
    if _has_class_dirs(root):
        raise BenchmarkError(f"{root} holds 0_real/1_fake directly: that is a train/val split, not the test set "
                             f"(expected {_ARF_EXPECTED})")
    if "test" in names:
        return root / "test"
    if any(set(ARFORENSICS_CLASS_DIRS) & {d.name for d in _subdirs(root / n)} for n in names):
        return root
    raise BenchmarkError(f"{root}: no test/ directory and no generator folder with 0_real/ or 1_fake/ "
                         f"(expected {_ARF_EXPECTED})")


def load_arforensics(root: str | Path, generators: list[str] | None = None,
                     limit_per_class: int | None = None) -> Benchmark:
    """ARForensics test set (``<root>/test/<Gen>/{0_real,1_fake}/``, or ``root`` = the ``test`` directory) ->
    records; group = generator folder name. ``generators`` restricts (and requires) the named folders; by default
    every generator folder found is used."""
    root = _existing_dir(root, "ARForensics", _ARF_EXPECTED)
    test_dir = _arforensics_test_dir(root)
    found = {d.name: d for d in _subdirs(test_dir)}
    if generators is not None:
        missing = [g for g in generators if g not in found]
        if missing:
            raise BenchmarkError(f"ARForensics {test_dir}: no folder for generator(s) {missing}; "
                                 f"found {sorted(found)}")
        names = list(generators)
    else:
        names = sorted(found, key=_arforensics_order)
        absent = [g for g in ARFORENSICS_GENERATORS if g not in found]
        if absent:
            logger.warning("ARForensics %s: test generator(s) %s not found; the mean covers the others",
                           test_dir, absent)
    records, groups = [], []
    for name in names:
        classes = {d.name: d for d in _subdirs(found[name]) if d.name in ARFORENSICS_CLASS_DIRS}
        if not classes:
            raise BenchmarkError(f"ARForensics generator folder {found[name]} has neither 0_real/ nor 1_fake/ "
                                 f"(expected {_ARF_EXPECTED})")
        for cls in sorted(set(ARFORENSICS_CLASS_DIRS) - set(classes)):
            logger.warning("ARForensics %s: %s/ missing; its accuracy covers one class only", found[name], cls)
        before = len(records)
        for cls, folder in sorted(classes.items()):
            files = _limited(_image_files(folder), limit_per_class)
            records += [EvalRecord(p.relative_to(test_dir).as_posix(), str(p), ARFORENSICS_CLASS_DIRS[cls], name)
                        for p in files]
        if len(records) == before:
            logger.warning("ARForensics: no images under %s, skipped", found[name])
        else:
            groups.append(name)
    if not records:
        raise BenchmarkError(f"no images found under {test_dir} (suffixes {sorted(IMAGE_SUFFIXES)}; "
                             f"expected {_ARF_EXPECTED})")
    return Benchmark("arforensics", str(test_dir), records, groups=groups)


def _arforensics_order(name: str) -> tuple[int, str]:
    """Paper column order first, then any other generator folder alphabetically."""
    return (ARFORENSICS_GENERATORS.index(name) if name in ARFORENSICS_GENERATORS else len(ARFORENSICS_GENERATORS),
            name)


# --------------------------------------------------------------------------------------------------
# FakeClue


def load_fakeclue(json_path: str | Path, image_root: str | Path, label_convention: str = "fakeclue",
                  limit: int | None = None) -> Benchmark:
    """FakeClue-format JSON (a list of ``{image, label, cate, conversations}``, read with the training parser's
    rules) -> records with question and reference answer; group = ``cate`` (or ``all``).
    Malformed entries are listed in ``invalid`` (the official script counts them as crashed)."""
    json_path = Path(json_path)
    entries = read_json_list(json_path)
    if limit is not None:
        entries = entries[:limit]
    records, invalid = [], []
    root = Path(image_root).resolve()
    for i, entry in enumerate(entries):
        where = f"{json_path}[{i}]"
        try:
            rec = parse_fakeclue_entry(entry, label_convention, where)
            path = resolve_image_path(root, rec.image, where)  # inside image_root, symlinks included
        except BadSample as bad:
            invalid.append(str(bad))
            continue
        group = entry.get("cate") if isinstance(entry.get("cate"), str) and entry.get("cate") else "all"
        records.append(EvalRecord(f"{i}:{rec.image}", str(path), rec.label, group,
                                  question=rec.question, reference=rec.answer))
    if not records and not invalid:
        raise BenchmarkError(f"{json_path} has no entries")
    groups = list(dict.fromkeys(r.group for r in records))
    return Benchmark("fakeclue", str(json_path), records, invalid=invalid, groups=groups)


# --------------------------------------------------------------------------------------------------
# Image-folder layouts (GenImage, UniversalFakeDetect, DRCT-2M, DeepfakeBench)


def _layout_benchmark(name: str, read: Callable[[], LayoutIndex]) -> Benchmark:
    """One split of a layout as a benchmark: group as the layout's, ``invalid`` = the images it left out."""
    try:
        index = read()
    except LayoutError as err:
        raise BenchmarkError(str(err)) from err
    records = [EvalRecord(r.key, str(r.path), r.label, r.group) for r in index.records]
    return Benchmark(name, str(index.root), records, invalid=list(index.skipped), groups=index.groups)


def load_genimage(root: str | Path, generators: list[str] | None = None, split: str = "val",
                  limit_per_group: int | None = None) -> Benchmark:
    """GenImage (``<generator>/{train,val}/{ai,nature}/``; ``ai`` = fake, ``nature`` = real) -> one split's
    records, group = generator (:func:`unigendet.data.layouts.index_genimage`)."""
    return _layout_benchmark("genimage", lambda: index_genimage(root, generators, [split], limit_per_group))


def load_ufd(root: str | Path, subsets: list[str] | None = None, split: str = "test",
             limit_per_group: int | None = None) -> Benchmark:
    """UniversalFakeDetect / ForenSynths (``<subset>/[<class>/]{0_real,1_fake}/``, diffusion subsets paired with
    their LAION / ImageNet reals) -> one split's records, group = subset. ``root`` holds ``test/`` (and
    ``train/``, ``val/``) or is the test folder itself (:func:`unigendet.data.layouts.index_ufd`)."""
    return _layout_benchmark("ufd", lambda: index_ufd(root, subsets, [split], limit_per_group, root_split=split))


def load_drct2m(root: str | Path, generators: list[str] | None = None, split: str = "val",
                limit_per_group: int | None = None, real_root: str | Path | None = None,
                pair_reals: bool = True) -> Benchmark:
    """DRCT-2M (``DRCT-2M/<generator>/{train2017,val2017}/`` fake, ``MSCOCO/{train2017,val2017}/`` real) -> one
    split's records (``val`` = val2017, DRCT's test set), group = generator. ``pair_reals`` (default): every
    generator group holds all reals of the split, so that each has real and fake accuracy of its own; off: the
    reals are scored once, as their own group (:func:`unigendet.data.layouts.index_drct2m`)."""
    return _layout_benchmark("drct2m", lambda: index_drct2m(root, generators, [split], limit_per_group,
                                                            real_root=real_root, pair_reals=pair_reals))


def load_deepfakebench(json_path: str | Path, root: str | Path, datasets: list[str] | None = None,
                       split: str = "test", limit_per_group: int | None = None, compression: str = "c23",
                       frames_per_video: int | None = None) -> Benchmark:
    """DeepfakeBench face frames (a dataset JSON, frames under ``root``; label names mapped to real / fake) -> one
    split's frame records, group = dataset. The key holds the frame path, whose parent folder is the video
    (for video-level scores); landmarks lie at :func:`unigendet.data.layouts.landmarks_name` of the frame
    (:func:`unigendet.data.layouts.index_deepfakebench`)."""
    return _layout_benchmark("deepfakebench", lambda: index_deepfakebench(
        json_path, root, datasets, [split], limit_per_group, compression=compression,
        frames_per_video=frames_per_video))


def load_diffusionforensics(root: str | Path, generators: list[str] | None = None, split: str = "test",
                            limit_per_group: int | None = None, pair_reals: bool = False) -> Benchmark:
    """DiffusionForensics (``images/<split>/<domain>/<generator>/...``; the generator folder ``real`` = real, every
    other = fake) -> one split's records, group = ``<domain>/<generator>``; ``pair_reals``: each generator group
    also holds its domain's reals, for a real and a fake accuracy per generator
    (:func:`unigendet.data.layouts.index_diffusionforensics`)."""
    return _layout_benchmark("diffusionforensics", lambda: index_diffusionforensics(
        root, generators, [split], limit_per_group, pair_reals=pair_reals))


LAYOUT_BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "genimage": load_genimage,
    "ufd": load_ufd,
    "drct2m": load_drct2m,
    "deepfakebench": load_deepfakebench,
    "diffusionforensics": load_diffusionforensics,
}
