"""Reading the project's JSON and JSONL files: every error is a DataFileError that names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpo_steps.errors import UserError


class DataFileError(UserError, ValueError):
    """A data file is missing or malformed; the message names the file and the line."""


def parse_jsonl(path: str | Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `text`, read from `path` (named in errors)."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: line {lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path.resolve()}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    return [row for _, row in parse_jsonl(path, text)]


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"file not found: {path.resolve()}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON: {e}") from None
