import pytest

from tickettune.pipeline.grounding import degenerate, facts, ground, key_facts, trim_to_sentence

REF = ("Go to Settings → Billing → Seats and raise the seat count. Each seat is $8 per month on Team. "
       "Write to support@northstar.example if it fails.")


def test_facts_and_agreement():
    assert {"settings → billing → seats", "$8", "team", "support@northstar.example"} <= facts(REF)
    assert facts("Go to Settings > Billing > Seats") == {"settings → billing → seats"}
    other = "Seats are $8 each on Team; open Settings → Billing → Seats."
    assert key_facts([other, "Team seats cost $8."]) == {"settings → billing → seats", "$8", "team"}
    assert key_facts([REF, other]) == facts(REF)
    assert key_facts([]) == set()


@pytest.mark.parametrize("text, finished, reason", [
    ("Sure thing.", True, "too short"),
    ("go to the page go to the page go to the page go to the page now", True, "repetition loop"),
    ("Reference replies: - you said this and that and more", True, "leaks the prompt"),
    ("You are the company's customer support team. Write the reply to the ticket.", True, "leaks the prompt"),
    ("This sentence never ends because the limit", False, "cut off before the first full sentence"),
])
def test_degenerate(text, finished, reason):
    assert degenerate(text, finished) == reason


def test_unsupported_sentence_is_dropped():
    out = ground("Open Settings → Billing → Seats to add a seat for $8 on Team. Then call 555-0100 for support@northstar.example help.", True, [REF])
    assert out.reply.startswith("Open Settings → Billing → Seats to add a seat for $8 on Team.")
    assert "555" not in out.reply and "dropped 1 unsupported" in out.detail


def test_good_generation_is_kept():
    reply = "Happy to help! Open Settings → Billing → Seats, add the seat, and it costs $8 per month on Team; mail support@northstar.example."
    assert ground(reply, True, [REF]).action == "generated"


def test_dropped_fact_is_restored_from_the_reference_sentence():
    out = ground("Happy to help! Open Settings → Billing → Seats to add a seat on Team, mail support@northstar.example.", True, [REF])
    assert out.action == "repaired"
    assert out.reply.endswith("Each seat is $8 per month on Team.")


def test_degenerate_or_failed_generation_falls_back_to_nearest_reference():
    assert ground("ok", True, [REF, "other"]) .reply == REF
    assert ground(None, False, [REF]).action == "fallback"


def test_cut_generation_is_trimmed_to_its_last_sentence():
    assert trim_to_sentence("One full sentence here. And a cut-off tai") == "One full sentence here."
    out = ground("Open Settings → Billing → Seats, it is $8 on Team. Mail support@northstar.example for hel", False, [REF], repair=False)
    assert out.reply == "Open Settings → Billing → Seats, it is $8 on Team."


def test_missing_facts_match_whole_tokens_only():
    from tickettune.pipeline.grounding import missing_facts

    assert missing_facts("It costs $80 for 140 days.", {"$8", "14"}) == {"$8", "14"}
    assert missing_facts("It costs $8 for 14 days; see Settings > Billing.", {"$8", "14", "settings → billing"}) == set()
