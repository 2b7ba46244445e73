"""Stage `validate`: every prepared file checked against its pandera schema, lazily, all failures listed.

Each failure is one row of a table (file, column, check, row, value), printed, saved as reports/validation.json
and reports/validation.md; the stage's result carries them for its MLflow run and, in a flow, as Prefect
artifacts (the tracking wrapper records both). `row` is the 0-based position of the record in its file
(line row + 1); it is empty for a failure of the whole file (a missing or unexpected column, no rows), which
applies to every row of that file.

Policy `validate.on_failure`:
  fail (default)  the stage raises DataValidationError (exit code 2) and data/validated is not touched.
  quarantine      failing rows go to reports/quarantine/<file>.jsonl with their reasons; the rest to
                  data/validated. Every input row ends up in exactly one of the two: nothing is dropped.
data/validated is written as a whole (a temporary folder swapped in), so it never mixes old and new files.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from grpo_steps.data.files import read_json, read_jsonl
from grpo_steps.data.prompts import render_all
from grpo_steps.data.schemas import (
    CHECK_DESCRIPTIONS,
    PREFERENCE_COLUMNS,
    PROMPT_COLUMNS,
    Opaque,
    PromptTokenCounter,
    TokenCounter,
    comparable,
    preference_schema,
    prompt_schema,
    to_frame,
    unexpected_keys,
)
from grpo_steps.data.settings import DATA_FILES, SOURCES_FILE, SPLITS, data_file_name
from grpo_steps.errors import UserError
from grpo_steps.platform.config import Config, ValidateConfig
from grpo_steps.platform.io import atomic_path, write_json, write_jsonl
from grpo_steps.platform.lineage import data_hashes
from grpo_steps.platform.results import Artifact, Report, StageResult

log = logging.getLogger(__name__)

FILES = DATA_FILES
FAILURE_COLUMNS = ["file", "column", "check", "row", "value"]
# pandera's names for whole-column failures, renamed for the report.
_RENAMED = {"column_in_dataframe": "missing_column", "column_in_schema": "unexpected_column"}
# Checks over several columns of a row: the column named in the report.
_ROW_CHECK_COLUMN = {
    "exact_duplicate_row": "prompt",
    "duplicate_prompt": "prompt",
    "chosen_differs_from_rejected": "chosen",
}
# (file whose rows are flagged, file they must not share a prompt with, check name)
_LEAKAGE_RULES = (
    ("eval", "train", "prompt_not_in_train"),
    ("test", "train", "prompt_not_in_train"),
    ("preferences_train", "test", "prompt_not_in_test"),
    ("preferences_eval", "test", "prompt_not_in_test"),
    ("preferences_eval", "preferences_train", "prompt_not_in_preferences_train"),
)
_SHOWN_IN_ERROR = 50
_SHOWN_IN_MARKDOWN = 1000


class DataValidationError(UserError, ValueError):
    """Prepared data broke its contract; `failures` holds one row per failing check."""

    def __init__(self, message: str, failures: pd.DataFrame, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.failures = failures
        self.report = report or {}


file_name = data_file_name  # data/{prepared,validated}/<name>.jsonl


# --------------------------------------------------------------------------------------------- the checks


def _row_label(index: Any) -> int | None:
    if index is None or (isinstance(index, float) and math.isnan(index)):
        return None
    try:
        return int(index)
    except (TypeError, ValueError):
        return None


def schema_failures(frame: pd.DataFrame, schema: pa.DataFrameSchema, file: str) -> list[dict[str, Any]]:
    """Every failure of `frame` against `schema` (lazy validation), one record per (column, check, row)."""
    try:
        schema.validate(frame, lazy=True)
        return []
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases
    out, seen = [], set()
    for fc in cases.to_dict(orient="records"):
        check = str(fc.get("check"))
        check = _RENAMED.get(check, check)
        row = _row_label(fc.get("index"))
        value = fc.get("failure_case")
        column = fc.get("column")
        if check in ("missing_column", "unexpected_column"):
            column, value, row = value, None, None
        elif fc.get("schema_context") == "DataFrameSchema":
            # A check over whole rows: pandera lists a failing row once per column; report it once.
            if (check, row) in seen:
                continue
            seen.add((check, row))
            column = _ROW_CHECK_COLUMN.get(check, "*")
            if row is not None and column in frame.columns:
                value = frame.at[row, column]
        out.append({"file": file, "column": None if column is None else str(column), "check": check,
                    "row": row, "value": value})
    return out


def leakage_failures(frames: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """A prompt shared with train (or, for preference pairs, with test) inflates held-out scores."""

    def prompts(name: str) -> set[Any]:
        df = frames.get(name)
        if df is None or "prompt" not in df:
            return set()
        return {p for p in df["prompt"] if comparable(p) and (not isinstance(p, str) or p.strip())}

    out = []
    for flagged, other, check in _LEAKAGE_RULES:
        df, seen = frames.get(flagged), prompts(other)
        if df is None or "prompt" not in df or not seen:
            continue
        for row, p in enumerate(df["prompt"]):
            if comparable(p) and p in seen:  # strings and conversations alike
                out.append({"file": file_name(flagged), "column": "prompt", "check": check, "row": row, "value": p})
    return out


def check_rows(
    rows: Mapping[str, list[dict[str, Any]]], vcfg: ValidateConfig, count_tokens: TokenCounter,
    count_prompt_tokens: PromptTokenCounter | None = None,
) -> pd.DataFrame:
    """The failure table of the five prepared files (rows as read), sorted by file and row; empty when clean.
    Prompts are counted by `count_prompt_tokens` (rendered as the policy sees them), else as plain text.

    Never raises for bad content: whatever the rows hold is a row of the table.
    """
    frames: dict[str, pd.DataFrame] = {}
    records: list[dict[str, Any]] = []
    for name in FILES:
        file_rows = list(rows.get(name) or [])
        is_prompt = name in SPLITS
        columns = PROMPT_COLUMNS if is_prompt else PREFERENCE_COLUMNS
        frame = to_frame(file_rows, columns)
        frames[name] = frame
        records.extend({"file": file_name(name), "column": key, "check": "unexpected_column", "row": row,
                        "value": value} for row, key, value in unexpected_keys(file_rows, columns))
        if not file_rows:
            records.append({"file": file_name(name), "column": None, "check": "at_least_one_row", "row": None,
                            "value": None})
        if is_prompt:
            schema = prompt_schema(name, vcfg.max_prompt_tokens, vcfg.max_answer_tokens, count_tokens,
                                   vcfg.completion_tokens(), count_prompt_tokens)
        else:
            schema = preference_schema(vcfg.max_prompt_tokens, vcfg.completion_tokens(), count_tokens,
                                       vcfg.unique_preference_pairs, count_prompt_tokens)
        records.extend(schema_failures(frame, schema, file_name(name)))
    records.extend(leakage_failures(frames))
    order = {file_name(n): i for i, n in enumerate(FILES)}
    records.sort(key=lambda r: (order.get(r["file"], len(order)), -1 if r["row"] is None else r["row"],
                                str(r["column"]), r["check"]))
    return pd.DataFrame(records, columns=FAILURE_COLUMNS, dtype=object)


def partition(
    rows: Mapping[str, list[dict[str, Any]]], table: pd.DataFrame
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Split each file's rows into (passing rows, quarantine records with their reasons).

    A failure without a row (a missing column, no rows) applies to every row of its file. For each file,
    len(rows) == len(passing) + len(quarantined) always holds.
    """
    file_level: dict[str, list[str]] = defaultdict(list)
    by_row: dict[tuple[str, int], list[str]] = defaultdict(list)
    for rec in table.to_dict(orient="records"):
        reason = f"{rec['check']} ({rec['column']})" if rec["column"] else str(rec["check"])
        row = _row_label(rec["row"])
        if row is None:
            file_level[rec["file"]].append(reason)
        else:
            by_row[(rec["file"], row)].append(reason)
    passing: dict[str, list[dict[str, Any]]] = {}
    quarantined: dict[str, list[dict[str, Any]]] = {}
    for name in FILES:
        file = file_name(name)
        passing[name], quarantined[name] = [], []
        for i, row in enumerate(rows.get(name) or []):
            reasons = file_level[file] + by_row.get((file, i), [])
            if reasons:
                quarantined[name].append({"file": file, "row": i, "reasons": reasons, "record": row})
            else:
                passing[name].append(row)
        if len(passing[name]) + len(quarantined[name]) != len(rows.get(name) or []):
            raise RuntimeError(f"{file}: rows lost while partitioning")  # never a silent drop
    return passing, quarantined


# ------------------------------------------------------------------------------------------------ reports


def _plain(value: Any) -> Any:
    """A JSON-safe form of an offending value."""
    if isinstance(value, Opaque):
        return value.value
    if value is None or isinstance(value, (str, bool, int, list, dict)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # numpy scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _show(value: Any, width: int = 60) -> str:
    """A one-line rendering: strings quoted (so '' and ' ' are visible), others as JSON."""
    if isinstance(value, str):
        text = repr(value)
    else:
        text = json.dumps(_plain(value), ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def render_text(table: pd.DataFrame, max_rows: int = _SHOWN_IN_ERROR) -> str:
    """The failure table as fixed-width text."""
    shown = table.head(max_rows).copy()
    shown["column"] = shown["column"].map(lambda c: c if c else "-")
    shown["row"] = shown["row"].map(lambda r: "-" if _row_label(r) is None else str(_row_label(r)))
    shown["value"] = shown["value"].map(_show)
    text = shown.to_string(index=False)
    if len(table) > max_rows:
        text += f"\n... and {len(table) - max_rows} more"
    return text


def origins(cfg: Config, table: pd.DataFrame, limit: int = _SHOWN_IN_ERROR) -> str:
    """Where the failing rows came from in the user's own files ("train.jsonl row 134: data/mine.jsonl line
    151"), one line each, when prepare read them from files (its sources.json); empty otherwise."""
    path = cfg.paths.prepared() / SOURCES_FILE
    if not path.is_file():
        return ""
    sources, lines = read_json(path), []
    for rec in table.drop_duplicates(["file", "row"]).to_dict(orient="records"):
        row = _row_label(rec["row"])
        per_file = sources.get(str(rec["file"]).removesuffix(".jsonl")) or []
        if row is not None and row < len(per_file) and per_file[row]:
            lines.append(f"{rec['file']} row {row}: {per_file[row]}")
    shown = [f"{line}\n" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"... and {len(lines) - limit} more\n")
    return "".join(shown)


# The setting that admits what a check refused.
_LIMITS = {"max_prompt_tokens": "max_prompt_tokens", "max_answer_tokens": "max_answer_tokens",
           "max_completion_tokens": "max_completion_tokens"}


def hints(cfg: Config, table: pd.DataFrame) -> str:
    """What to do about the failures in `table`, one line each: the limit to raise for a length check, and the
    quarantine that sets failing rows aside."""
    lines = ["`row` is the 0-based record of data/prepared/<file>.jsonl (its line is row + 1)."]
    for check in sorted(set(table["check"]) & set(_LIMITS)):
        key = _LIMITS[check]
        now = cfg.validate_.completion_tokens() if key == "max_completion_tokens" else getattr(cfg.validate_, key)
        lines.append(f"{check}: raise validate.{key} (now {now}) to keep these rows, or shorten them")
    if cfg.validate_.on_failure == "fail":
        lines.append("or set validate.on_failure: quarantine to set the failing rows aside (reports/quarantine/) "
                     "and go on with the rest")
    return "\n".join(lines)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict[str, Any], table: pd.DataFrame, max_rows: int = _SHOWN_IN_MARKDOWN) -> str:
    status = report["status"].upper()
    lines = [f"# Data validation: {status} (policy: {report['policy']})", "",
             f"{report['failures']} failure(s) in {report['source']}. {report['outcome']}", "",
             "| file | rows | failing rows | quarantined | validated |", "|---|---:|---:|---:|---:|"]
    for name in FILES:
        lines.append(f"| {file_name(name)} | {report['rows'][name]} | {report['failing_rows'][name]} | "
                     f"{report['quarantined'][name]} | {report['validated'].get(name, '-')} |")
    if len(table):
        lines += ["", "## Failures", "",
                  "`row` is the 0-based record in the file (its line is row + 1); `-` means the whole file.", "",
                  "| file | column | check | row | value |", "|---|---|---|---:|---|"]
        for rec in table.head(max_rows).to_dict(orient="records"):
            row = _row_label(rec["row"])
            lines.append(f"| {rec['file']} | {_md_cell(rec['column'] or '-')} | {rec['check']} | "
                         f"{'-' if row is None else row} | {_md_cell(_show(rec['value'], 80))} |")
        if len(table) > max_rows:
            lines.append(f"\n... and {len(table) - max_rows} more in validation.json")
        lines += ["", "## Checks that failed", "", "| check | failures | meaning |", "|---|---:|---|"]
        for check, n in sorted(report["failures_by_check"].items()):
            lines.append(f"| {check} | {n} | {_md_cell(CHECK_DESCRIPTIONS.get(check, ''))} |")
    if report.get("md5"):
        lines += ["", "## Validated files (md5)", "", "| file | md5 |", "|---|---|"]
        lines += [f"| {f} | `{h}` |" for f, h in sorted(report["md5"].items())]
    return "\n".join(lines) + "\n"


def _tracked(report: dict[str, Any], markdown: str, table: pd.DataFrame, files: list[Path],
             quarantine_dir: Path) -> dict[str, Any]:
    """What the tracking wrapper records of a validation: counts, status and data hashes on the MLflow run,
    the reports as artifacts, and the report (plus a table of failures) for the orchestrator's UI."""
    metrics = {"validation_failures": report["failures"], "quarantined_rows": sum(report["quarantined"].values())}
    metrics.update({f"rows.{name}": n for name, n in report["rows"].items()})
    artifacts = [Artifact(p, "validation") for p in files]
    if metrics["quarantined_rows"] and quarantine_dir.is_dir():
        artifacts.append(Artifact(quarantine_dir, "validation/quarantine"))
    reports = [Report("data-validation", "grpo validate report", markdown=markdown)]
    if len(table):
        rows = [{k: (_show(v, 200) if k == "value" else ("" if v is None else str(v))) for k, v in r.items()}
                for r in table.head(_SHOWN_IN_MARKDOWN).to_dict(orient="records")]
        reports.append(Report("data-validation-failures", f"{len(table)} data validation failure(s)", table=rows))
    return {"metrics": metrics, "tags": {"validation_status": report["status"]},
            "params": {f"data_md5.{f}": h for f, h in report["md5"].items()},
            "artifacts": artifacts, "reports": reports}


# ------------------------------------------------------------------------------------------------ the stage


def _token_counters(cfg: Config) -> tuple[TokenCounter, PromptTokenCounter]:
    """Token counts by the policy's tokenizer (the pretrained policy's, else the project's): of completions and
    answers as they are, of prompts as rendered for the policy (chat template, system prompt)."""
    path = cfg.paths.tokenizer()
    if not cfg.model.pretrained and not path.is_dir():
        raise FileNotFoundError(f"tokenizer not found at {path.resolve()} (run `grpo prepare` first)")
    from grpo_steps.platform.modeling import policy_tokenizer  # deferred: torch, transformers

    tok = policy_tokenizer(cfg)

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def count_prompts(prompts: list[Any]) -> list[int]:
        return count(render_all(tok, prompts, cfg.data.system_prompt, cfg.data.chat_template))

    return count, count_prompts


def _write_folder(path: Path, files: Mapping[str, list[dict[str, Any]]]) -> None:
    """Replace the folder `path` as a whole with one JSONL file per entry."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for name, rows in files.items():
            write_jsonl(tmp / file_name(name), rows)


def validate(cfg: Config) -> StageResult:
    src, dst = cfg.paths.prepared(), cfg.paths.validated()
    quarantine_dir = cfg.paths.quarantine()
    policy = cfg.validate_.on_failure
    rows = {name: read_jsonl(src / file_name(name)) for name in FILES}
    table = check_rows(rows, cfg.validate_, *_token_counters(cfg))
    passing, failing = partition(rows, table)
    # Quarantine sets bad rows aside, but a file it would leave empty cannot feed the next stage: stop instead.
    emptied = [file_name(n) for n in FILES if not passing[n]] if len(table) else []
    failed = bool(len(table)) and (policy == "fail" or bool(emptied))

    report: dict[str, Any] = {
        "status": "failed" if failed else ("quarantined" if len(table) else "passed"),
        "policy": policy,
        "source": str(src),
        "failures": len(table),
        "failures_by_check": dict(Counter(table["check"])),
        "rows": {name: len(rows[name]) for name in FILES},
        "failing_rows": {name: len(failing[name]) for name in FILES},
        "quarantined": {name: 0 if failed else len(failing[name]) for name in FILES},
        "validated": {},
        "md5": {},
        "failure_cases": [{k: (_plain(v) if k == "value" else v) for k, v in r.items()}
                          for r in table.to_dict(orient="records")],
    }
    if failed:
        why = f" (quarantine would leave {', '.join(emptied)} empty)" if policy == "quarantine" else ""
        report["outcome"] = f"Stopped{why}: {dst} left untouched."
    else:
        _write_folder(dst, passing)
        _write_folder(quarantine_dir, {n: q for n, q in failing.items() if q})
        report["validated"] = {name: len(passing[name]) for name in FILES}
        report["md5"] = data_hashes(cfg)
        n_q = sum(report["quarantined"].values())
        report["outcome"] = f"Wrote {dst}" + (f"; {n_q} row(s) quarantined in {quarantine_dir}." if n_q else ".")

    json_path, md_path = cfg.paths.validation_report(), cfg.paths.validation_summary()
    markdown = render_markdown(report, table)
    write_json(json_path, report)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    tracked = _tracked(report, markdown, table, [json_path, md_path], quarantine_dir)
    if failed:
        error = DataValidationError(
            f"data validation failed: {len(table)} failure(s) in {src}. {report['outcome']} "
            f"(report: {md_path})\n{render_text(table)}\n{origins(cfg, table)}{hints(cfg, table)}",
            table,
            report,
        )
        return StageResult(report, error=error, **tracked)
    if len(table):
        log.warning("data validation: %d failure(s), %d row(s) quarantined in %s (report: %s)\n%s",
                    len(table), sum(report["quarantined"].values()), quarantine_dir, md_path, render_text(table))
    log.info("validated %s into %s", report["validated"], dst)
    return StageResult({**report["validated"], "quarantined": sum(report["quarantined"].values())}, **tracked)
