"""Your own datasets in the prepared layout: JSONL, Parquet, CSV, GSM8K-style files and preference pairs.

Reading is strict about structure and lenient about content. A file that cannot be read as a table (missing,
empty, not UTF-8, a malformed JSON line, a CSV row with the wrong number of fields, a required column absent,
a GSM8K answer without `#### <number>`) raises DataFileError naming the file and the line or row. A row whose
*content* is wrong (an empty prompt, an answer that is not a number) is passed on unchanged for the validate
stage to report: ingestion never drops a row.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from grpo_steps.data.files import DataFileError, parse_jsonl
from grpo_steps.data.settings import PREFERENCE_FILES, SPLITS, DataConfig
from grpo_steps.data.task import wrong_answer

log = logging.getLogger(__name__)

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
PROMPT_FILES = SPLITS
_SHOWN = 10  # bad rows named in one error message

Record = tuple[str, dict[str, Any]]  # ("line 7" or "row 7", the row)


def file_format(path: Path, override: str = "auto") -> str:
    """jsonl, parquet or csv: `override` unless it is auto (or gsm8k, a content format), else the extension."""
    if override in ("jsonl", "parquet", "csv"):
        return override
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataFileError(
            f"{path}: cannot tell the format from the extension {path.suffix!r} "
            f"(expected one of {', '.join(EXTENSIONS)}, or set data.format)"
        )
    return fmt


def read_records(path: str | Path, fmt: str = "auto") -> tuple[list[str], list[Record]]:
    """Every row of a JSONL, CSV or Parquet file, with its column names and its place in the file."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path.resolve()}")
    fmt = file_format(path, fmt)
    if path.stat().st_size == 0:
        raise DataFileError(f"{path}: empty file")
    if fmt == "parquet":
        columns, records = _read_parquet(path)
    else:
        text = _decode(path)
        columns, records = _read_jsonl(path, text) if fmt == "jsonl" else _read_csv(path, text)
    if not records:
        raise DataFileError(f"{path}: no rows")
    return columns, records


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    body = raw[3:] if bom else raw
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body[: e.start].count(b"\n") + 1
        bad = body[e.start : e.start + 4]
        raise DataFileError(
            f"{path}: line {line}: not UTF-8 text (byte {e.start + 3 * bom}: {bad!r}); re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataFileError(f"{path}: empty file (only whitespace)")
    return text


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[Record]]:
    records: list[Record] = []
    columns: dict[str, None] = {}
    for lineno, row in parse_jsonl(path, text):
        columns.update(dict.fromkeys(row))
        records.append((f"line {lineno}", row))
    return list(columns), records


def _read_csv(path: Path, text: str) -> tuple[list[str], list[Record]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records: list[Record] = []
    try:
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if header is None:
                header = [h.strip() for h in fields]
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes:
                    raise DataFileError(f"{path}: line {reader.line_num}: repeated column name(s) {dupes}")
                continue
            if len(fields) != len(header):
                raise DataFileError(
                    f"{path}: line {reader.line_num}: expected {len(header)} fields (as in the header), "
                    f"got {len(fields)}"
                )
            records.append((f"line {reader.line_num}", dict(zip(header, fields, strict=True))))
    except csv.Error as e:
        raise DataFileError(f"{path}: line {reader.line_num}: not valid CSV: {e}") from None
    return header or [], records


def _read_parquet(path: Path) -> tuple[list[str], list[Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataFileError(f"{path}: not a readable Parquet file: {e}") from None
    return list(table.column_names), [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _require(path: Path, columns: list[str], required: list[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataFileError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; the file has {columns} "
            "(set data.prompt_column / answer_column / chosen_column / rejected_column to map yours)"
        )


def _text(path: Path, where: str, column: str, value: Any) -> Any:
    """Bytes (a Parquet binary column) decoded as UTF-8; everything else as it is."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFileError(f"{path}: {where}: column {column!r}: not UTF-8 text (byte {e.start})") from None
    return value


def _number_text(value: Any) -> Any:
    """A numeric answer or completion as the string the contract expects; anything else unchanged."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return value.strip()
    return value


def gsm8k_answer(value: Any) -> str | None:
    """The final answer of a GSM8K solution: the text after the last `####`, commas removed; None if absent."""
    if not isinstance(value, str) or "####" not in value:
        return None
    number = value.rsplit("####", 1)[1].strip().replace(",", "")
    return number or None


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_demonstration(solution: str) -> str:
    """A GSM8K solution as the cold-start demonstration: the reasoning, then `#### <answer>`, without the
    dataset's calculator annotations (`<<48/2=24>>`)."""
    return _CALCULATOR.sub("", solution).strip()


def _bad_rows_error(path: Path, what: str, where: list[str]) -> DataFileError:
    shown = ", ".join(where[:_SHOWN]) + (f" and {len(where) - _SHOWN} more" if len(where) > _SHOWN else "")
    return DataFileError(f"{path}: {len(where)} row(s) {what}: {shown}")


# Each row read from a file carries where it came from ("<path> line 151"), under this key, until prepare sets
# it aside (`take_sources`): validation names the user's own file and line, not the prepared row.
SOURCE = "_source"


def take_sources(files: dict[str, list[dict[str, Any]]]) -> dict[str, list[str | None]]:
    """Remove each row's source from `files` (in place); returns them per file, in row order (None: derived)."""
    return {name: [row.pop(SOURCE, None) for row in rows] for name, rows in files.items()}


def load_prompts(path: str | Path, data: DataConfig) -> list[dict[str, Any]]:
    """Rows {prompt, answer} (plus `id` when data.id_column is set) in file order."""
    path = Path(path)
    columns, records = read_records(path, data.format)
    prompt_col = data.prompt_column or ("question" if data.is_gsm8k else "prompt")
    required = [prompt_col, data.answer_column] + ([data.id_column] if data.id_column else [])
    _require(path, columns, required)
    rows, no_marker = [], []
    demo_col = data.demonstration_column if data.demonstration_column in columns else None
    for where, rec in records:
        solution = _text(path, where, data.answer_column, rec.get(data.answer_column))
        demonstration = None
        if data.is_gsm8k:
            answer = gsm8k_answer(solution)
            if answer is None:
                no_marker.append(where)
                continue
            demonstration = gsm8k_demonstration(solution)
        else:
            answer = _number_text(solution)
        if demo_col:
            demonstration = _completion(_text(path, where, demo_col, rec.get(demo_col)))
        row = {"prompt": _text(path, where, prompt_col, rec.get(prompt_col)), "answer": answer}
        if demonstration is not None:
            row["demonstration"] = demonstration
        if data.id_column:
            row["id"] = _id(_text(path, where, data.id_column, rec.get(data.id_column)))
        row[SOURCE] = f"{path} {where}"
        rows.append(row)
    if no_marker:
        raise _bad_rows_error(path, f"with a GSM8K answer ({data.answer_column!r}) not ending in '#### <number>'",
                              no_marker)
    return rows


def load_preferences(path: str | Path, data: DataConfig) -> list[dict[str, Any]]:
    """Rows {prompt, chosen, rejected} (plus `id` when data.id_column is set) in file order."""
    path = Path(path)
    columns, records = read_records(path, data.format)
    prompt_col = data.prompt_column or "prompt"
    cols = {"prompt": prompt_col, "chosen": data.chosen_column, "rejected": data.rejected_column}
    _require(path, columns, list(cols.values()) + ([data.id_column] if data.id_column else []))
    rows = []
    for where, rec in records:
        row = {key: _text(path, where, col, rec.get(col)) for key, col in cols.items()}
        row["chosen"], row["rejected"] = _completion(row["chosen"]), _completion(row["rejected"])
        if data.id_column:
            row["id"] = _id(_text(path, where, data.id_column, rec.get(data.id_column)))
        row[SOURCE] = f"{path} {where}"
        rows.append(row)
    return rows


def _completion(value: Any) -> Any:
    return value if isinstance(value, str) else _number_text(value)


def _id(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, default=str)


def split_off(
    rows: list[dict[str, Any]], fractions: dict[str, float], seed: int
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Deterministically move a share of the distinct prompts (with all their rows) into each named part.

    Splitting by distinct prompt keeps repeats of one prompt together, so a split-off never creates
    train/held-out leakage. Every row lands in exactly one part; file order is kept within each part.
    """
    keys = list(dict.fromkeys(_prompt_key(r.get("prompt")) for r in rows))
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    assign: dict[str, str] = {}
    start = 0
    for name, frac in fractions.items():
        n = round(frac * len(order))
        if frac > 0 and n == 0 and len(order) - start > 1:
            n = 1
        for key in order[start : start + n]:
            assign[key] = name
        start += n
    rest: list[dict[str, Any]] = []
    parts: dict[str, list[dict[str, Any]]] = {name: [] for name in fractions}
    for r in rows:
        name = assign.get(_prompt_key(r.get("prompt")))
        (parts[name] if name else rest).append(r)
    return rest, parts


def near_miss(rng: random.Random, answer: str) -> str | None:
    """A wrong but plausible answer for a numeric `answer`; None when the answer is not a number."""
    try:
        int(answer)
        return wrong_answer(rng, answer)
    except ValueError:
        pass
    try:
        value = Decimal(answer)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return str(value + rng.choice([-10, -2, -1, 1, 2, 10]))


def derive_preferences(seed: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One pair per distinct prompt with a numeric answer: the right answer preferred over a near miss.

    With a worked solution ending in `#### <answer>` (GSM8K), the pair is that solution against the same
    solution ending in the near miss, so the reward model learns to check the final answer of a completion
    in the policy's own format.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs = []
    for r in rows:
        prompt, answer = r.get("prompt"), r.get("answer")
        key = _prompt_key(prompt)
        if not _is_prompt(prompt) or not isinstance(answer, str) or key in seen:
            continue
        rejected = near_miss(rng, answer)
        if rejected is None:
            continue
        seen.add(key)
        chosen, demo = answer, r.get("demonstration")
        if isinstance(demo, str) and "####" in demo and gsm8k_answer(demo) == answer:
            chosen, rejected = demo, demo.rsplit("####", 1)[0] + f"#### {rejected}"
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def _is_prompt(prompt: Any) -> bool:
    """A non-empty string, or a non-empty conversation (list of messages)."""
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return isinstance(prompt, list) and bool(prompt)


def _with_ids(name: str, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows):
        row = {"id": r["id"] if "id" in r else f"{name}-{i:06d}"}
        row.update({f: r.get(f) for f in fields})
        if name in PROMPT_FILES:
            row["split"] = name
        if SOURCE in r:
            row[SOURCE] = r[SOURCE]
        out.append(row)
    return out


def ingest(data: DataConfig, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The five prepared files' rows from data.* paths: ids and split labels added, nothing dropped; missing
    splits are split off by `seed`."""
    if data.train is None:  # DataConfig guarantees it for source 'files'
        raise DataFileError("data.source is 'files' but data.train is not set")
    splits = {"train": load_prompts(data.train, data)}
    missing = {}
    for name in ("eval", "test"):
        path = getattr(data, name)
        if path is None:
            missing[name] = getattr(data, f"{name}_fraction")
        else:
            splits[name] = load_prompts(path, data)
    if missing:
        splits["train"], parts = split_off(splits["train"], missing, seed)
        splits.update(parts)
        log.info("split %s off %s by seed %d", {k: len(v) for k, v in parts.items()}, data.train, seed)

    if data.preferences_train is not None:
        prefs = {"preferences_train": load_preferences(data.preferences_train, data)}
        if data.preferences_eval is not None:
            prefs["preferences_eval"] = load_preferences(data.preferences_eval, data)
        else:
            prefs["preferences_train"], parts = split_off(
                prefs["preferences_train"], {"preferences_eval": data.preferences_eval_fraction}, seed + 1
            )
            prefs.update(parts)
    else:
        # No preference file: the right answer preferred over a near miss, from train and eval prompts only
        # (the test split stays unseen by every model).
        prefs = {
            "preferences_train": derive_preferences(seed, splits["train"]),
            "preferences_eval": derive_preferences(seed + 7, splits["eval"]),
        }
        log.info("no preference file: derived %s pairs from the train and eval prompts",
                 {k: len(v) for k, v in prefs.items()})

    # The worked solutions are the cold start's demonstrations: train only (held-out rows are judged by answer).
    out = {name: _with_ids(name, splits[name], ("prompt", "answer")) for name in PROMPT_FILES}
    for row, src in zip(out["train"], splits["train"], strict=True):
        if "demonstration" in src:
            row["demonstration"] = src["demonstration"]
    out.update({name: _with_ids(name, prefs[name], ("prompt", "chosen", "rejected")) for name in PREFERENCE_FILES})
    return out
