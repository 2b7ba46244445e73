"""The data layer's settings, declared once: the `task` and `data` sections of params.yaml (type, default, doc),
and the names of the data files every stage reads and writes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from grpo_steps.data.task import REJECTED_KINDS
from grpo_steps.grpo.settings import Settings

# The data files every stage reads and writes, by name (data/prepared/<name>.jsonl, data/validated/<name>.jsonl).
SPLITS = ("train", "eval", "test")
PREFERENCE_FILES = ("preferences_train", "preferences_eval")
DATA_FILES = (*SPLITS, *PREFERENCE_FILES)


# Beside the prepared files of `data.source: files`: where each row came from, per file in row order.
SOURCES_FILE = "sources.json"


def data_file_name(name: str) -> str:
    if name not in DATA_FILES:
        raise ValueError(f"unknown data file {name!r} (one of {', '.join(DATA_FILES)})")
    return f"{name}.jsonl"


class TaskConfig(Settings):
    """The embedded synthetic task: arithmetic prompts like `37+48=` with an exact integer answer (or, in the
    reasoning format, questions answered with their working)."""

    n_train: int = Field(1800, ge=1, description="training prompts (SFT demonstrations and GRPO prompts)")
    n_eval: int = Field(200, ge=1, description="validation prompts (reward-model gate, monitoring)")
    n_test: int = Field(400, ge=1, description="held-out prompts for the final evaluation")
    n_preference_pairs: int = Field(6000, ge=1, description="(prompt, chosen, rejected) pairs for the reward model")
    max_operand: int = Field(49, ge=1, description="operands are drawn from [0, max_operand]")
    operations: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+"],
                                                     description="the operations problems use")
    rejected_mix: dict[Literal["slip", "offset", "digit", "random"], float] = Field(
        default_factory=lambda: dict(REJECTED_KINDS),
        description="shares of the kinds of wrong answer in the preference pairs' `rejected`: the weak teacher's "
        "slip (where one exists), a small offset (+-1, 2, 10), one digit changed, a random number",
    )
    demo_error_rate: float = Field(
        0.6, ge=0, le=1,
        description="share of slip-prone train problems whose cold-start demonstration is a weak teacher's "
        "systematic slip (no carry / no borrow); GRPO's verifier reward is always the true answer",
    )
    format: Literal["answer", "reasoning"] = Field(
        "answer", description="answer: `37+48=` -> `85`; reasoning: `What is 37 + 48?` -> the column-by-column "
        "working, then `#### 85` (judged by math_accuracy), the shape of GSM8K",
    )
    working: Literal["terse", "verbose"] = Field(
        "terse", description="the reasoning format's working: terse (`7 + 8 = 15, 3 + 4 + 1 = 8. #### 85`) or "
        "verbose (each column of an addition a sentence: its place, the digit written, the carry, the digits so "
        "far; about 20-25 tokens a column, the long completions of configs/reasoning-long-cpu.yaml); subtraction "
        "and multiplication keep one line in either",
    )
    tokenizer: Literal["char", "bpe"] = Field(
        "char", description="the project's tokenizer: characters, or a byte-level BPE trained on the task's text "
        "with a ChatML chat template (as a chat model's)",
    )
    bpe_vocab_size: int = Field(512, ge=64, description="vocabulary of the bpe tokenizer")


    @model_validator(mode="after")
    def _mix_has_weight(self) -> TaskConfig:
        if any(w < 0 for w in self.rejected_mix.values()) or not any(w > 0 for w in self.rejected_mix.values()):
            raise ValueError(f"rejected_mix needs non-negative shares, one above 0 (got {self.rejected_mix})")
        if not any(w > 0 for k, w in self.rejected_mix.items() if k != "slip"):
            raise ValueError("rejected_mix needs a share above 0 for a kind other than slip (not every problem "
                             "has a slip)")
        return self


class DataConfig(Settings):
    """Where prompts and preference pairs come from: the embedded synthetic task or your own files.

    Files are JSONL, Parquet or CSV (format from the extension unless `format` says otherwise). GSM8K-style
    files (`question`, `answer` ending in `#### <number>`) are read with `gsm8k: true` or `format: gsm8k`.
    A prompt is a string or a conversation (a list of {role, content} messages, JSONL or Parquet).
    When only `train` is given, eval and test are split off it by seed; without preference files, pairs are
    derived from the train and eval prompts (the right answer preferred over a near miss).
    """

    source: Literal["synthetic", "files"] = Field("synthetic", description="'files' reads the paths below")
    train: str | None = Field(None, description="prompt file (prompt + answer columns); required for 'files'")
    eval: str | None = Field(None, description="prompt file; unset: split off train by eval_fraction")
    test: str | None = Field(None, description="prompt file; unset: split off train by test_fraction")
    preferences_train: str | None = Field(None, description="(prompt, chosen, rejected) file; unset: derived")
    preferences_eval: str | None = Field(None, description="unset: split off preferences_train, or derived")
    format: Literal["auto", "jsonl", "parquet", "csv", "gsm8k"] = Field(
        "auto", description="file format of every file; auto: from the extension (.jsonl/.parquet/.csv)"
    )
    gsm8k: bool = Field(False, description="prompt files are GSM8K-style: the answer is the number after ####")
    prompt_column: str | None = Field(None, description="unset: 'prompt' ('question' for GSM8K)")
    answer_column: str = Field("answer", description="the prompt files' column of reference answers")
    demonstration_column: str = Field(
        "demonstration", description="a column of worked solutions for the SFT cold start, used when the file "
        "has it (GSM8K: the solution itself, calculator annotations removed, ending in `#### <answer>`)",
    )
    chosen_column: str = Field("chosen", description="the preference files' column of preferred answers")
    rejected_column: str = Field("rejected", description="the preference files' column of rejected answers")
    id_column: str | None = Field(None, description="a column of row ids to keep; unset: ids are generated")
    system_prompt: str | None = Field(
        None, description="a system message put before every prompt (unless a conversation has its own)",
    )
    chat_template: Literal["auto"] | bool = Field(
        "auto", description="render prompts with the policy tokenizer's chat template (add_generation_prompt): "
        "auto = when it has one; true = required; false = plain text (grpo_steps/data/prompts.py)",
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="share of train's distinct prompts split off")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="share of train's distinct prompts split off")
    preferences_eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of preference prompts split off")

    @model_validator(mode="after")
    def _paths_match_source(self) -> DataConfig:
        paths = DATA_FILES
        if self.source == "synthetic":
            given = [p for p in paths if getattr(self, p) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set but source is 'synthetic' (set source: files to use them)")
        elif self.train is None:
            raise ValueError("source 'files' needs a train file")
        if self.preferences_eval is not None and self.preferences_train is None:
            raise ValueError("preferences_eval needs preferences_train")
        if self.eval_fraction + self.test_fraction >= 1:
            raise ValueError("eval_fraction + test_fraction must be below 1")
        return self

    @property
    def is_gsm8k(self) -> bool:
        return self.gsm8k or self.format == "gsm8k"
