"""Property-based: random malformed data never crashes the validator, and quarantine never loses a row."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpo_steps.data.files import DataFileError, read_jsonl
from grpo_steps.data.tokenizer import save_tokenizer
from grpo_steps.platform.config import load_config
from grpo_steps.stages.validate import FAILURE_COLUMNS, FILES, DataValidationError, check_rows, partition, validate

P = load_config(None).paths  # the catalog, default layout (tests run in a project dir)

VCFG = load_config(None).validate_

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["train", "eval", "test", "dev", "1", "-2.5", "1e3", "", " ", "3+4=", "7", "x" * 50]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=3), scalars, max_size=2))
keys = st.one_of(st.sampled_from(["id", "prompt", "answer", "split", "chosen", "rejected", "extra"]),
                 st.text(max_size=6))
random_rows = st.dictionaries(keys, values, max_size=7)
# Rows shaped like the contract with random values, so the content checks run too (and sometimes pass).
prompt_rows = st.fixed_dictionaries({"id": values, "prompt": values, "answer": values, "split": values},
                                    optional={"extra": values})
pair_rows = st.fixed_dictionaries({"id": values, "prompt": values, "chosen": values, "rejected": values},
                                  optional={"split": values})
file_rows = st.lists(st.one_of(random_rows, prompt_rows, pair_rows), max_size=5)
datasets = st.fixed_dictionaries({name: file_rows for name in FILES})


def count_chars(texts: list[str]) -> list[int]:
    return [len(t) for t in texts]


@pytest.mark.slow  # ~15-30 s on 2 cores
@settings(max_examples=35, deadline=None)
@given(datasets)
def test_check_rows_never_crashes_and_partition_conserves(rows):
    table = check_rows(rows, VCFG, count_chars)
    assert isinstance(table, pd.DataFrame) and list(table.columns) == FAILURE_COLUMNS
    for rec in table.to_dict(orient="records"):
        name = rec["file"].removesuffix(".jsonl")
        assert name in FILES and isinstance(rec["check"], str)
        assert rec["row"] is None or 0 <= rec["row"] < len(rows[name])
    passing, quarantined = partition(rows, table)
    for name in FILES:
        assert len(passing[name]) + len(quarantined[name]) == len(rows[name])
        assert all(q["reasons"] for q in quarantined[name])
    if table.empty:
        assert all(passing[name] == rows[name] for name in FILES)


# Now and then one unreadable line in one file (a DataFileError, the other allowed outcome).
corruptions = st.sampled_from([None] * 5 + [("train", '{"id": '), ("preferences_eval", "[1, 2]"), ("test", "nope")])


@pytest.fixture
def stage_cfg(workdir, tmp_path_factory):
    """The validate stage's computation without its MLflow run (each example would otherwise open one)."""
    models = tmp_path_factory.mktemp("models")
    save_tokenizer(models / "tokenizer")
    return lambda policy: load_config("params.yaml", [f"paths.models_dir={models}", f"validate.on_failure={policy}"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=datasets, corrupt=corruptions, policy=st.sampled_from(["fail", "quarantine"]))
def test_validate_stage_raises_only_data_errors(stage_cfg, files, corrupt, policy):
    prepared = P.prepared()
    prepared.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if corrupt and corrupt[0] == name:
            text += corrupt[1] + "\n"
        (prepared / f"{name}.jsonl").write_text(text, encoding="utf-8")
    before = {p.name: p.read_bytes() for p in P.validated().glob("*")}
    try:
        validate(stage_cfg(policy)).unwrap()  # the bare stage function: a StageResult
    except (DataValidationError, DataFileError):
        assert {p.name: p.read_bytes() for p in P.validated().glob("*")} == before
        return
    for name in FILES:  # passed, or quarantined: every row is in exactly one place
        n_in = len(read_jsonl(prepared / f"{name}.jsonl"))
        q = P.quarantine() / f"{name}.jsonl"
        assert n_in == len(read_jsonl(P.validated_file(name))) + (len(read_jsonl(q)) if q.exists() else 0)
