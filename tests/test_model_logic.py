"""Model-side logic on a tiny random Llama (fast): label scoring, generation, the budget guard."""

import contextlib
import time

import numpy as np
import pytest
import torch

from tickettune.pipeline import prompts
from tickettune.pipeline.config import TrainConfig
from tickettune.pipeline.generate import generate
from tickettune.pipeline.intent import score_labels
from tickettune.pipeline.retrieval import log_softmax
from tickettune.pipeline.train import Sequence, train


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
    done = train(model, tokenizer, seqs, set(), cfg=TrainConfig(batch_size=2), epochs=2, seed=0)
    assert done.steps == 6 and not done.stopped_early and np.isfinite(done.train_loss)
    late = train(model, tokenizer, seqs, set(), cfg=TrainConfig(batch_size=2), epochs=2, seed=0,
                 deadline=time.monotonic() - 1)
    assert late.steps == 0 and late.stopped_early
    model.unload()


def _lora(tiny_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM",
                                                 init_lora_weights=False))  # B != 0: every LoRA weight gets a gradient


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_batches_accumulate_the_same_gradient_as_one_batch(tiny_model, tokenizer):
    from tickettune.pipeline.train import _accumulate

    model = _lora(tiny_model)
    seqs = [Sequence([1, 2, 3, 4, 5, 6], [-100, -100, 3, 4, 5, 6], 0), Sequence([7, 8, 9], [-100, 8, 9], 1),
            Sequence([3, 3, 3, 3], [-100, -100, -100, 3], 2), Sequence([5, 9, 2, 7, 1], [-100, 9, 2, 7, 1], 3)]
    whole, n_whole = _accumulate(model, seqs, tokenizer.pad_token_id, "cpu", contextlib.nullcontext, 1)
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    split, n_split = _accumulate(model, seqs, tokenizer.pad_token_id, "cpu", contextlib.nullcontext, 3)
    assert n_whole == n_split == 11 and split == pytest.approx(whole, rel=1e-5)
    assert reference and all(torch.allclose(reference[k], g, atol=1e-6) for k, g in _grads(model).items())
    model.unload()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # every step skipped
def test_a_batch_that_runs_out_of_memory_is_trained_in_micro_batches(tiny_model, tokenizer, monkeypatch, caplog):
    import tickettune.pipeline.train as train_module

    real_loss, sizes = train_module._loss, []

    def loss_with_small_memory(model, batch, pad_id, device):
        sizes.append(len(batch))
        if len(batch) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss(model, batch, pad_id, device)

    monkeypatch.setattr(train_module, "_loss", loss_with_small_memory)
    model = _lora(tiny_model)
    seqs = [Sequence([1, 2, 3, 4], [-100, -100, 3, 4], i) for i in range(8)]
    limit = 1
    done = train(model, tokenizer, seqs, set(), cfg=TrainConfig(batch_size=4), epochs=2, seed=0)
    assert done.steps == 4 and np.isfinite(done.train_loss)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}  # the split is remembered after the first OOM
    assert "micro-batches" in caplog.text
    limit, sizes[:] = 0, []  # not even one row fits: every step is skipped, the run goes on
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    skipped = train(model, tokenizer, seqs, set(), cfg=TrainConfig(batch_size=4), epochs=1, seed=0)
    assert skipped.steps == 2 and np.isnan(skipped.train_loss) and "does not fit in memory: skipped" in caplog.text
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    model.unload()


def test_a_row_that_never_fits_costs_only_itself(tiny_model, tokenizer, monkeypatch):
    """3 short rows fit one at a time, the long one never does (its backward fails halfway, after
    layer 1's LoRA gradients were accumulated): the step's gradient is exactly the short rows'
    token-mean gradient."""
    import tickettune.pipeline.train as train_module
    from tickettune.pipeline.train import _accumulate, _gradients

    model = _lora(tiny_model)
    short = [Sequence([1, 2, 3, 4], [-100, -100, 3, 4], 0), Sequence([5, 6, 7], [-100, 6, 7], 1),
             Sequence([9, 8, 7, 6, 5], [-100, -100, -100, 6, 5], 2)]
    long = Sequence(list(range(1, 30)), [-100] + list(range(2, 30)), 3)
    _accumulate(model, short, tokenizer.pad_token_id, "cpu", contextlib.nullcontext, 1)
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    real_loss = train_module._loss

    failing = []

    def out_of_memory(grad):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, at the end of backward)")

    def first_layer_output(module, inputs, output):  # its gradient comes after layer 1's LoRA grads are in
        if failing:
            (output[0] if isinstance(output, tuple) else output).register_hook(out_of_memory)

    hook = model.get_base_model().model.layers[0].register_forward_hook(first_layer_output)

    def long_row_never_fits(model, batch, pad_id, device):
        failing[:] = [True] if any(s.row == 3 for s in batch) else []
        return real_loss(model, batch, pad_id, device)

    monkeypatch.setattr(train_module, "_loss", long_row_never_fits)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    try:
        value, n_tok, chunks = _gradients(model, short + [long], tokenizer.pad_token_id, "cpu",
                                          contextlib.nullcontext, chunks=1, opt=opt)
        got = _grads(model)
    finally:
        hook.remove()
        model.unload()
    assert n_tok == 2 + 2 + 2 and np.isfinite(value) and chunks == 4
    # rows alone vs one padded batch: fp32 rounding differs by ~1e-6 (a kept partial gradient is ~1e-1)
    assert set(got) == set(reference) and all(torch.allclose(reference[k], got[k], rtol=1e-4, atol=1e-5)
                                              for k in got)


def test_label_scoring_that_runs_out_of_memory_is_retried_in_halves(tiny_model, tokenizer, monkeypatch, caplog):
    import tickettune.pipeline.likelihood as intent_module

    tickets = ["Where is my invoice?", "2fa lost phone", "refund please", "add a guest"]
    labels = ["billing.invoice", "account.2fa_reset", "billing.refund"]
    reference = score_labels(tiny_model, tokenizer, tickets, labels, batch_size=4)
    real_chunk = intent_module._score_chunk

    def small_memory(model, encoded, *args):
        if len(encoded) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_chunk(model, encoded, *args)

    monkeypatch.setattr(intent_module, "_score_chunk", small_memory)
    limit = 1
    assert np.allclose(score_labels(tiny_model, tokenizer, tickets, labels, batch_size=4), reference, atol=1e-4)
    assert "retrying in halves" in caplog.text
    limit = 0  # nothing fits: uniform LM scores, so the embedding classifier decides
    assert np.allclose(score_labels(tiny_model, tokenizer, tickets, labels, batch_size=4), -np.log(3))


def test_val_loss_that_runs_out_of_memory_is_measured_row_by_row(tiny_model, tokenizer, monkeypatch):
    import tickettune.pipeline.train as train_module
    from tickettune.pipeline.train import evaluate_loss

    seqs = [Sequence([1, 2, 3, 4], [-100, -100, 3, 4], 0), Sequence([5, 6, 7], [-100, 6, 7], 1)]
    reference = evaluate_loss(tiny_model, tokenizer, seqs, 2)
    real_loss = train_module._loss
    monkeypatch.setattr(train_module, "_loss", lambda model, batch, *a: real_loss(model, batch, *a) if len(batch) == 1
                        else (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    split = evaluate_loss(tiny_model, tokenizer, seqs, 2)
    assert split[1] == reference[1] == 4 and split[0] == pytest.approx(reference[0], rel=1e-5)


def test_a_val_loss_that_nothing_could_measure_is_none_in_the_history(tiny_model, tokenizer, monkeypatch):
    import json

    import tickettune.pipeline.train as train_module

    real_loss = train_module._loss
    monkeypatch.setattr(train_module, "_loss", lambda model, batch, pad_id, device: real_loss(model, batch, pad_id, device)
                        if torch.is_grad_enabled() else (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    model = _lora(tiny_model)
    seqs = [Sequence([1, 2, 3, 4], [-100, -100, 3, 4], i) for i in range(4)]
    try:
        done = train(model, tokenizer, seqs, {0}, cfg=TrainConfig(batch_size=2), epochs=1, seed=0)
    finally:
        model.unload()
    assert [h["val_loss"] for h in done.history if "val_loss" in h] == [None]
    json.dumps(done.history, allow_nan=False)  # the loss history file is strict JSON


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_generation_restores_the_base_weights_exactly(tiny_model, dtype):
    """`modeling.merged` answers like the active adapter and leaves every weight bit-identical
    (subtracting the delta again would not round-trip in bf16), so a model predicts twice alike."""
    import copy

    from peft import LoraConfig, get_peft_model

    from tickettune.pipeline.modeling import REPLY_ADAPTER, adapter, merged

    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(tiny_model).to(dtype), lora)
    model.add_adapter(REPLY_ADAPTER, lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        with adapter(model, REPLY_ADAPTER):
            unmerged = model(input_ids=ids).logits.float()
        assert model.active_adapter == "default"  # the previous adapter is active again
        with merged(model, REPLY_ADAPTER):
            merged_logits = model(input_ids=ids).logits.float()
            assert model.active_adapter == REPLY_ADAPTER
        with merged(model, REPLY_ADAPTER):  # again: the same answer
            assert torch.equal(model(input_ids=ids).logits.float(), merged_logits)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(merged_logits, unmerged, atol=tolerance)
    assert model.active_adapter == "default"
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(getattr(m, "merged_adapters", []) for m in model.modules())


def test_a_model_without_the_reply_adapter_writes_with_the_base_weights(tiny_model):
    import copy

    from peft import LoraConfig, get_peft_model

    from tickettune.pipeline.modeling import REPLY_ADAPTER, adapter, merged

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules="all-linear",
                                                                task_type="CAUSAL_LM", init_lora_weights=False))
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        base = tiny_model(input_ids=ids).logits
        for use in (adapter, merged):
            with use(model, REPLY_ADAPTER):
                assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-6)
        assert not torch.allclose(model(input_ids=ids).logits, base, atol=1e-4)  # the intent adapter is back


def test_ragged_continuations_match_naive_scoring(tiny_model, tokenizer):
    """Per-prompt continuation lists of different counts and lengths (multiple-choice options):
    the shared-prefix batch equals scoring every (prompt, continuation) pair on its own."""
    from tickettune.pipeline.likelihood import continuation_logprobs

    prompts_ids = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    continuations = [[[20], [21, 22, 23]], [[24, 25], [26], [27, 28], [29]], [[30, 31, 32, 33]]]
    fast = continuation_logprobs(tiny_model, prompts_ids, continuations, tokenizer.pad_token_id, batch_size=2)
    for p, conts, got in zip(prompts_ids, continuations, fast):
        expected = []
        for c in conts:
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
            expected.append(sum(logp[len(p) - 1 + k, tok].item() for k, tok in enumerate(c)))
        assert got.shape == (len(conts),) and np.allclose(got, expected, atol=1e-4)
