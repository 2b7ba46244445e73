"""Data contracts: pandera schemas for prompt datasets and preference pairs."""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

ANSWER_PATTERN = r"^-?\d+(\.\d+)?$"


class PromptSchema(pa.DataFrameModel):
    """One verifiable prompt: the answer must parse as a number, ids are unique, splits are known."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    prompt: Series[str] = pa.Field(str_length={"min_value": 1})
    answer: Series[str] = pa.Field(str_matches=ANSWER_PATTERN)
    split: Series[str] = pa.Field(isin=["train", "eval", "test"])
    prompt_tokens: Series[int] = pa.Field(ge=1)

    @pa.dataframe_check(error="exact duplicate prompt")
    def no_duplicate_prompts(cls, df: pd.DataFrame) -> Series[bool]:
        return ~df["prompt"].duplicated(keep="first")

    class Config:
        strict = True
        coerce = False


class PreferenceSchema(pa.DataFrameModel):
    """One preference pair: two different non-empty completions of a non-empty prompt."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    prompt: Series[str] = pa.Field(str_length={"min_value": 1})
    chosen: Series[str] = pa.Field(str_length={"min_value": 1})
    rejected: Series[str] = pa.Field(str_length={"min_value": 1})

    @pa.dataframe_check(error="chosen equals rejected")
    def chosen_differs(cls, df: pd.DataFrame) -> Series[bool]:
        return df["chosen"] != df["rejected"]

    class Config:
        strict = True
        coerce = False


def prompt_schema(max_prompt_tokens: int) -> pa.DataFrameSchema:
    """PromptSchema with the token-length bound taken from params."""
    schema = PromptSchema.to_schema()
    return schema.update_column(
        "prompt_tokens", checks=[pa.Check.ge(1), pa.Check.le(max_prompt_tokens, error=f"<= {max_prompt_tokens} tokens")]
    )
