"""Model-side logic on a tiny random Llama (fast): label scoring, generation, the budget guard."""

import time

import numpy as np
import pytest
import torch

from tickettune import prompts
from tickettune.config import TrainConfig
from tickettune.generate import generate
from tickettune.intent import score_labels
from tickettune.retrieval import log_softmax
from tickettune.train import Sequence, train


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def naive_scores(model, tokenizer, tickets, labels):
    """Full-sequence scoring of every (ticket, label) pair, one at a time: the reference."""
    out = np.zeros((len(tickets), len(labels)))
    for i, t in enumerate(tickets):
        for j, lab in enumerate(labels):
            p, c = prompts.render(tokenizer, prompts.intent_messages(t), lab)
            ids = torch.tensor([p + c])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            out[i, j] = sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(c))
    return log_softmax(out)


def test_shared_prefix_label_scoring_matches_naive_scoring(tiny_model, tokenizer):
    tickets = ["Where is my invoice?", "2fa lost phone", "Can I get my money back for last month please?"]
    labels = ["billing.invoice", "billing.refund_request", "account.2fa_reset", "x"]
    fast = score_labels(tiny_model, tokenizer, tickets, labels, batch_size=2)  # batches mix prompt lengths
    assert fast.shape == (3, 4)
    assert np.allclose(fast, naive_scores(tiny_model, tokenizer, tickets, labels), atol=1e-4)


def test_generation_is_deterministic_and_respects_the_deadline(tiny_model, tokenizer):
    ids = [prompts.render(tokenizer, prompts.reply_messages(t, ["ref"]))[0] for t in ("a", "bb bb", "ccc")]
    stop = [tokenizer.eos_token_id]
    first = generate(tiny_model, tokenizer, ids, 6, 2, stop)
    assert [g.text for g in first] == [g.text for g in generate(tiny_model, tokenizer, ids, 6, 2, stop)]
    assert all(g.text is not None and g.new_tokens <= 6 for g in first)
    late = generate(tiny_model, tokenizer, ids, 6, 2, stop, deadline=time.monotonic() - 1)
    assert [g.text for g in late] == [None, None, None]  # the caller substitutes the retrieved reply


def test_training_stops_at_the_deadline(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    seqs = [Sequence([1, 2, 3, 4], [-100, -100, 3, 4], i) for i in range(6)]
    done = train(model, tokenizer, seqs, set(), TrainConfig(batch_size=2), 2, 0)
    assert done.steps == 6 and not done.stopped_early and np.isfinite(done.train_loss)
    late = train(model, tokenizer, seqs, set(), TrainConfig(batch_size=2), 2, 0, deadline=time.monotonic() - 1)
    assert late.steps == 0 and late.stopped_early
    model.unload()
