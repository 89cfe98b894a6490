"""The shared datasets (CIFAR-10, MNIST) from their tarballs: extracted once into a cache outside the repo, then
class-balanced subsets made of symlinks (the first N files of each class, in file-name order, so every run sees the
same images)."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE_ROOT = Path("~/.cache/maskedkd").expanduser()
# dataset name -> its tarball in ../shared/data (ImageFolder layout: train/<class>/..., test/<class>/...)
TARBALLS = {"cifar10": "cifar10-jpg.tar.gz", "mnist": "mnist-png.tar.gz"}
# datasets a script in this repository builds from another's tarball -> that dataset (experiments/cluttered_mnist.py)
BUILT_FROM = {"cluttered-mnist": "mnist"}


def default_tarball(dataset: str) -> Path:
    return SHARED_DATA / TARBALLS[BUILT_FROM.get(dataset, dataset)]


def default_cache(dataset: str) -> Path:
    return CACHE_ROOT / dataset


SPLITS = ("train", "test")


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """Indices of `limit` items spread evenly over `count` (every k-th; over a class-sorted folder a class-balanced
    pick), or all of them when `limit` is None or not smaller."""
    if limit is None or limit >= count:
        return list(range(count))
    step = count / limit
    return [int(i * step) for i in range(limit)]


_COMPLETE = ".complete"


class DataError(RuntimeError):
    """The dataset cannot be found or prepared (message says what to do)."""


def extract_tarball(tarball: Path, cache: Path) -> Path:
    """`cache` holding train/<class>/* and test/<class>/*; extracted from `tarball` unless already there."""
    if (cache / _COMPLETE).exists():
        return cache
    if not tarball.is_file():
        raise DataError(f"dataset tarball not found at {tarball}; pass --tarball PATH or --data DIR")
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        tar.extractall(tmp, filter="data")  # "data": no absolute paths, no links out of tmp
    for split in SPLITS:
        if not (tmp / split).is_dir():
            raise DataError(f"{tarball} has no {split}/ folder (expected ImageFolder layout train/ and test/)")
    (tmp / _COMPLETE).write_text(str(tarball))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache


def _link_split(source: Path, dest: Path, per_class: int | None) -> int:
    count = 0
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.is_file())
        chosen = files if per_class is None else files[:per_class]
        if per_class is not None and len(chosen) < per_class:
            raise DataError(f"{class_dir} has {len(files)} images, fewer than the {per_class} asked for")
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for f in chosen:
            (dest / class_dir.name / f.name).symlink_to(f.resolve())
        count += len(chosen)
    return count


def make_subset(source: Path, dest: Path, *, train_per_class: int | None, test_per_class: int | None) -> Path:
    """An ImageFolder root at `dest` with train/ and test/ as symlinks to the first N images per class of `source`."""
    marker = dest / _COMPLETE
    if marker.exists() and marker.read_text().splitlines()[0] == str(source):
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        if not (source / split).is_dir():
            raise DataError(f"{source} has no {split}/ folder")
        counts[split] = _link_split(source / split, tmp / split, per_class)
    (tmp / _COMPLETE).write_text(f"{source}\n{counts}\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def prepare_data(
    *, data: Path | None, tarball: Path, cache: Path, train_per_class: int | None, test_per_class: int | None
) -> Path:
    """The ImageFolder root a run trains on: `data` (or the extracted tarball), cut to the configured subset."""
    source = data if data is not None else extract_tarball(tarball, cache)
    if not source.is_dir():
        raise DataError(f"data directory not found: {source}")
    if train_per_class is None and test_per_class is None:
        return source
    name = f"{source.name}-train{train_per_class or 'all'}-test{test_per_class or 'all'}"
    base = cache.parent if data is None else cache.parent / "subsets"
    return make_subset(source, base / name, train_per_class=train_per_class, test_per_class=test_per_class)
