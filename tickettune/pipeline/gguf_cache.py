"""The bundled GGUF, dequantized once: a float safetensors folder in the cache, loaded in about a second.

transformers reads the bundled `SmolLM2-135M-Instruct.Q4_1.gguf` by dequantizing every tensor into a Llama
model (15–18 s on 2 cores). The result never changes for one file, so the first load saves it with
`save_pretrained` into `$TICKETTUNE_CACHE/smollm2-135m-<package version>-<sha256[:16]>/` (the cache root is
mpnet's: outside the repository, never packaged), and every later load reads that folder. The key is the
package's version *and* the file's hash: another GGUF never meets a stale conversion. The folder is written
beside its final name and renamed into place, with a marker naming the hash, so a crash or a second process
never leaves a half folder that looks complete. Where the cache cannot be written, the GGUF is converted in
memory as before (a warning says why). The tensors are the conversion's own, saved and read back bit for bit:
predictions are byte-identical either way (tests/test_gguf_cache.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from tickettune.pipeline.plan import BUNDLED_GGUF, BUNDLED_PACKAGE, bundled_model_dir

log = logging.getLogger(__name__)
MARKER = ".tickettune-converted"
DISTRIBUTION = BUNDLED_PACKAGE.replace("_", "-")


@functools.lru_cache(maxsize=4)
def file_sha256(path: Path, size: int, mtime_ns: int) -> str:  # (size, mtime): a changed file is hashed again
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_folder(root: Path | None = None) -> tuple[Path, str]:
    """(where the conversion of the installed GGUF lives, whether or not it exists yet; its sha256)."""
    from tickettune.pipeline.mpnet import cache_root

    gguf = bundled_model_dir() / BUNDLED_GGUF
    stat = gguf.stat()
    sha = file_sha256(gguf, stat.st_size, stat.st_mtime_ns)
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "unknown"
    return (root or cache_root()) / f"smollm2-135m-{version}-{sha[:16]}", sha


def is_complete(folder: Path, sha: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("gguf_sha256") == sha
    except (OSError, ValueError, AttributeError):
        return False


def convert(dtype_kwargs: dict) -> tuple:
    """(model, tokenizer) straight from the GGUF (the slow path; what the cache stores). `dtype_kwargs`:
    `from_pretrained`'s dtype argument (`modeling.dtype_kwarg`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUNDLED_GGUF, **dtype_kwargs)
    return model, tokenizer


def converted(dtype_kwargs: dict, root: Path | None = None) -> Path | None:
    """The cached conversion's folder (made now if missing), or None where the cache cannot be written."""
    target, sha = cache_folder(root)
    if is_complete(target, sha):
        return target
    log.info("converting the bundled GGUF once into %s (later loads read it)", target)
    model, tokenizer = convert(dtype_kwargs)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        saved_quantizer = getattr(model, "hf_quantizer", None)
        model.hf_quantizer = None  # it is there only to say "came from a GGUF"; every tensor is float now
        try:
            model.save_pretrained(staging, safe_serialization=True)
        finally:
            model.hf_quantizer = saved_quantizer
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps({"gguf": BUNDLED_GGUF, "gguf_sha256": sha}), encoding="utf-8")
        if target.exists() and not is_complete(target, sha):  # a stale or half folder from elsewhere
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process renamed its copy first: same bytes, keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        log.warning("cannot cache the converted GGUF in %s (%s): converting on every load", target.parent, exc)
        return None
    return target if is_complete(target, sha) else None
