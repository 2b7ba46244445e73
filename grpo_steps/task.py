"""The embedded verifiable task: integer arithmetic with exact answers, generated from a seed.

Prompts are bare expressions (`37+48=`) so a tiny character-level model can learn them on a CPU in minutes;
the answer is the exact integer, checked by `grpo_steps.grpo.rewards.exact_match`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def make_problem(rng: random.Random, max_operand: int, operations: list[str]) -> Problem:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice(operations)
    return Problem(prompt=f"{a}{op}{b}=", answer=str(_OPS[op](a, b)))


def make_splits(
    seed: int, sizes: dict[str, int], max_operand: int, operations: list[str]
) -> dict[str, list[Problem]]:
    """Disjoint splits: a prompt lands in exactly one split, so held-out accuracy measures generalisation."""
    total = sum(sizes.values())
    space = (max_operand + 1) ** 2 * len(operations)
    if total > space:
        raise ValueError(f"asked for {total} distinct prompts but only {space} exist with max_operand={max_operand}")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < total:
        p = make_problem(rng, max_operand, operations)
        if p.prompt not in seen:
            seen.add(p.prompt)
            problems.append(p)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = problems[start : start + n]
        start += n
    return out


def wrong_answer(rng: random.Random, answer: str) -> str:
    """A plausible but wrong answer: off by a small amount or a digit changed, never equal to the right one."""
    value = int(answer)
    while True:
        kind = rng.random()
        if kind < 0.35:
            cand = rng.randint(min(-10, value - 100), value + 100)
        elif kind < 0.7:
            cand = value + rng.choice([-10, -2, -1, 1, 2, 10])
        else:
            digits = list(str(abs(value)))
            i = rng.randrange(len(digits))
            digits[i] = str(rng.randrange(10))
            cand = int("".join(digits)) * (-1 if value < 0 else 1)
        if cand != value:
            return str(cand)


def make_preference_pairs(seed: int, problems: list[Problem], n: int) -> list[dict[str, str]]:
    """(prompt, chosen, rejected): the right answer preferred over a near miss."""
    rng = random.Random(seed + 1)
    pairs = []
    for i in range(n):
        p = problems[i % len(problems)]
        pairs.append({"prompt": p.prompt, "chosen": p.answer, "rejected": wrong_answer(rng, p.answer)})
    return pairs
