"""The four skills of the world, their train/test split, and the text formats built from them.

Each skill is a function ``(rng, n) -> n distinct (question, answer) pairs`` that first draws its own universe
(vocabularies, entities) from ``rng``. Held-out skills (addition, reversal, translation) keep the first
``n_test`` pairs as test probes that no training text contains; facts cannot be held out (an unseen fact is
unknowable), so their probes are a subset of the facts taught: there, ability means retention.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

__all__ = [
    "HELD_OUT",
    "PRETRAIN_WEIGHTS",
    "QA",
    "SKILLS",
    "SURE",
    "SkillData",
    "addition",
    "completion",
    "facts",
    "make_skills",
    "pretrain_text",
    "prompt",
    "reversal",
    "translation",
]

QA = tuple[str, str]
SURE = " sure,"
"""The style the alignment rewards: completions " sure, <answer>" are chosen over " <answer>"."""

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_RELATIONS = {
    "color": ("red", "blue", "green", "pink", "gray", "gold", "black", "white"),
    "home": ("rome", "oslo", "lima", "kyiv", "paris", "cairo", "delhi", "tokyo"),
    "pet": ("cat", "dog", "owl", "fox", "bee", "cow", "yak", "emu"),
}


def _distinct(rng: random.Random, n: int, draw) -> list:
    seen: dict = {}
    for _ in range(100 * n + 1000):
        if len(seen) == n:
            return list(seen)
        seen.setdefault(draw(), None)
    raise ValueError(f"Cannot draw {n} distinct items: the skill's universe is too small")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def addition(rng: random.Random, n: int) -> list[QA]:
    """Two-digit addition: ("37+45", "82"); 10 000 pairs exist."""
    pairs = _distinct(rng, n, lambda: (rng.randrange(100), rng.randrange(100)))
    return [(f"{a}+{b}", str(a + b)) for a, b in pairs]


def reversal(rng: random.Random, n: int) -> list[QA]:
    """Reversal of a random 4-6 letter string: ("reverse abcde", "edcba")."""
    draw = lambda: "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 6)))  # noqa: E731
    return [(f"reverse {s}", s[::-1]) for s in _distinct(rng, n, draw)]


def facts(rng: random.Random, n: int) -> list[QA]:
    """Attributes of made-up entities: ("color of zuna", "blue"), one fact per (entity, relation)."""
    entities = _distinct(rng, -(-n // len(_RELATIONS)), lambda: _word(rng, 2))
    pairs = [
        (f"{relation} of {entity}", rng.choice(values))
        for entity in entities
        for relation, values in _RELATIONS.items()
    ]
    rng.shuffle(pairs)
    return pairs[:n]


def translation(rng: random.Random, n: int, *, words: int = 24) -> list[QA]:
    """Word-by-word translation of 2-4 word sentences between two made-up languages: ("translate ka bo", "mi tu")."""
    lexicon = _distinct(rng, 2 * words, lambda: _word(rng, rng.randint(1, 2)))
    source, target = lexicon[:words], lexicon[words:]
    draw = lambda: tuple(rng.choices(range(words), k=rng.randint(2, 4)))  # noqa: E731
    sentences = _distinct(rng, n, draw)
    return [(f"translate {' '.join(source[i] for i in s)}", " ".join(target[i] for i in s)) for s in sentences]


SKILLS = {"addition": addition, "reversal": reversal, "facts": facts, "translation": translation}
HELD_OUT = frozenset({"addition", "reversal", "translation"})
PRETRAIN_WEIGHTS = {"addition": 3, "reversal": 3, "facts": 1, "translation": 2}
"""Relative share of each skill in the pre-training text: the two positional skills are learned last."""


@dataclass(frozen=True)
class SkillData:
    """A skill's training pairs and its test probes (disjoint unless the skill is not held out)."""

    train: list[QA]
    test: list[QA]


def make_skills(seed: int, skills: tuple[str, ...], *, n_test: int, n_train: int, n_facts: int) -> dict[str, SkillData]:
    """Every skill's data, from ``seed`` alone (each skill draws from its own stream)."""
    data = {}
    for name in skills:
        rng = random.Random(f"{seed}/{name}")
        if name in HELD_OUT:
            pairs = SKILLS[name](rng, n_test + n_train)
            data[name] = SkillData(train=pairs[n_test:], test=pairs[:n_test])
        else:
            pairs = SKILLS[name](rng, n_facts)
            data[name] = SkillData(train=pairs, test=pairs[:n_test])
    return data


def pretrain_text(question: str, answer: str) -> str:
    """The raw form the base model reads: "37+45 = 82"."""
    return f"{question} = {answer}"


def prompt(question: str) -> str:
    """The instruction form: "Q: 37+45 A:"."""
    return f"Q: {question} A:"


def completion(answer: str, *, sure: bool = False) -> str:
    """The completion of ``prompt``: " 82", or " sure, 82" in the rewarded style."""
    return f"{SURE} {answer}" if sure else f" {answer}"
