"""Noisy copies of training tickets (typos, casing, terse, no punctuation) for robustness to
paraphrase probes. Pure and seeded: the same rng gives the same copies.

It does not paraphrase with a model; it only perturbs surface form, which is cheap enough to run
on every training row on a CPU.
"""

from __future__ import annotations

import random
import re

STOPWORDS = frozenset(
    "a an the is are was were be been am i we you my our your me us it its this that to of in on for "
    "with and or but so can could would will do does did have has had please hi hello hey thanks "
    "thank just there here how what when why".split()
)


def typos(text: str, rng: random.Random, rate: float = 0.08) -> str:
    """Swap two adjacent letters in roughly `rate` of the words longer than 3 letters."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and w.isalpha() and rng.random() < rate * 3:
            j = rng.randrange(len(w) - 1)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def terse(text: str, rng: random.Random) -> str:
    """Content words only, lower case: 'how do I add seats?' -> 'add seats'."""
    words = [w for w in re.findall(r"[\w'→>.-]+", text.lower()) if w not in STOPWORDS]
    return " ".join(words[:12]) or text


def shouty(text: str, rng: random.Random) -> str:
    return text.upper()


def flat(text: str, rng: random.Random) -> str:
    """No punctuation, no capitals, as typed on a phone."""
    return re.sub(r"[^\w\s]", "", text).lower()


STYLES = (typos, terse, flat, shouty)


def noisy_copies(text: str, copies: int, rng: random.Random) -> list[str]:
    """`copies` perturbed versions of `text`, each in a style drawn from `rng`, none equal to it."""
    out = []
    for _ in range(copies):
        style = STYLES[rng.randrange(len(STYLES))]
        variant = style(text, rng)
        out.append(variant if variant != text else flat(typos(text, rng, 0.3), rng))
    return out
