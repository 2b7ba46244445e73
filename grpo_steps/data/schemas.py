"""Data contracts: pandera schemas for prompt datasets and preference pairs.

Every column is typed `object` and every check is element-wise and type-safe, so one malformed value (a
number, a list, None) fails its own row under a named check instead of failing the whole column or crashing
the validator. A value that is not a string fails `is_string` only; content checks (`non_empty`,
`answer_is_number`, token bounds, ...) judge strings and pass everything else, so each defect is reported once.

The check names below are the `check` column of the validation report; CHECK_DESCRIPTIONS explains them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

VALID_SPLITS = ("train", "eval", "test")
ANSWER_PATTERN = r"^-?\d+(\.\d+)?$"
_ANSWER = re.compile(ANSWER_PATTERN)

PROMPT_COLUMNS = ("id", "prompt", "answer", "split", "demonstration")
PREFERENCE_COLUMNS = ("id", "prompt", "chosen", "rejected", "kind")

# Turns a list of strings into their token counts (the pipeline's tokenizer, without special tokens).
TokenCounter = Callable[[list[str]], list[int]]
# Turns prompts (strings or conversations) into the token counts of their rendered text (grpo_steps/data/prompts.py).
PromptTokenCounter = Callable[[list[Any]], list[int]]
ROLES = ("system", "user", "assistant")

CHECK_DESCRIPTIONS = {
    "missing_column": "a required column is absent from the file",
    "unexpected_column": "the row has a field the contract does not allow",
    "not_nullable": "the value is missing (null)",
    "is_string": "the value is not a string (a prompt may also be a conversation: a list of messages)",
    "is_conversation": f"the prompt is a list, but not of {{role, content}} messages (role {', '.join(ROLES)}; "
    "content a string, one of them not empty)",
    "non_empty": "the string is empty or only whitespace",
    "unique_id": "the id repeats an earlier row's id",
    "answer_is_number": f"the answer does not parse as a number ({ANSWER_PATTERN})",
    "valid_split": f"the split label is not one of {', '.join(VALID_SPLITS)}",
    "split_matches_file": "the split label names another split than the file the row is in",
    "max_prompt_tokens": "the prompt is longer than validate.max_prompt_tokens",
    "max_answer_tokens": "the answer is longer than validate.max_answer_tokens",
    "max_completion_tokens": "the completion is longer than validate.max_completion_tokens",
    "chosen_differs_from_rejected": "chosen and rejected are the same completion",
    "exact_duplicate_row": "the row repeats an earlier row (every field but the id)",
    "duplicate_prompt": "the prompt repeats an earlier row's prompt with a different answer",
    "prompt_not_in_train": "leakage: the held-out prompt also appears in train",
    "prompt_not_in_test": "leakage: the preference prompt appears in the test split",
    "prompt_not_in_preferences_train": "leakage: the held-out preference prompt also appears in preferences_train",
    "at_least_one_row": "the file has no rows",
    "check_error": "a check could not run on this data",
}


class Opaque:
    """A JSON list or object held in a cell: hashable and comparable, never a string, shown as JSON."""

    __slots__ = ("value", "_key")

    def __init__(self, value: Any):
        self.value = value
        self._key = json.dumps(value, sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return self._key


def to_frame(rows: list[dict[str, Any]], columns: Iterable[str]) -> pd.DataFrame:
    """An object-typed frame of the contract's `columns` found in any row (index = position in the file).

    A column no row has is left out (the schema reports it missing); a key absent from one row is None there.
    Keys outside the contract are not in the frame: `unexpected_keys` reports them row by row.
    """
    cols = [c for c in columns if any(c in r for r in rows)] if rows else list(columns)
    data = {c: [_cell(r.get(c)) for r in rows] for c in cols}
    return pd.DataFrame(data, index=pd.RangeIndex(len(rows)), columns=cols, dtype=object)


def unexpected_keys(rows: list[dict[str, Any]], columns: Iterable[str]) -> list[tuple[int, str, Any]]:
    """(row, key, value) for every key of a row that the contract does not have."""
    allowed = set(columns)
    return [(i, k, v) for i, r in enumerate(rows) for k, v in r.items() if k not in allowed]


def _cell(v: Any) -> Any:
    return Opaque(v) if isinstance(v, (list, dict)) else v


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _listed(v: Any) -> list | None:
    """The list held in a cell (a conversation, or something posing as one); None for anything else."""
    return v.value if isinstance(v, Opaque) and isinstance(v.value, list) else None


def is_conversation(v: Any) -> bool:
    """A non-empty list of {role, content} messages with known roles and string contents, one not empty."""
    return (isinstance(v, list) and bool(v)
            and all(isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLES
                    and isinstance(m["content"], str) for m in v)
            and any(m["content"].strip() for m in v))


def _prompt_value(v: Any) -> Any:
    """A prompt as the renderer takes it: the string, or the conversation's list of messages."""
    listed = _listed(v)
    return listed if listed is not None else v


def _mask(s: pd.Series, fn: Callable[[Any], bool]) -> pd.Series:
    return pd.Series([bool(fn(v)) for v in s], index=s.index, dtype=bool)


def _non_empty(s: pd.Series) -> pd.Series:
    return _mask(s, lambda v: not _is_str(v) or bool(v.strip()))


def comparable(v: Any) -> bool:
    """A value duplicate and leakage checks compare: a string, or a well-formed conversation (an `Opaque`,
    equal to another holding the same messages). Anything else is judged by `is_string`/`is_conversation`."""
    return _is_str(v) or is_conversation(_listed(v))


def _first_occurrence(s: pd.Series) -> pd.Series:
    """True for a value's first occurrence (and for values not `comparable`, judged by other checks)."""
    strings = _mask(s, comparable)
    ok = pd.Series(True, index=s.index, dtype=bool)
    ok[strings] = ~s[strings].astype(object).duplicated(keep="first")
    return ok


def _all_strings(df: pd.DataFrame, cols: Iterable[str]) -> pd.Series:
    ok = pd.Series(True, index=df.index, dtype=bool)
    for c in cols:
        ok &= _mask(df[c], comparable)
    return ok


def _exact_duplicates(df: pd.DataFrame, cols: tuple[str, ...]) -> pd.Series:
    """True where the row's `cols` (all `comparable`) repeat an earlier row's."""
    if not set(cols) <= set(df.columns):
        return pd.Series(False, index=df.index, dtype=bool)
    typed = _all_strings(df, cols)
    dup = pd.Series(False, index=df.index, dtype=bool)
    dup[typed] = df.loc[typed, list(cols)].astype(object).duplicated(keep="first")
    return dup


def prompt_tokens_check(limit: int, count_prompt_tokens: PromptTokenCounter) -> pa.Check:
    """Prompts (strings and well-formed conversations) whose rendered text has at most `limit` tokens."""

    def within(s: pd.Series) -> pd.Series:
        prompts = _mask(s, lambda v: _is_str(v) or is_conversation(_listed(v)))
        ok = pd.Series(True, index=s.index, dtype=bool)
        if prompts.any():
            counts = count_prompt_tokens([_prompt_value(v) for v in s[prompts]])
            ok[prompts] = [n <= limit for n in counts]
        return ok

    return pa.Check(within, name="max_prompt_tokens", description=f"at most {limit} tokens, rendered")


def _prompt_checks(schema: pa.DataFrameSchema) -> pa.DataFrameSchema:
    """A prompt may be a conversation: `is_string` passes lists, which `is_conversation` judges instead."""
    column = schema.columns["prompt"]
    kept = [c for c in column.checks if c.name != "is_string"]
    added = [pa.Check(lambda s: _mask(s, lambda v: _is_str(v) or _listed(v) is not None), name="is_string"),
             pa.Check(lambda s: _mask(s, lambda v: _listed(v) is None or is_conversation(_listed(v))),
                      name="is_conversation")]
    return schema.update_column("prompt", checks=[*added, *kept])


def max_tokens_check(name: str, limit: int, count_tokens: TokenCounter) -> pa.Check:
    """Strings of at most `limit` tokens; the check is reported as `name`."""

    def within(s: pd.Series) -> pd.Series:
        strings = _mask(s, _is_str)
        ok = pd.Series(True, index=s.index, dtype=bool)
        if strings.any():
            counts = count_tokens([str(v) for v in s[strings]])
            ok[strings] = [n <= limit for n in counts]
        return ok

    return pa.Check(within, name=name, description=f"at most {limit} tokens")


class PromptSchema(pa.DataFrameModel):
    """One verifiable prompt: string fields, unique ids, an answer that parses as a number, a known split."""

    id: Series[object] = pa.Field(nullable=False)
    prompt: Series[object] = pa.Field(nullable=False)
    answer: Series[object] = pa.Field(nullable=False)
    split: Series[object] = pa.Field(nullable=False)
    # The cold-start SFT target when it differs from the verified answer: a teacher's demonstration, or a worked
    # solution that ends in the answer (GSM8K); bounded by validate.max_completion_tokens.
    demonstration: Optional[Series[object]] = pa.Field(nullable=False)  # noqa: UP045 - pandera needs Optional

    @pa.check("demonstration", name="is_string")
    def demonstration_is_string(cls, s: pd.Series) -> Series[bool]:
        return _mask(s, _is_str)

    @pa.check("demonstration", name="non_empty")
    def demonstration_non_empty(cls, s: pd.Series) -> Series[bool]:
        return _non_empty(s)

    @pa.check("id", "prompt", "answer", "split", name="is_string")
    def is_string(cls, s: pd.Series) -> Series[bool]:
        return _mask(s, _is_str)

    @pa.check("id", "prompt", name="non_empty")
    def non_empty(cls, s: pd.Series) -> Series[bool]:
        return _non_empty(s)

    @pa.check("id", name="unique_id")
    def unique_id(cls, s: pd.Series) -> Series[bool]:
        return _first_occurrence(s)

    @pa.check("answer", name="answer_is_number")
    def answer_is_number(cls, s: pd.Series) -> Series[bool]:
        return _mask(s, lambda v: not _is_str(v) or _ANSWER.match(v) is not None)

    @pa.check("split", name="valid_split")
    def valid_split(cls, s: pd.Series) -> Series[bool]:
        return _mask(s, lambda v: not _is_str(v) or v in VALID_SPLITS)

    @pa.dataframe_check(name="exact_duplicate_row")
    def no_exact_duplicates(cls, df: pd.DataFrame) -> Series[bool]:
        return ~_exact_duplicates(df, ("prompt", "answer", "split"))

    @pa.dataframe_check(name="duplicate_prompt")
    def no_duplicate_prompts(cls, df: pd.DataFrame) -> Series[bool]:
        if "prompt" not in df:
            return pd.Series(True, index=df.index, dtype=bool)
        exact = _exact_duplicates(df, ("prompt", "answer", "split"))
        return _first_occurrence(df["prompt"]) | exact

    class Config:
        strict = True
        coerce = False


class PreferenceSchema(pa.DataFrameModel):
    """One preference pair: two different non-empty completions of a non-empty prompt."""

    id: Series[object] = pa.Field(nullable=False)
    prompt: Series[object] = pa.Field(nullable=False)
    chosen: Series[object] = pa.Field(nullable=False)
    rejected: Series[object] = pa.Field(nullable=False)
    # What kind of wrong answer `rejected` is (the embedded task's `slip`, `offset`, ...): the reward model's
    # held-out accuracy is reported per kind.
    kind: Optional[Series[object]] = pa.Field(nullable=False)  # noqa: UP045 - pandera needs Optional

    @pa.check("kind", name="is_string")
    def kind_is_string(cls, s: pd.Series) -> Series[bool]:
        return _mask(s, _is_str)

    @pa.check("id", "prompt", "chosen", "rejected", name="is_string")
    def is_string(cls, s: pd.Series) -> Series[bool]:
        return _mask(s, _is_str)

    @pa.check("id", "prompt", "chosen", "rejected", name="non_empty")
    def non_empty(cls, s: pd.Series) -> Series[bool]:
        return _non_empty(s)

    @pa.check("id", name="unique_id")
    def unique_id(cls, s: pd.Series) -> Series[bool]:
        return _first_occurrence(s)

    @pa.dataframe_check(name="chosen_differs_from_rejected")
    def chosen_differs(cls, df: pd.DataFrame) -> Series[bool]:
        if not {"chosen", "rejected"} <= set(df.columns):
            return pd.Series(True, index=df.index, dtype=bool)
        typed = _all_strings(df, ("chosen", "rejected"))
        return ~(typed & (df["chosen"] == df["rejected"]).astype(bool))

    class Config:
        strict = True
        coerce = False


def _split_matches(expected: str) -> pa.Check:
    def matches(s: pd.Series) -> pd.Series:
        return _mask(s, lambda v: not _is_str(v) or v not in VALID_SPLITS or v == expected)

    return pa.Check(matches, name="split_matches_file", description=f"split label {expected!r}")


def _add_checks(schema: pa.DataFrameSchema, column: str, *checks: pa.Check) -> pa.DataFrameSchema:
    return schema.update_column(column, checks=[*schema.columns[column].checks, *checks])


def _strings_counter(count_tokens: TokenCounter) -> PromptTokenCounter:
    return lambda prompts: count_tokens([p if isinstance(p, str) else "\n\n".join(m["content"] for m in p)
                                         for p in prompts])


def prompt_schema(
    split: str, max_prompt_tokens: int, max_answer_tokens: int, count_tokens: TokenCounter,
    max_completion_tokens: int | None = None, count_prompt_tokens: PromptTokenCounter | None = None,
) -> pa.DataFrameSchema:
    """PromptSchema for the file of `split`, with the token bounds from params (demonstrations are completions:
    `max_completion_tokens`, default the answer bound; prompts are counted rendered, by `count_prompt_tokens`)."""
    schema = _prompt_checks(PromptSchema.to_schema())
    schema = _add_checks(schema, "split", _split_matches(split))
    schema = _add_checks(schema, "prompt", prompt_tokens_check(
        max_prompt_tokens, count_prompt_tokens or _strings_counter(count_tokens)))
    schema = _add_checks(schema, "demonstration", max_tokens_check(
        "max_completion_tokens", max_completion_tokens or max_answer_tokens, count_tokens))
    return _add_checks(schema, "answer", max_tokens_check("max_answer_tokens", max_answer_tokens, count_tokens))


def _no_duplicate_pairs() -> pa.Check:
    def unique(df: pd.DataFrame) -> pd.Series:
        return ~_exact_duplicates(df, ("prompt", "chosen", "rejected"))

    return pa.Check(unique, name="exact_duplicate_row")


def preference_schema(
    max_prompt_tokens: int, max_completion_tokens: int, count_tokens: TokenCounter, unique_pairs: bool = False,
    count_prompt_tokens: PromptTokenCounter | None = None,
) -> pa.DataFrameSchema:
    """PreferenceSchema with the token bounds from params (and, optionally, no repeated pairs)."""
    schema = _prompt_checks(PreferenceSchema.to_schema())
    schema = _add_checks(schema, "prompt", prompt_tokens_check(
        max_prompt_tokens, count_prompt_tokens or _strings_counter(count_tokens)))
    for col in ("chosen", "rejected"):
        schema = _add_checks(
            schema, col, max_tokens_check("max_completion_tokens", max_completion_tokens, count_tokens)
        )
    if unique_pairs:
        schema = copy.deepcopy(schema)
        schema.checks = [*schema.checks, _no_duplicate_pairs()]
    return schema
