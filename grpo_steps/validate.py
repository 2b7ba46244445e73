"""Stage `validate`: every prepared file checked against its pandera schema, lazily, all failures listed.

On failure (policy `fail`) nothing under data/validated is touched and the stage exits non-zero with a
table of every failing (file, column, check, row, value). Policy `quarantine` writes the failing rows with
their reasons to reports/quarantine/ and passes the rest on; nothing is dropped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pandera.pandas as pa

from grpo_steps.config import Config
from grpo_steps.io import read_jsonl, write_json, write_jsonl
from grpo_steps.modeling import load_tokenizer
from grpo_steps.prepare import SPLITS
from grpo_steps.schemas import PreferenceSchema, prompt_schema

log = logging.getLogger(__name__)

PREFERENCE_FILES = ("preferences_train", "preferences_eval")


class DataValidationError(ValueError):
    """Prepared data broke its contract; `failures` holds one row per failing check."""

    def __init__(self, message: str, failures: pd.DataFrame):
        super().__init__(message)
        self.failures = failures


def _failure_table(err: pa.errors.SchemaErrors, file: str) -> pd.DataFrame:
    fc = err.failure_cases.copy()
    fc.insert(0, "file", file)
    return fc[["file", "column", "check", "index", "failure_case"]].rename(
        columns={"index": "row", "failure_case": "value"}
    )


def _check(df: pd.DataFrame, schema, file: str) -> pd.DataFrame:
    try:
        schema.validate(df, lazy=True)
        return pd.DataFrame(columns=["file", "column", "check", "row", "value"])
    except pa.errors.SchemaErrors as e:
        return _failure_table(e, file)


def _leakage(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """A prompt in train and also in eval or test inflates held-out accuracy: flag the held-out copy."""
    train_prompts = set(frames["train"]["prompt"])
    rows = []
    for split in ("eval", "test"):
        df = frames[split]
        for idx in df.index[df["prompt"].isin(train_prompts)]:
            rows.append({"file": f"{split}.jsonl", "column": "prompt", "check": "not in train split",
                         "row": idx, "value": df.at[idx, "prompt"]})
    return pd.DataFrame(rows, columns=["file", "column", "check", "row", "value"])


def validate(cfg: Config) -> dict[str, int]:
    src, dst = cfg.paths.prepared(), cfg.paths.validated()
    tok = load_tokenizer(cfg.paths.tokenizer())
    schema = prompt_schema(cfg.validate_.max_prompt_tokens)
    frames: dict[str, pd.DataFrame] = {}
    failures = []
    for name in SPLITS:
        df = pd.DataFrame(read_jsonl(src / f"{name}.jsonl"))
        if "prompt" in df:
            df["prompt_tokens"] = [len(tok(str(p), add_special_tokens=False)["input_ids"]) for p in df["prompt"]]
        frames[name] = df
        failures.append(_check(df, schema, f"{name}.jsonl"))
    for name in PREFERENCE_FILES:
        df = pd.DataFrame(read_jsonl(src / f"{name}.jsonl"))
        frames[name] = df
        failures.append(_check(df, PreferenceSchema, f"{name}.jsonl"))
    if all("prompt" in frames[s] for s in SPLITS):
        failures.append(_leakage(frames))
    table = pd.concat([f for f in failures if len(f)], ignore_index=True) if any(len(f) for f in failures) else None

    report_path = cfg.paths.reports() / "validation.json"
    counts = {name: len(df) for name, df in frames.items()}
    report = {"rows": counts, "failures": 0 if table is None else len(table), "policy": cfg.validate_.on_failure}
    if table is not None:
        report["failure_cases"] = table.astype(str).to_dict(orient="records")
    write_json(report_path, report)

    if table is not None and cfg.validate_.on_failure == "fail":
        raise DataValidationError(
            f"data validation failed: {len(table)} failure(s) in {src} (report: {report_path})\n"
            + table.to_string(index=False, max_rows=50),
            table,
        )
    quarantined = 0
    if table is not None:
        quarantined = _quarantine(frames, table, cfg.paths.reports() / "quarantine")
    for name, df in frames.items():
        bad = set() if table is None else set(table.loc[table["file"] == f"{name}.jsonl", "row"].dropna())
        keep = df.drop(index=[i for i in df.index if i in bad]).drop(columns=["prompt_tokens"], errors="ignore")
        write_jsonl(dst / f"{name}.jsonl", keep.to_dict(orient="records"))
    log.info("validated %s (%d quarantined) into %s", counts, quarantined, dst)
    return {**counts, "quarantined": quarantined}


def _quarantine(frames: dict[str, pd.DataFrame], table: pd.DataFrame, out: Path) -> int:
    n = 0
    for name, df in frames.items():
        hits = table[table["file"] == f"{name}.jsonl"].dropna(subset=["row"])
        if hits.empty:
            continue
        reasons = hits.groupby("row")["check"].apply(lambda s: "; ".join(sorted(set(map(str, s)))))
        rows = [{**df.loc[i].drop(labels=["prompt_tokens"], errors="ignore").to_dict(), "reasons": r}
                for i, r in reasons.items() if i in df.index]
        write_jsonl(out / f"{name}.jsonl", rows)
        n += len(rows)
    return n
