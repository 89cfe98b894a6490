"""Build `data/cifar10-demo.tar.gz`, the demo's images: the first N training images of each class and every test
image, in file-name order, from the CIFAR-10 JPEG tarball (`../shared/data/cifar10-jpg.tar.gz`), read in place.

The archive is deterministic (sorted members, zeroed times and owners), so rebuilding it gives the same bytes and
the same sha256 as the committed one:

    python scripts/make_demo_data.py [--tarball PATH] [--train-per-class 2000] [--out data/cifar10-demo.tar.gz]

Gzip compresses the shared JPEG headers across files: 30,000 JPEGs of about 900 bytes make about 10 MB.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
SHARED_TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
ROOT = "cifar10-demo"  # the archive's top folder; `--data` finds train/ and test/ below it


def selected_members(
    tar: tarfile.TarFile, train_per_class: int | None, test_per_class: int | None
) -> list[tarfile.TarInfo]:
    """The image files kept: per split and class, the first `per_class` in name order (None: all)."""
    limits = {"train": train_per_class, "test": test_per_class}
    by_class: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if member.isfile() and len(parts) == 3 and parts[0] in limits:
            by_class.setdefault((parts[0], parts[1]), []).append(member)
    chosen = []
    for (split, _), members in sorted(by_class.items()):
        members.sort(key=lambda m: m.name)
        limit = limits[split]
        if limit is not None and len(members) < limit:
            raise SystemExit(
                f"make_demo_data: {members[0].name.rsplit('/', 1)[0]} has {len(members)} images, fewer than {limit}"
            )
        chosen += members if limit is None else members[:limit]
    return chosen


def _normalized(info: tarfile.TarInfo, name: str) -> tarfile.TarInfo:
    out = tarfile.TarInfo(name)
    out.size, out.mtime, out.uid, out.gid, out.uname, out.gname = info.size, 0, 0, 0, "", ""
    out.mode = 0o644 if info.isfile() else 0o755
    out.type = info.type
    return out


def build(tarball: Path, out: Path, train_per_class: int | None, test_per_class: int | None) -> tuple[int, str]:
    """Write the archive; returns (images, sha256)."""
    with tarfile.open(tarball, "r:gz") as source:
        members = selected_members(source, train_per_class, test_per_class)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            folders = sorted(
                {str(PurePosixPath(m.name).parent) for m in members}
                | {str(PurePosixPath(m.name).parts[0]) for m in members}
            )
            for folder in ["", *folders]:
                info = tarfile.TarInfo(f"{ROOT}/{folder}".rstrip("/"))
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(info)
            for member in members:
                data = source.extractfile(member)
                assert data is not None
                tar.addfile(_normalized(member, f"{ROOT}/{member.name}"), data)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return len(members), hashlib.sha256(out.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_demo_data", description=__doc__.splitlines()[0])
    p.add_argument("--tarball", type=Path, default=SHARED_TARBALL)
    p.add_argument("--train-per-class", type=int, default=2000)
    p.add_argument("--test-per-class", type=int, default=None, help="default: every test image")
    p.add_argument("--out", type=Path, default=REPO / "data" / "cifar10-demo.tar.gz")
    args = p.parse_args(argv)
    if not args.tarball.is_file():
        print(f"make_demo_data: error: {args.tarball} not found (pass --tarball PATH)", file=sys.stderr)
        return 2
    images, digest = build(args.tarball, args.out, args.train_per_class, args.test_per_class)
    print(f"{args.out}: {images} images, {args.out.stat().st_size / 1e6:.1f} MB, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
