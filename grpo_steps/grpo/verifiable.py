"""Rule-based, verifiable rewards for reasoning completions: accuracy by math-verify, format, overlong.

* `MathAccuracy`: 1.0 when the completion's final answer is mathematically equal to the reference, else 0.0.
  Answers are read by the `math-verify` package, as open-r1 does: `\\boxed{49}`, `#### 49`, "the answer is
  49", the last number, LaTeX (`\\frac{98}{2}`), decimals (`49.0`) and equivalent forms. Parsing and comparing
  run in a worker process with a time limit per completion (math-verify's own, which needs a main thread, and
  a backstop here): a completion that hangs the parser scores 0 and the run goes on, with a warning.
* `FormatReward`: 1.0 / 0.0 for completions matching a regular expression (default: the
  `<think>...</think>` then an answer layout of DeepSeek-R1-style training).
* `OverlongPenalty`: DAPO's soft overlong punishment, 0 up to `max_length - buffer` tokens, then falling
  linearly to -1 at `max_length` (`buffer` defaults to a quarter of it).

Each is a reward function with the usual interface, `f(prompts, completions, **columns)`, built from the
keyword arguments of its `grpo.reward_functions[i].kwargs` entry.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)


def _answer_key(value: Any) -> str:
    """A normal form in which equal numbers are equal strings (85, 85.0, 170/2 -> '85'); others as printed."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return str(value)
    return str(int(number)) if number.is_integer() else repr(round(number, 9))


def _extract_batch(completions: list[str], timeout_s: int) -> list[str | None]:
    """In the worker process: each completion's final answer in math-verify's normal form, or None."""
    from math_verify import parse  # noqa: PLC0415 - imported in the worker only

    out: list[str | None] = []
    for completion in completions:
        try:
            parsed = parse(completion, parsing_timeout=timeout_s)
            out.append(_answer_key(parsed[0]) if parsed else None)
        except Exception:  # noqa: BLE001 - math-verify's TimeoutException and parser errors alike
            out.append(None)
    return out


def _verify_batch(golds: list[str], completions: list[str], timeout_s: int) -> list[float]:
    """In the worker process: 1.0 / 0.0 per completion; parser errors and time-outs score 0.0."""
    from math_verify import parse, verify  # noqa: PLC0415 - imported in the worker only

    out = []
    for gold, completion in zip(golds, completions, strict=True):
        try:
            target = parse(gold, parsing_timeout=timeout_s)
            answer = parse(completion, parsing_timeout=timeout_s)
            out.append(1.0 if target and answer and verify(target, answer, timeout_seconds=timeout_s) else 0.0)
        except Exception:  # noqa: BLE001 - math-verify's TimeoutException and parser errors alike
            out.append(0.0)
    return out


class MathAccuracy:
    """1.0 when the final answer equals the reference `answer` column (math-verify), else 0.0."""

    __name__ = "math_accuracy"
    CHUNK = 64  # completions per job sent to the worker (each job has its own time limit)

    def __init__(self, timeout_s: float = 5.0, backstop_s: float = 60.0):
        if not timeout_s > 0 or not backstop_s > 0:
            raise ValueError(f"math_accuracy: timeout_s and backstop_s must be > 0 (got {timeout_s}, {backstop_s})")
        self.backstop_s = backstop_s
        import math_verify  # noqa: F401, PLC0415 - fail at build time, naming the package, when it is missing

        self.timeout_s = max(1, math.ceil(timeout_s))  # math-verify's alarm counts whole seconds
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawn: no fork of a process that holds torch's thread pools
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:  # a worker process never outlives its reward function
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass

    def __call__(self, prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float | None]:
        golds = [str(a).strip() for a in answer]
        return self._run(_verify_batch, 3, 0.0, golds, list(completions))

    def extract(self, completions: list[str]) -> list[str | None]:
        """Each completion's final answer in a normal form (equal answers compare equal), for majority votes."""
        return self._run(_extract_batch, 1, None, list(completions))

    def _run(self, fn: Any, calls_per_item: int, failed: Any, *columns: list[str]) -> list[Any]:
        """`fn` over the columns in chunks of CHUNK, each under its own backstop: a chunk the worker does not
        finish (a hang math-verify's alarm missed, a crashed worker) scores `failed`, with a warning, and a
        fresh worker takes the next one. One call at a time per judge (a lock), so threads may share it."""
        n = len(columns[-1])
        out: list[Any] = []
        with self._lock:
            for start in range(0, n, self.CHUNK):
                part = [c[start : start + self.CHUNK] for c in columns]
                size = len(part[-1])
                # every completion's own limits (math-verify's alarms), plus the worker's start-up
                limit = calls_per_item * self.timeout_s * size + self.backstop_s
                try:
                    out += list(self._executor().submit(fn, *part, self.timeout_s).result(timeout=limit))
                except (FutureTimeout, BrokenProcessPool) as e:
                    why = f"not checked within {limit:.0f} s" if isinstance(e, FutureTimeout) else "lost the worker"
                    log.warning("math_accuracy: %d completions %s: they score %s; a fresh worker goes on",
                                size, why, failed)
                    self.close()
                    out += [failed] * size
        return out


THINK_THEN_ANSWER = r"^\s*<think>.*?</think>\s*\S.*$"


class FormatReward:
    """1.0 when the completion matches `pattern` (a regular expression, whole completion, dot matches
    newlines), else 0.0."""

    __name__ = "format"

    def __init__(self, pattern: str = THINK_THEN_ANSWER):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"format: pattern {pattern!r} is not a regular expression: {e}") from None

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
        return [1.0 if self.regex.fullmatch(c) else 0.0 for c in completions]


class OverlongPenalty:
    """DAPO's soft overlong punishment, in completion tokens: 0 up to `max_length - buffer`, then linear to
    -1 at `max_length` (and below it for longer completions, which a length budget prevents)."""

    __name__ = "overlong_penalty"

    def __init__(self, max_length: int, buffer: int | None = None):
        buffer = max(1, max_length // 4) if buffer is None else buffer
        if not 0 < buffer <= max_length:
            raise ValueError(f"overlong_penalty: need 0 < buffer <= max_length (got {buffer}, {max_length})")
        self.max_length, self.buffer = max_length, buffer

    def __call__(self, prompts: list[str], completions: list[str], completion_lengths: list[int],
                 **_: Any) -> list[float | None]:
        start = self.max_length - self.buffer
        return [min(0.0, (start - n) / self.buffer) for n in completion_lengths]
