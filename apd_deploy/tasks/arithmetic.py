"""Arithmetic word problems in the spirit of GSM8K: two operations on two-digit numbers, a short
worked solution, and a final answer line, e.g.

    Q: Tom has 23 apples. He buys 19 more. Then he gives away 5. How many apples does he have now?
    A: 23 + 19 = 42. 42 - 5 = 37. The answer is 37.

The second equation reuses the first result, so the answer's tokens depend on each other: the
kind of dependency that per-position parallel decoding gets wrong. A solution has more than one
correct form: the operands of `+` come in either order, and the answer line is either
"The answer is 37." or "Answer: 37.". Decoding positions independently can mix two forms
("19 + 19 = 42", "The: 37."), which is where APD's verifier earns its keep. Problems are split into
train, validation and test by a hash of the question, so no problem is in two splits.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lucy", "Max", "Emma", "Leo", "Zoe", "Omar", "Ines")
ITEMS = ("apples", "books", "coins", "stamps", "pens", "cards", "shells", "marbles", "eggs", "toys")
SPLITS = {"train": range(0, 90), "validation": range(90, 95), "test": range(95, 100)}
ANSWER = re.compile(r"(?:The answer is|Answer:) (-?\d+)\.")
ANSWER_LINES = ("The answer is {}.", "Answer: {}.")


@dataclass(frozen=True)
class Template:
    question: str
    ops: tuple[str, str]  # first on (a, b), second on (result, c)


TEMPLATES = (
    Template("{name} has {a} {item}. {name} buys {b} more, then gives away {c}. How many {item} are left?", ("+", "-")),
    Template("A shop had {a} {item}. It sold {b} in the morning and {c} in the afternoon. How many {item} are left?", ("-", "-")),
    Template("{name} found {a} {item} on Monday, {b} on Tuesday and {c} on Friday. How many {item} in total?", ("+", "+")),
    Template("A box holds {a} {item}. {name} takes out {b} and puts in {c}. How many {item} are in the box?", ("-", "+")),
    Template("{name} had {a} {item} and gave {b} away. Then {name} won {c} more. How many {item} now?", ("-", "+")),
    Template("{name} collects {a} {item}. A friend adds {b} and a sister adds {c}. How many {item} does {name} have?", ("+", "+")),
)


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked solution, ending with the answer line
    answer: int

    @property
    def split(self) -> str:
        bucket = int(hashlib.sha256(self.question.encode()).hexdigest(), 16) % 100
        return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y


def random_problem(rng: random.Random) -> Problem:
    template = rng.choice(TEMPLATES)
    while True:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        first = _apply(template.ops[0], a, b)
        second = _apply(template.ops[1], first, c)
        if first >= 0 and second >= 0:
            break
    question = template.question.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b, c=c)
    # The form is drawn from the question, not from `rng`: the stream of questions (and so each
    # split's problems) stays what it was before solutions had more than one form.
    form = random.Random(question)
    solution = (f"{_equation(form, a, template.ops[0], b, first)} {_equation(form, first, template.ops[1], c, second)} "
                + form.choice(ANSWER_LINES).format(second))
    return Problem(question, solution, second)


def _equation(form: random.Random, x: int, op: str, y: int, result: int) -> str:
    if op == "+" and form.random() < 0.5:
        x, y = y, x
    return f"{x} {op} {y} = {result}."


def problems(split: str, seed: int = 0) -> Iterator[Problem]:
    """An endless, reproducible stream of distinct problems of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng, seen = random.Random(f"{split}:{seed}"), set()
    while True:
        problem = random_problem(rng)
        if problem.split == split and problem.question not in seen:
            seen.add(problem.question)
            yield problem


def extract_answer(text: str) -> int | None:
    """The number of the first answer line (either form) in generated text, or None."""
    match = ANSWER.search(text)
    return int(match.group(1)) if match else None
