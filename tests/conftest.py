import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "northstar"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled SmolLM2 tokenizer (real chat template), loaded once."""
    from transformers import AutoTokenizer

    from tickettune.pipeline.plan import BUNDLED_GGUF, bundled_model_dir

    tok = AutoTokenizer.from_pretrained(bundled_model_dir(), gguf_file=BUNDLED_GGUF)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok
