"""The embedded verifiable task: integer arithmetic with exact answers, generated from a seed.

Two formats of the same problems (`task.format`):
* `answer` (the default): bare expressions (`37+48=`) answered by the number alone, so a tiny character-level
  model learns them on a CPU in minutes; checked by `grpo_steps.grpo.rewards.exact_match`.
* `reasoning`: a question (`What is 37 + 48?`) answered with the working, column by column, then the answer
  after `####` (`7 + 8 = 15, 3 + 4 + 1 = 8. #### 85`), the shape of a GSM8K solution; checked by the
  math-verify accuracy reward. The weak teacher's slip is then a line of working that drops the carry.
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


def _digits(a: int, b: int) -> list[tuple[int, int]]:
    width = max(len(str(a)), len(str(b)))
    return list(zip(map(int, str(a).zfill(width)), map(int, str(b).zfill(width)), strict=True))


def sloppy_answer(prompt: str) -> str | None:
    """The classic systematic slips of a weak teacher: addition without carrying, subtraction taking the
    smaller digit from the larger in each column (no borrowing). None where the slip changes nothing or
    no slip is modelled (multiplication, negative operands)."""
    expr = prompt.rstrip("=")
    for op in "+-":
        a, sep, b = expr.partition(op)
        if sep and a.isdigit() and b.isdigit():
            break
    else:
        return None
    a_i, b_i = int(a), int(b)
    cols = _digits(a_i, b_i)
    if op == "+":
        slip = int("".join(str((x + y) % 10) for x, y in cols))
        right = a_i + b_i
    else:
        if a_i < b_i:
            return None
        slip = int("".join(str(abs(x - y)) for x, y in cols))
        right = a_i - b_i
    return str(slip) if slip != right else None


def demonstrations(seed: int, problems: list[Problem], error_rate: float) -> list[str]:
    """Cold-start completions from a weak teacher: each problem its teacher can slip on is answered with the
    slip with probability `error_rate`, else correctly. The errors are systematic, as a weaker model's are,
    so a policy imitating them is confidently wrong where a verifier can tell."""
    rng = random.Random(seed + 2)
    out = []
    for p in problems:
        slip = sloppy_answer(p.prompt)
        out.append(slip if slip is not None and rng.random() < error_rate else p.answer)
    return out


# The kinds of wrong answer a preference pair's `rejected` can be, and their default shares. `slip` is the weak
# teacher's systematic error, the one the starting policy makes and GRPO must correct; a reward model that
# only spots `random` digits would be no scorer, so its held-out accuracy is reported per kind.
REJECTED_KINDS: dict[str, float] = {"slip": 0.4, "offset": 0.3, "digit": 0.2, "random": 0.1}
_OFFSETS = (-10, -2, -1, 1, 2, 10)


def _wrong_of_kind(rng: random.Random, kind: str, value: int, prompt: str) -> int | None:
    if kind == "slip":
        slip = sloppy_answer(prompt)
        return None if slip is None else int(slip)
    if kind == "offset":
        return value + rng.choice(_OFFSETS)
    if kind == "digit":
        digits = list(str(abs(value)))
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
        return int("".join(digits)) * (-1 if value < 0 else 1)
    return rng.randint(min(-10, value - 100), value + 100)  # random


def wrong_answer_of_kind(
    rng: random.Random, answer: str, prompt: str = "", mix: dict[str, float] | None = None
) -> tuple[str, str]:
    """(a plausible wrong answer, its kind), the kind drawn from `mix` among those that apply to the problem
    (a slip only where the teacher can slip); never equal to the right answer."""
    value = int(answer)
    mix = dict(mix or REJECTED_KINDS)
    if sloppy_answer(prompt) is None:
        mix.pop("slip", None)
    kinds, weights = zip(*((k, w) for k, w in mix.items() if w > 0), strict=True)
    while True:
        kind = rng.choices(kinds, weights)[0]
        cand = _wrong_of_kind(rng, kind, value, prompt)
        if cand is not None and cand != value:
            return str(cand), kind


def wrong_answer(rng: random.Random, answer: str, prompt: str = "") -> str:
    """A plausible but wrong answer: a slip, off by a small amount, a digit changed or random."""
    return wrong_answer_of_kind(rng, answer, prompt)[0]


def make_preference_pairs(
    seed: int, problems: list[Problem], n: int, mix: dict[str, float] | None = None
) -> list[dict[str, str]]:
    """(prompt, chosen, rejected, kind): the right answer preferred over a near miss of the given kind."""
    rng = random.Random(seed + 1)
    pairs = []
    for i in range(n):
        p = problems[i % len(problems)]
        rejected, kind = wrong_answer_of_kind(rng, p.answer, p.prompt, mix)
        pairs.append({"prompt": p.prompt, "chosen": p.answer, "rejected": rejected, "kind": kind})
    return pairs


# ------------------------------------------------------------------------------------- the reasoning format


def question(prompt: str) -> str:
    """`37+48=` as the reasoning format asks it: `What is 37 + 48?`."""
    expr = prompt.rstrip("=")
    for op in "+-*":
        a, sep, b = expr.partition(op)
        if sep and a:
            return f"What is {a} {op} {b}?"
    return f"What is {expr}?"


# The place of each column, ones first, as the `verbose` working names it (beyond these: `column N`).
PLACES = ("ones", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands", "millions",
          "ten millions", "hundred millions")
WORKINGS = ("terse", "verbose")


def _place(i: int) -> str:
    return PLACES[i] if i < len(PLACES) else f"column {i + 1}"


def worked_solution(prompt: str, answer: str, slip: bool = False, working: str = "terse") -> str:
    """The working of an addition column by column, then `#### <answer>`; with `slip`, the weak teacher's:
    every carry dropped (its final number is `sloppy_answer`). Other operations: one line of working.

    `working` (task.working): `terse` writes each column's sum (`7 + 8 = 15, 3 + 4 + 1 = 8. #### 85`);
    `verbose` names the column, the digit written, the carry and the digits so far, one sentence a column
    (`ones: 7 + 8 = 15, write 5, carry 1, so far 5. tens: 3 + 4 + 1 = 8, write 8, so far 85. #### 85`), about
    20-25 tokens a column: the long reasoning completions of configs/reasoning-long-cpu.yaml. The weak teacher's
    slip there is the carry clause left out (its digits so far can then start with 0: `so far 05. #### 5`).
    Subtraction and multiplication keep their one line in either working."""
    if working not in WORKINGS:
        raise ValueError(f"working must be one of {WORKINGS}, got {working!r}")
    expr = prompt.rstrip("=")
    a, sep, b = expr.partition("+")
    if not (sep and a.isdigit() and b.isdigit()):
        shown = question(prompt)[len("What is "):-1]
        result = (sloppy_answer(prompt) or answer) if slip else answer  # subtraction: the no-borrow slip
        return f"{shown} = {result}. #### {result}"
    steps, digits, carry = [], [], 0
    cols = list(reversed(_digits(int(a), int(b))))
    for i, (x, y) in enumerate(cols):
        c = 0 if slip else carry
        total = x + y + c
        carry = total // 10
        last = i == len(cols) - 1
        digits.append(str(total) if last and not slip else str(total % 10))
        line = f"{x} + {y}{' + 1' if c else ''} = {total}"
        if working == "verbose":
            so_far = str(total % 10) + "".join(reversed(digits[:-1]))
            carried = ", carry 1" if carry and not slip else ""
            line = f"{_place(i)}: {line}, write {total % 10}{carried}, so far {so_far}"
            if last and carried:
                line += f". last carry: so far {''.join(reversed(digits))}"
        steps.append(line)
    result = str(int("".join(reversed(digits))))
    return (". " if working == "verbose" else ", ").join(steps) + f". #### {result}"


def reasoning_rejected(prompt: str, answer: str, rejected: str, kind: str, working: str = "terse") -> str:
    """A preference pair's rejected completion in the reasoning format: the teacher's slipped working for a
    slip, else the right working with a wrong final answer (the reward model must check that they agree)."""
    if kind == "slip":
        return worked_solution(prompt, answer, slip=True, working=working)
    return worked_solution(prompt, answer, working=working).rsplit("####", 1)[0] + f"#### {rejected}"
