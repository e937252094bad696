"""The fine-tuned intent encoder survives save and load: the folder it writes (`encoder/`: the LoRA adapter
and the logistic-regression head) gives back the same label scores. Fast suite: the bundled MiniLM, a few
training steps on a dozen texts (seconds on a CPU)."""

import numpy as np
import pytest

from tickettune.pipeline.config import EncoderConfig
from tickettune.pipeline.encoder import ENCODER_DIR, HEAD_FILE, IntentEncoder, training_texts

TICKETS = [
    ("I was charged twice this month", "billing.double_charge"),
    ("Why is there a second charge on my card?", "billing.double_charge"),
    ("How do I add a seat for a new colleague?", "account.add_seat"),
    ("Please add one more user to our team plan", "account.add_seat"),
    ("The app crashes when I open settings", "tech.crash"),
    ("Settings page closes itself right away", "tech.crash"),
]
PROBES = ["double charge on my invoice", "add a teammate", "it keeps crashing", "", "hello"]
TINY = EncoderConfig(min_steps=3, max_steps=3, batch_size=6, per_class=2, copies=0, bf16=False)
# save() names the base by its package pin, which PEFT cannot open to compare vocabularies: harmless here
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file")


@pytest.fixture(scope="module")
def fitted():
    pytest.importorskip("peft")
    labels = sorted({intent for _, intent in TICKETS})
    texts, y = training_texts([t for t, _ in TICKETS], [i for _, i in TICKETS], labels, TINY, seed=0)
    return IntentEncoder.fit(texts, y, labels, TINY, seed=0), labels


def test_the_encoder_trained_and_its_head_has_one_row_per_label(fitted):
    encoder, labels = fitted
    assert encoder.steps == 3
    assert encoder.coef.shape == (len(labels), encoder.model.config.hidden_size)
    assert encoder.intercept.shape == (len(labels),)


def test_save_then_load_gives_the_same_scores(fitted, tmp_path):
    encoder, labels = fitted
    encoder.save(tmp_path)
    folder = tmp_path / ENCODER_DIR
    assert (folder / HEAD_FILE).is_file() and (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()

    loaded = IntentEncoder.load(tmp_path, labels, encoder.max_length)
    assert loaded.labels == encoder.labels == labels
    assert np.array_equal(loaded.coef, encoder.coef) and np.array_equal(loaded.intercept, encoder.intercept)
    before, after = encoder.logprobs(PROBES), loaded.logprobs(PROBES)
    assert before.shape == (len(PROBES), len(labels))
    assert np.allclose(after, before, atol=1e-6)
    assert [labels[i] for i in after.argmax(1)] == [labels[i] for i in before.argmax(1)]


def test_the_fine_tuned_weights_are_what_is_saved(fitted, tmp_path):
    """A load that dropped the adapter (the bare MiniLM under the same head) would score differently:
    this is what makes the round trip above able to fail."""
    from tickettune.pipeline.encoder import load_base_encoder

    encoder, labels = fitted
    base, tokenizer = load_base_encoder()
    bare = IntentEncoder(labels, base, tokenizer, encoder.coef, encoder.intercept, encoder.max_length)
    assert not np.allclose(bare.logprobs(PROBES), encoder.logprobs(PROBES), atol=1e-6)
