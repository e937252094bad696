from tickettune.pipeline import prompts


def test_intent_prompt_exact_string(tokenizer):
    text = tokenizer.apply_chat_template(prompts.intent_messages("Where is my invoice?"), tokenize=False,
                                         add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nClassify the customer's support ticket. Answer with its intent label only.<|im_end|>\n"
        "<|im_start|>user\nWhere is my invoice?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_labels_can_be_listed_and_empty_ticket_is_explicit():
    msgs = prompts.intent_messages("", ["a.b", "c.d"])
    assert msgs[0]["content"].endswith("Labels: a.b, c.d.")
    assert msgs[1]["content"] == prompts.EMPTY_TICKET


def test_reply_prompt_exact_string():
    msgs = prompts.reply_messages("Can I get a refund?", ["Refunds within 14 days.", " Go to Billing. "])
    assert msgs[1]["content"] == ("Reference replies:\n- Refunds within 14 days.\n- Go to Billing.\n\n"
                                  "Ticket: Can I get a refund?")
    assert prompts.reply_messages("x", [])[1]["content"] == "Ticket: x"


def test_render_splits_prompt_and_completion_at_the_assistant_turn(tokenizer):
    msgs = prompts.intent_messages("hello")
    prompt_ids, completion_ids = prompts.render(tokenizer, msgs, "billing.refund")
    assert prompt_ids == prompts.render(tokenizer, msgs)[0]
    assert tokenizer.decode(completion_ids) == "billing.refund<|im_end|>"
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "billing.refund"}], tokenize=False)
    assert tokenizer.decode(prompt_ids + completion_ids) == full.rstrip("\n")


def test_truncate_ticket(tokenizer):
    assert prompts.truncate_ticket(tokenizer, "short", 8) == ("short", False)
    long = "word " * 5000
    cut, was_cut = prompts.truncate_ticket(tokenizer, long, 50)
    assert was_cut and len(tokenizer.encode(cut, add_special_tokens=False)) <= 51
