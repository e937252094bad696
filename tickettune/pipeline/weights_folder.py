"""The weights folder's format: what `TicketModel.save` writes and `TicketModel.load` reads back,
checked before any model loads (every missing or incompatible piece is a `WeightsError` naming it).

    tickettune.json          format, plan, config, taxonomy, ensemble weights, reply policy, embedder, training
    adapter_config.json, adapter_model.safetensors      the intent adapter (a plain PEFT folder)
    reply/                   the reply adapter (when trained)
    encoder/                 the fine-tuned intent encoder: its LoRA weights and head
    examples.jsonl           the train rows: the retrieval index and the taxonomy
    embeddings.safetensors   their ticket, reply (and intent-name) embeddings, as trained
    tokenizer files, loss_history.json, diagnostics.jsonl (written by run.py)

Knows the files and their checks; does not load models or predict (that is `ticket_model`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from tickettune import __version__
from tickettune.pipeline import modeling
from tickettune.pipeline.config import ConfigError, RunConfig
from tickettune.pipeline.data import DataError, read_jsonl
from tickettune.pipeline.encoder import ENCODER_DIR, HEAD_FILE
from tickettune.pipeline.plan import Plan, detect_hardware
from tickettune.pipeline.replies import ReplyPolicy
from tickettune.pipeline.results import TrainingStats, finite, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = 3                  # the folder layout below; a folder of another format is refused on load
META_FILE = "tickettune.json"
EXAMPLES_FILE = "examples.jsonl"        # the train rows: the retrieval index and the taxonomy
EMBEDDINGS_FILE = "embeddings.safetensors"  # their ticket, reply (and intent-name) embeddings, as trained
HISTORY_FILE = "loss_history.json"


class WeightsError(RuntimeError):
    """A weights folder that is missing, incomplete, or written by an incompatible version."""


def check_vectors(folder: Path, vectors: dict, rows: int, intents: int) -> None:
    """`embeddings.safetensors` holds a ticket and a reply vector per train row (and, where it has
    them, a name vector per intent); a folder edited by hand may not. Raises `WeightsError`."""
    for key, count, what, required in (("tickets", rows, "train rows", True), ("replies", rows, "train rows", True),
                                       ("names", intents, "intents", False)):
        if key not in vectors:
            if required:
                raise WeightsError(f"{folder / EMBEDDINGS_FILE}: no `{key}` vectors")
        elif len(vectors[key]) != count:
            raise WeightsError(f"{folder / EMBEDDINGS_FILE}: {len(vectors[key])} `{key}` vectors for {count} {what} "
                               f"({EXAMPLES_FILE}, {META_FILE}): the folder was changed after training")


EXAMPLE_FIELDS = {"id": (str, int), "ticket": str, "intent": str, "ideal_reply": str}


def training_record(stats: TrainingStats | None) -> dict | None:
    """The results file's training block, for `tickettune.json` (null where nothing was measured)."""
    if stats is None:
        return None
    return {"steps": int(stats.steps), "train_loss": finite(stats.train_loss, None),
            "val_loss": finite(stats.val_loss, None), "wall_clock_s": finite(stats.wall_clock_s, None)}


def stats_from_record(record: dict | None) -> TrainingStats | None:
    if not record:
        return None
    number = (lambda x: float("nan") if x is None else float(x))
    return TrainingStats(int(record["steps"]), number(record["train_loss"]), number(record["val_loss"]),
                         number(record["wall_clock_s"]))


def write_training(folder: str | Path, stats: TrainingStats) -> None:
    """Record the run's final training block (its whole wall-clock is known only at the end)."""
    path = Path(folder) / META_FILE
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["training"] = training_record(stats)
    write_json_atomic(path, meta)


def read_metadata(folder: Path) -> dict:
    """`tickettune.json` of `folder`, checked: the folder and its files exist, the format is ours."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such weights folder (run.py --weights writes one)")
    path = folder / META_FILE
    if not path.is_file():
        raise WeightsError(f"{folder}: not a tickettune weights folder ({META_FILE} is missing)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: written by tickettune {meta.get('tickettune', '?')} in format "
                           f"{meta.get('format', 'none')}; this is tickettune {__version__}, which reads format "
                           f"{FORMAT}: retrain with run.py, or predict with that version")
    required = ["adapter_config.json", "adapter_model.safetensors", EXAMPLES_FILE, EMBEDDINGS_FILE, "tokenizer.json"]
    if meta.get("reply_adapter"):
        required += [f"{modeling.REPLY_ADAPTER}/adapter_config.json", f"{modeling.REPLY_ADAPTER}/adapter_model.safetensors"]
    if meta.get("intent_encoder"):
        required += [f"{ENCODER_DIR}/adapter_config.json", f"{ENCODER_DIR}/adapter_model.safetensors",
                     f"{ENCODER_DIR}/{HEAD_FILE}"]
    missing = [name for name in required if not (folder / name).is_file()]
    missing += [f"{META_FILE}: '{key}'" for key in ("plan", "config", "taxonomy", "embedder", "ensemble_weights", "reply_policy")
                if key not in meta]
    if missing:
        raise WeightsError(f"{folder}: incomplete weights folder, missing " + ", ".join(missing))
    try:
        Plan(**meta["plan"])
        RunConfig.from_dict(meta["config"])
        ReplyPolicy(**meta["reply_policy"])
    except (TypeError, ConfigError) as exc:
        raise WeightsError(f"{path}: plan, config or reply policy this version cannot use ({exc})") from None
    try:
        read_jsonl(folder / EXAMPLES_FILE, EXAMPLE_FIELDS)
    except DataError as exc:
        raise WeightsError(f"{folder / EXAMPLES_FILE}: {exc}") from None
    return meta


def plan_for_device(saved: Plan, device: str | None) -> Plan:
    """The saved plan, moved to `device` (default: a GPU when there is one). The base model stays the
    one the adapters were trained on; dtype and autocast follow what this machine has."""
    hw = detect_hardware()
    device = device or ("cuda" if hw.cuda else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not hw.cuda):
        raise WeightsError(f"device {device!r} is not available here")
    if device == "cpu":
        return replace(saved, device="cpu", dtype="float32", method="lora",
                       autocast="bfloat16" if hw.cpu_bf16 else None)
    if saved.device == "cuda":
        return saved
    return replace(saved, device="cuda", dtype="bfloat16" if hw.bf16 else "float16", autocast=None)


def encoder_of(saved: str, config: RunConfig) -> RunConfig:
    """`config` with `encoder.model` set to the encoder that `saved` (tickettune.json's `embedder`) names:
    the index must be queried in its own space. A user's folder or the hashed stand-in name no choice:
    the config's stands (a folder of an older version, without the field: minilm)."""
    from tickettune.pipeline.embeddings import choice_of

    choice = choice_of(saved)
    if choice is None or choice == config.encoder.model:
        return config
    return replace(config, encoder=replace(config.encoder, model=choice))


def check_embedder(saved: str, folder: Path, choice: str | None = None, dim: int | None = None) -> None:
    """The encoder here (`choice`'s, or $TICKETTUNE_EMBEDDER's) must embed tickets in the space the
    index was saved in: present, the same kind, and (`dim`) of the index's dimension."""
    from tickettune.pipeline.embeddings import HASHED, EncoderUnavailable, embed, load_embedder

    try:
        here = load_embedder(choice=choice).name
    except EncoderUnavailable as exc:
        raise WeightsError(f"{folder}: its index was embedded with {saved}, which is not here: {exc}") from None
    if (saved == HASHED) != (here == HASHED):
        raise WeightsError(f"{folder}: its index was embedded with {saved}, but here the encoder is {here}: "
                           "install the same sentence encoder (see README)")
    if dim is not None and (got := embed(["dimension check"], choice=choice).shape[1]) != dim:
        raise WeightsError(f"{folder}: its index holds {dim}-d vectors (embedded with {saved}), but here the "
                           f"encoder is {here}, which embeds in {got} dimensions")
    if saved != here:
        log.warning("the index was embedded with %s; embedding tickets with %s", saved, here)
