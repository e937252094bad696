"""Replies from the desk's own words: rank train replies by what the ticket asks, compose a reply
from them, score any candidate against an ideal reply, and choose the reply policy per run.

Ranking (`rank`): same-intent train rows by cos(ticket, train ticket) + 2·cos(ticket, train reply)
+ 0.5·(share of the ticket's content words found in the row's ticket or reply). The reply term
finds the reply that covers the ticket's sub-case, the word term the plan name, number or verb
("downgrade") that embeddings blur. These three weights were chosen once, on data/northstar's val
rows, and are reported untouched on data/northstar-alt and the Bitext sample (bench/quality.py).

Composition (`compose`): the best-ranked reply, plus up to `k` sentences of the next two replies
that state a fact (`grounding.facts`) it does not, most ticket-relevant first, and only sentences
about as relevant to the ticket as the reply they join (cosine to the ticket at least
`RELEVANCE_GATE` times the reply's): a sentence further from the ticket than that answers a sibling
case ("you can also set an expiry date" under "how many free guests?"). Every sentence is the
company's own, so a composed reply never states a fact no retrieved reply supports.

A train reply that repeats an identifier of its own ticket (an order or account number: five
digits or more, `identifiers`) is talking to that customer; borrowed for a new ticket it would
state someone else's number. `personalise` puts the new ticket's identifier in its place when the
ticket has exactly one, and a reply or sentence that cannot be personalised (the ticket has none, or
several) is passed over when the other candidates allow (`compose`). Emails are left alone: in
support tickets they are as often the desk's own address as the customer's.

`proxy_quality` mirrors the grader's reply score without labels it does not have: ½ embedding
cosine to the ideal reply (the judge) + ¼ recall of the ideal's facts (must-mention) + ¼ precision
of the candidate's facts (must-not-mention: a sibling case's facts count against it). The run
chooses `k` by this proxy, leave-one-out over its own train rows (`choose_extra_sentences`), and
generation versus composition on its held-out rows (`reply_policy.choose_reply_policy`).

Pure numpy and text over precomputed, L2-normalised embeddings: no model here.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tickettune.pipeline.augment import STOPWORDS
from tickettune.pipeline.grounding import FALLBACK, GENERATED, REPAIRED, RETRIEVED, facts, split_sentences
from tickettune.pipeline.stats import significant_gain

RANK_WEIGHTS = (1.0, 2.0, 0.5)   # ticket cosine, reply cosine, content-word overlap (chosen on data/northstar)
EXTRA_SENTENCES = (0, 1, 2)      # the composition sizes the run chooses among
COMPOSE_FROM = 2                 # replies after the best one that may lend sentences
RELEVANCE_GATE = 0.9             # a lent sentence's cosine to the ticket / the reply's (chosen on data/northstar)
LOO_ROWS = 300                   # train rows the leave-one-out choice of k looks at, at most
HELDOUT_REPLIES = 16             # held-out rows the reply policy generates for, at most

# One vocabulary for where a reply comes from. A *source* is how a run writes replies: the config's
# `infer.reply_source` (one of REPLY_SOURCES: AUTO lets the run choose, `reply_policy`) and the saved
# `ReplyPolicy.source` (one of POLICY_SOURCES; tickettune.json keeps it, so these values never change
# and old weights folders load). An *action* is what became of one row's reply (REPLY_ACTIONS: the
# diagnostics' `reply_action`, the server's `reply_source`; set by `grounding.ground` and
# `TicketModel.write_replies`). The docs' "compose" is the RETRIEVE source: a reply composed from the
# desk's own replies (`ReplyBank.compose`).
#   source RETRIEVE -> action RETRIEVED
#   source GENERATE -> action GENERATED, REPAIRED, or FALLBACK (the composed reply)
RETRIEVE, GENERATE, AUTO = "retrieve", "generate", "auto"
POLICY_SOURCES = (GENERATE, RETRIEVE)
REPLY_SOURCES = (AUTO, GENERATE, RETRIEVE)
REPLY_ACTIONS = (RETRIEVED, GENERATED, REPAIRED, FALLBACK)
_WORD = re.compile(r"[a-z0-9$€£%]+")
_IDENTIFIER = re.compile(r"(?<![\w.,])\d{5,}(?![\w]|[.,]\d)")  # five digits or more, not part of a price


def identifiers(text: str) -> list[str]:
    """The order, account or reference numbers `text` states (five digits or more), in order, once.

    >>> identifiers("Order 113542617735902 (not 1,250.00 or 2024) and order 00123842; again 00123842")
    ['113542617735902', '00123842']
    """
    return list(dict.fromkeys(_IDENTIFIER.findall(text)))


def content_words(text: str) -> frozenset[str]:
    """Lower-cased words that carry the ticket's sub-case: no stopwords, no 1-2 letter words.

    >>> sorted(content_words("How do I downgrade to the Team plan?"))
    ['downgrade', 'plan', 'team']
    """
    return frozenset(w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOPWORDS)


@dataclass(frozen=True)
class ReplyPolicy:
    """How this run writes replies, and the evidence it chose by (saved with the model)."""
    source: str = GENERATE          # GENERATE: the reply adapter writes, grounded; RETRIEVE: `compose`
    extra_sentences: int = 0        # `compose`'s k, for retrieved replies and generation fallbacks
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"source": self.source, "extra_sentences": self.extra_sentences, "evidence": self.evidence}


class ReplyBank:
    """The train replies, their sentences and embeddings, for ranking and composing."""

    def __init__(self, intents: list[str], tickets: list[str], replies: list[str], ticket_vectors: np.ndarray,
                 reply_vectors: np.ndarray, embed):
        self.intents, self.replies = intents, [r.strip() for r in replies]
        self.ticket_vectors, self.reply_vectors, self.embed = ticket_vectors, reply_vectors, embed
        self.words = [content_words(t + " " + r) for t, r in zip(tickets, replies)]
        self.echoes = [set(identifiers(t)) & set(identifiers(r)) for t, r in zip(tickets, self.replies)]
        self.sentences = [split_sentences(r) for r in self.replies]
        self._sentence_vectors: dict[int, np.ndarray] = {}  # embedded on first use: large banks need few
        self._rows_of: dict[str, list[int]] = {}
        for i, intent in enumerate(intents):
            self._rows_of.setdefault(intent, []).append(i)

    def prepare(self, ranked: list[list[int]]) -> None:
        """Embed, in one call, the sentences of every reply that `compose` may borrow from for these
        rankings (the replies after the best one)."""
        todo = sorted({i for rows in ranked for i in rows[1:1 + COMPOSE_FROM]} - set(self._sentence_vectors))
        flat = [s for i in todo for s in self.sentences[i]]
        vectors = self.embed(flat) if flat else np.zeros((0, self.ticket_vectors.shape[1]), dtype=np.float32)
        start = 0
        for i in todo:
            self._sentence_vectors[i] = vectors[start:start + len(self.sentences[i])]
            start += len(self.sentences[i])

    def rank(self, vector: np.ndarray, text: str, intent: str, exclude: int | None = None) -> list[int]:
        """Rows of `intent` (all of them, but `exclude`), most relevant to the ticket first."""
        wt, wr, ww = RANK_WEIGHTS
        words = content_words(text)
        rows = [i for i in self._rows_of.get(intent, []) if i != exclude]
        score = {i: wt * float(self.ticket_vectors[i] @ vector) + wr * float(self.reply_vectors[i] @ vector)
                 + ww * len(words & self.words[i]) / max(1, len(words)) for i in rows}
        return sorted(rows, key=lambda i: (-round(score[i], 6), i))

    def personalise(self, row: int, ticket: str, text: str | None = None) -> str | None:
        """`text` (default: reply `row`) with each identifier that row's reply echoed from its own
        ticket replaced by `ticket`'s identifier; None when one is there and `ticket` does not have
        exactly one to put in its place. Text without such identifiers comes back unchanged.

        >>> bank = ReplyBank(["a"], ["Cancel order 732201349959"], ["Order 732201349959 is cancelled."],
        ...                  np.zeros((1, 2)), np.zeros((1, 2)), None)
        >>> bank.personalise(0, "cancel 113542617735902 please"), bank.personalise(0, "cancel my order")
        ('Order 113542617735902 is cancelled.', None)
        """
        text = self.replies[row] if text is None else text
        echoed = [x for x in self.echoes[row] if x in text]
        if not echoed:
            return text
        own = identifiers(ticket)
        if len(own) != 1:
            return None
        return re.sub("|".join(sorted(map(re.escape, echoed), key=len, reverse=True)), own[0], text)

    def reference(self, row: int, ticket: str) -> str:
        """Reply `row` as a reference for `ticket`: personalised where it can be."""
        return self.personalise(row, ticket) or self.replies[row]

    def compose(self, vector: np.ndarray, rows: list[int], k: int, ticket: str = "") -> str:
        """The first reply of `rows` (of the first 1 + COMPOSE_FROM) that `personalise` can fit to
        `ticket`, else `rows[0]`'s, plus up to `k` sentences of the next replies that add a fact to it
        and pass the relevance gate (module docstring), most similar to the ticket first (ties: reply
        order). '' when `rows` is empty."""
        if not rows:
            return ""
        first, best = next(((i, text) for i in rows[:1 + COMPOSE_FROM]
                            if (text := self.personalise(i, ticket)) is not None), (rows[0], self.replies[rows[0]]))
        if k <= 0:
            return best
        have, bar = facts(best), RELEVANCE_GATE * float(self.reply_vectors[first] @ vector)
        lenders = [i for i in rows[:2 + COMPOSE_FROM] if i != first][:COMPOSE_FROM]
        self.prepare([[first] + lenders])
        pool = [(float(v @ vector), n, text) for n, i in enumerate(lenders)
                for s, v in zip(self.sentences[i], self._sentence_vectors[i])
                if float(v @ vector) >= bar and (text := self.personalise(i, ticket, s)) is not None
                and facts(text) - have and text not in best]
        pool.sort(key=lambda p: (-round(p[0], 6), p[1]))
        added: list[str] = []
        for _, _, sentence in pool:
            if len(added) == k:
                break
            if facts(sentence) - have:  # a sentence already added may cover its facts
                added.append(sentence)
                have |= facts(sentence)
        return " ".join([best] + added).strip()


def proxy_quality(candidate: str, ideal: str, candidate_vector: np.ndarray, ideal_vector: np.ndarray) -> float:
    """½ cosine + ¼ recall of the ideal's facts + ¼ precision of the candidate's facts (see module).

    >>> v = np.array([1.0, 0.0])
    >>> proxy_quality("Go to Settings → Billing.", "Open Settings → Billing.", v, v)
    1.0
    >>> proxy_quality("It costs $16.", "It costs $8.", v, v)   # same words, the wrong fact
    0.5
    """
    got, want = facts(candidate), facts(ideal)
    recall = len(got & want) / len(want) if want else 1.0
    precision = len(got & want) / len(got) if got else 1.0
    return round(0.5 * float(candidate_vector @ ideal_vector) + 0.25 * recall + 0.25 * precision, 6)


def choose_extra_sentences(bank: ReplyBank, tickets: list[str], embed,
                           max_rows: int = LOO_ROWS) -> tuple[int, dict[int, float]]:
    """`compose`'s k by leave-one-out over the train rows: each row whose intent has another row
    gets the reply composed from the *other* rows and is scored by `proxy_quality` against its own
    ideal reply (at most `max_rows` rows, spread evenly over the data). Returns the best k (ties:
    the smaller) and the mean score per k."""
    counts = Counter(bank.intents)
    rows = [i for i in range(len(tickets)) if counts[bank.intents[i]] >= 2]
    rows = rows[::-(-len(rows) // max_rows)] if rows else rows
    if not rows:
        return 0, {}
    ranked = {i: bank.rank(bank.ticket_vectors[i], tickets[i], bank.intents[i], exclude=i) for i in rows}
    bank.prepare(list(ranked.values()))
    means = {}
    for k in EXTRA_SENTENCES:
        candidates = [bank.compose(bank.ticket_vectors[i], ranked[i], k, tickets[i]) for i in rows]
        vectors = embed(candidates)
        means[k] = round(float(np.mean([proxy_quality(c, bank.replies[i], v, bank.reply_vectors[i])
                                        for c, v, i in zip(candidates, vectors, rows)])), 4)
    best = max(EXTRA_SENTENCES, key=lambda k: (means[k], -k))
    return best, means


def generation_wins(pairs: list[tuple[float, float]], level: float = 0.05) -> bool:
    """True when generation beat composition on the held-out rows beyond chance: a one-sided paired
    t-test of the gains (generated - composed quality) at `level`. A run measures on a handful of
    rows, so the burden of proof is on generation: without a clear win it keeps the reply that
    needs no model (the desk's own sentences, and a fraction of the prediction time). Fewer than
    two rows prove nothing.

    >>> generation_wins([(0.8, 0.6), (0.7, 0.6), (0.9, 0.7)])
    True
    >>> generation_wins([(0.9, 0.6), (0.5, 0.6), (0.6, 0.6)])   # one lucky row is not a win
    False
    """
    return significant_gain(np.array([g - c for g, c in pairs]), level)
