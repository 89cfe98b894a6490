"""`--data` as an archive on shared storage (`.tar`, `.tar.gz`, `.tgz`): each node extracts it once into a local
cache (`$MASKEDKD_DATA_CACHE`, default `~/.cache/maskedkd/data`) and trains from there, instead of every node needing
the image tree. The cache entry is keyed by the archive's path, size and mtime, so a changed archive is extracted
again; workers sharing a node take a file lock, one extracts and the others reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_ENV = "MASKEDKD_DATA_CACHE"
_DONE = ".extracted"


def is_archive(data: str) -> bool:
    return data.endswith(ARCHIVE_SUFFIXES)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "maskedkd" / "data")


def local_data_root(data: str) -> str:
    """The ImageFolder root to read: `data` itself, or for an archive its extracted copy on this node.

    A missing archive is returned as is (the caller reports it); a corrupt one raises tarfile.TarError.
    """
    archive = Path(data)
    if not is_archive(data) or not archive.is_file():
        return data
    st = archive.stat()
    key = hashlib.blake2b(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=8).hexdigest()
    cache = cache_dir()
    dest = cache / f"{archive.name.split('.')[0]}-{key}"
    if not (dest / _DONE).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with (cache / f".{dest.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (dest / _DONE).is_file():
                tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
                try:
                    with tarfile.open(archive) as tar:
                        tar.extractall(tmp, filter="data")  # no absolute paths, links out or devices
                    (tmp / _DONE).write_text(str(archive) + "\n")
                    shutil.rmtree(dest, ignore_errors=True)
                    tmp.replace(dest)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return str(_image_root(dest))


def _image_root(dest: Path) -> Path:
    """The extracted tree's ImageFolder root: `dest`, or its only top-level folder (`tar czf x.tgz cifar10-subset`)."""
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "train").is_dir():
        return entries[0]
    return dest
