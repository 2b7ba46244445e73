"""The validate stage: one test per defect kind, the fail and quarantine policies, reports, MLflow and Prefect."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from grpo_steps.data.files import read_jsonl
from grpo_steps.data.tokenizer import save_tokenizer
from grpo_steps.platform.config import load_config
from grpo_steps.platform.lineage import file_md5
from grpo_steps.stages.validate import FAILURE_COLUMNS, FILES, DataValidationError, check_rows, partition
from tests.support.stages import validate

P = load_config(None).paths  # the catalog, default layout (tests run in a project dir)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One MLflow store for every data test: creating a SQLite store costs seconds."""
    d = tmp_path_factory.getbasetemp() / "data-tests-mlflow"
    d.mkdir(exist_ok=True)
    return f"sqlite:///{d}/mlflow.db"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    save_tokenizer(d / "tokenizer")
    return d


@pytest.fixture
def make_cfg(workdir, mlflow_uri, models_dir):
    def make(*overrides):
        return load_config("params.yaml", [f"tracking.tracking_uri={mlflow_uri}", f"paths.models_dir={models_dir}",
                                           *overrides])

    return make


def clean_rows() -> dict[str, list[dict]]:
    """A small dataset that passes every check."""

    def prompts(split, n, op):
        return [{"id": f"{split}-{i}", "prompt": f"{i}{op}{i + 3}=", "answer": str(eval(f"{i}{op}{i + 3}")),
                 "split": split} for i in range(n)]

    rows = {"train": prompts("train", 8, "+"), "eval": prompts("eval", 3, "-"), "test": prompts("test", 4, "*")}
    rows["preferences_train"] = [{"id": f"pt-{i}", "prompt": r["prompt"], "chosen": r["answer"],
                                  "rejected": str(int(r["answer"]) + 1)} for i, r in enumerate(rows["train"][:4])]
    rows["preferences_eval"] = [{"id": f"pe-{i}", "prompt": r["prompt"], "chosen": r["answer"],
                                 "rejected": str(int(r["answer"]) - 1)} for i, r in enumerate(rows["eval"][:2])]
    return rows


def write_prepared(rows: dict[str, list[dict]], folder: str | Path | None = None) -> None:
    folder = Path(folder or P.prepared())
    folder.mkdir(parents=True, exist_ok=True)
    for name, file_rows in rows.items():
        Path(folder, f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in file_rows))


def snapshot(folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def _set(file, row, **fields):
    def mutate(rows):
        rows[file][row].update(fields)
    return mutate


def _drop_column(file, column):
    def mutate(rows):
        for r in rows[file]:
            del r[column]
    return mutate


def _append(file, source_row, **fields):
    def mutate(rows):
        rows[file].append({**rows[file][source_row], **fields})
    return mutate


def _copy_prompt(dst, dst_row, src, src_row):
    def mutate(rows):
        rows[dst][dst_row]["prompt"] = rows[src][src_row]["prompt"]
    return mutate


def _empty(file):
    def mutate(rows):
        rows[file] = []
    return mutate


# (defect, mutation, expected failure: file, column, check, row)
DEFECTS = [
    ("empty prompt", _set("train", 2, prompt=""), ("train.jsonl", "prompt", "non_empty", 2)),
    ("blank prompt", _set("test", 1, prompt="   "), ("test.jsonl", "prompt", "non_empty", 1)),
    ("duplicate id", _set("train", 5, id="train-1"), ("train.jsonl", "id", "unique_id", 5)),
    ("unparseable answer", _set("train", 4, answer="four"), ("train.jsonl", "answer", "answer_is_number", 4)),
    ("bad split label", _set("eval", 1, split="validation"), ("eval.jsonl", "split", "valid_split", 1)),
    ("wrong split for file", _set("test", 2, split="train"), ("test.jsonl", "split", "split_matches_file", 2)),
    ("prompt too long", _set("train", 6, prompt="1+" * 20 + "="), ("train.jsonl", "prompt", "max_prompt_tokens", 6)),
    ("answer too long", _set("train", 7, answer="1234567890"), ("train.jsonl", "answer", "max_answer_tokens", 7)),
    ("chosen == rejected", _set("preferences_train", 1, rejected="5"),
     ("preferences_train.jsonl", "chosen", "chosen_differs_from_rejected", 1)),
    ("empty chosen", _set("preferences_eval", 0, chosen=""), ("preferences_eval.jsonl", "chosen", "non_empty", 0)),
    ("completion too long", _set("preferences_train", 2, rejected="9" * 9),
     ("preferences_train.jsonl", "rejected", "max_completion_tokens", 2)),
    ("train/test leakage", _copy_prompt("test", 0, "train", 4), ("test.jsonl", "prompt", "prompt_not_in_train", 0)),
    ("train/eval leakage", _copy_prompt("eval", 2, "train", 5), ("eval.jsonl", "prompt", "prompt_not_in_train", 2)),
    ("preference pair on a test prompt", _copy_prompt("preferences_train", 3, "test", 3),
     ("preferences_train.jsonl", "prompt", "prompt_not_in_test", 3)),
    ("exact duplicate row", _append("train", 1, id="train-dup"), ("train.jsonl", "prompt", "exact_duplicate_row", 8)),
    ("duplicate prompt, other answer", _append("train", 1, id="train-dup2", answer="99"),
     ("train.jsonl", "prompt", "duplicate_prompt", 8)),
    ("missing column", _drop_column("eval", "answer"), ("eval.jsonl", "answer", "missing_column", None)),
    ("unexpected column", _set("train", 0, note="x"), ("train.jsonl", "note", "unexpected_column", 0)),
    ("null answer", _set("train", 3, answer=None), ("train.jsonl", "answer", "not_nullable", 3)),
    ("number instead of string", _set("train", 3, answer=7), ("train.jsonl", "answer", "is_string", 3)),
    # a list is a conversation or nothing: ["3-6="] holds no {role, content} messages
    ("list as prompt", _set("eval", 0, prompt=["3-6="]), ("eval.jsonl", "prompt", "is_conversation", 0)),
    ("dict as prompt", _set("eval", 0, prompt={"text": "3-6="}), ("eval.jsonl", "prompt", "is_string", 0)),
    ("empty file", _empty("preferences_eval"), ("preferences_eval.jsonl", None, "at_least_one_row", None)),
]


def test_clean_rows_are_clean(make_cfg):
    cfg = make_cfg()
    assert check_rows(clean_rows(), cfg.validate_, lambda texts: [len(t) for t in texts]).empty


@pytest.mark.parametrize("mutate, expected", [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_each_defect_is_reported_once_with_file_column_check_row(make_cfg, mutate, expected):
    rows = clean_rows()
    mutate(rows)
    write_prepared(rows)
    with pytest.raises(DataValidationError) as e:
        validate(make_cfg())
    table = e.value.failures
    assert list(table.columns) == FAILURE_COLUMNS
    got = [tuple(r) for r in table[["file", "column", "check", "row"]].itertuples(index=False)]
    assert got == [expected]
    file, column, check, _ = expected
    assert check in str(e.value) and file in str(e.value)  # the printed table
    report = json.loads(P.validation_report().read_text())
    assert report["status"] == "failed" and report["failures"] == 1
    assert {k: report["failure_cases"][0][k] for k in ("file", "column", "check", "row")} == dict(
        zip(("file", "column", "check", "row"), expected, strict=True))
    assert check in P.validation_summary().read_text()
    assert not P.validated().exists()
    assert "set validate.on_failure: quarantine to set the failing rows aside" in str(e.value)  # what to do


@pytest.mark.parametrize("defect", ["prompt too long", "answer too long", "completion too long"])
def test_a_length_failure_names_the_limit_to_raise(make_cfg, defect):
    """Before: the row and the check, and no word of the setting that admits longer rows."""
    (mutate, (_, _, check, _)), = [d[1:] for d in DEFECTS if d[0] == defect]
    rows = clean_rows()
    mutate(rows)
    write_prepared(rows)
    cfg = make_cfg()
    with pytest.raises(DataValidationError) as e:
        validate(cfg)
    now = {"max_prompt_tokens": cfg.validate_.max_prompt_tokens, "max_answer_tokens": cfg.validate_.max_answer_tokens,
           "max_completion_tokens": cfg.validate_.completion_tokens()}[check]
    assert isinstance(now, int) and f"{check}: raise validate.{check} (now {now})" in str(e.value)


def test_all_failures_are_listed_at_once(make_cfg):
    rows = clean_rows()
    for _, mutate, _ in DEFECTS[:12]:  # defects on distinct rows
        mutate(rows)
    write_prepared(rows)
    with pytest.raises(DataValidationError) as e:
        validate(make_cfg())
    got = {tuple(r) for r in e.value.failures[["file", "column", "check", "row"]].itertuples(index=False)}
    assert got == {d[2] for d in DEFECTS[:12]}


def test_unique_preference_pairs_is_optional(make_cfg):
    rows = clean_rows()
    rows["preferences_train"].append({**rows["preferences_train"][0], "id": "pt-dup"})
    write_prepared(rows)
    validate(make_cfg())  # repeated pairs allowed by default (the synthetic generator repeats a few)
    with pytest.raises(DataValidationError) as e:
        validate(make_cfg("validate.unique_preference_pairs=true"))
    assert e.value.failures[["file", "check", "row"]].values.tolist() == [
        ["preferences_train.jsonl", "exact_duplicate_row", 4]]


def test_fail_policy_leaves_validated_byte_identical(make_cfg):
    from grpo_steps.cli import main

    write_prepared(clean_rows())
    validate(make_cfg())
    before = snapshot(P.validated())
    bad = clean_rows()
    bad["train"][0]["prompt"] = ""
    bad["test"][0]["prompt"] = bad["train"][1]["prompt"]
    write_prepared(bad)
    with pytest.raises(DataValidationError):
        validate(make_cfg())
    assert snapshot(P.validated()) == before
    assert sorted(p.name for p in Path("data").iterdir()) == ["prepared", "validated"]  # no temporaries left
    # the CLI maps it to exit code 2
    overrides = [f"--set={o}" for o in (f"tracking.tracking_uri={make_cfg().tracking.tracking_uri}",
                                        f"paths.models_dir={make_cfg().paths.models_dir}")]
    assert main(["validate", *overrides]) == 2
    assert snapshot(P.validated()) == before


def _count(path: Path) -> int:
    return len(read_jsonl(path)) if path.exists() else 0


def test_quarantine_conserves_rows_and_leaves_clean_data(make_cfg):
    rows = clean_rows()
    for _, mutate, _ in DEFECTS[:16]:
        mutate(rows)
    write_prepared(rows)
    cfg = make_cfg("validate.on_failure=quarantine")
    result = validate(cfg)
    report = json.loads(P.validation_report().read_text())
    assert report["status"] == "quarantined"
    total_q = 0
    for name in FILES:
        n_in = len(rows[name])
        n_ok = _count(P.validated_file(name))
        n_q = _count(P.quarantine() / f"{name}.jsonl")
        assert n_in == n_ok + n_q, name  # never a silent drop
        assert report["rows"][name] == n_in and report["validated"][name] == n_ok == result[name]
        assert report["quarantined"][name] == n_q
        total_q += n_q
    assert result["quarantined"] == total_q == 16  # one row per defect
    # every quarantined record keeps the original row and says why
    for rec in read_jsonl(P.quarantine() / "train.jsonl"):
        assert rec["reasons"] and rec["record"] == rows["train"][rec["row"]]
    # what passed is clean, and its hashes are in the report
    validated = {name: read_jsonl(P.validated_file(name)) for name in FILES}
    assert check_rows(validated, cfg.validate_, lambda texts: [len(t) for t in texts]).empty
    assert report["md5"]["train.jsonl"] == file_md5(P.validated_file("train"))
    assert "quarantined" in P.validation_summary().read_text()


def test_quarantine_that_would_empty_a_file_stops(make_cfg):
    rows = clean_rows()
    rows["train"][0]["prompt"] = ""
    write_prepared(rows)
    validate(make_cfg("validate.on_failure=quarantine"))
    before, quarantine_before = snapshot(P.validated()), snapshot(P.quarantine())
    _drop_column("eval", "answer")(rows)  # a missing column fails every row of eval
    write_prepared(rows)
    with pytest.raises(DataValidationError, match="quarantine would leave eval.jsonl empty"):
        validate(make_cfg("validate.on_failure=quarantine"))
    assert snapshot(P.validated()) == before and snapshot(P.quarantine()) == quarantine_before
    report = json.loads(P.validation_report().read_text())
    assert report["status"] == "failed" and report["failing_rows"]["eval"] == 3
    # a later clean run replaces data/validated and the quarantine folder as a whole
    write_prepared(clean_rows())
    validate(make_cfg("validate.on_failure=quarantine"))
    assert len(read_jsonl(P.validated_file("eval"))) == 3
    assert list(P.quarantine().iterdir()) == []


def test_partition_conserves_rows_with_file_level_failures():
    rows = clean_rows()
    import pandas as pd

    table = pd.DataFrame([["train.jsonl", "answer", "missing_column", None, None],
                          ["eval.jsonl", "prompt", "non_empty", 1, ""]], columns=FAILURE_COLUMNS, dtype=object)
    passing, quarantined = partition(rows, table)
    assert passing["train"] == [] and len(quarantined["train"]) == 8
    assert len(passing["eval"]) == 2 and quarantined["eval"][0]["row"] == 1


def test_mlflow_run_gets_hashes_and_report(make_cfg):
    import mlflow
    from mlflow.tracking import MlflowClient

    write_prepared(clean_rows())
    cfg = make_cfg()
    validate(cfg)
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], filter_string="tags.stage = 'validate'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    run = runs[0]
    for name in FILES:
        assert run.data.params[f"data_md5.{name}.jsonl"] == file_md5(P.validated_file(name))
    assert run.data.tags["validation_status"] == "passed" and run.data.metrics["validation_failures"] == 0
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "validation")}
    assert artifacts == {"validation/validation.json", "validation/validation.md"}


def test_prefect_artifacts_through_the_flows_publisher_only(make_cfg, monkeypatch):
    """The stage returns its reports; the wrapper hands them to the flow's publisher (Prefect artifacts), also
    when the outcome fails: the report that explains the failure is published before the error is raised."""
    import prefect.artifacts

    from flows.report import publish_reports

    rows = clean_rows()
    rows["train"][1]["answer"] = "x"
    write_prepared(rows)
    calls = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: calls.append(("md", kw)))
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: calls.append(("table", kw)))
    validate(make_cfg("validate.on_failure=quarantine"))
    assert calls == []  # outside a flow: no publisher, nothing published
    with pytest.raises(DataValidationError):
        validate(make_cfg(), publish=publish_reports)
    assert [kind for kind, _ in calls] == ["md", "table"]
    calls.clear()
    validate(make_cfg("validate.on_failure=quarantine"), publish=publish_reports)
    (kind_md, md), (kind_table, table) = calls
    assert kind_md == "md" and md["key"] == "data-validation" and "answer_is_number" in md["markdown"]
    assert kind_table == "table" and table["table"][0]["check"] == "answer_is_number"
    assert table["table"][0]["row"] == "1" and table["table"][0]["value"] == "'x'"


def test_synthetic_default_passes(make_cfg):
    from tests.support.stages import prepare

    cfg = make_cfg("task.n_train=400", "task.n_eval=40", "task.n_test=60", "task.n_preference_pairs=200")
    prepare(cfg)
    before = snapshot(P.prepared())
    validate(cfg)
    assert snapshot(P.validated()) == before


def test_validated_folder_is_swapped_whole(make_cfg):
    write_prepared(clean_rows())
    validate(make_cfg())
    (P.validated() / "stale.jsonl").write_text("{}\n")
    validate(make_cfg())
    assert sorted(p.name for p in P.validated().iterdir()) == sorted(f"{n}.jsonl" for n in FILES)


def test_unreadable_prepared_file_is_a_data_file_error(make_cfg):
    from grpo_steps.data.files import DataFileError

    rows = clean_rows()
    write_prepared(rows)
    P.prepared_file("eval").write_text('{"id": "eval-0"\n')
    with pytest.raises(DataFileError, match="eval.jsonl: line 1"):
        validate(make_cfg())


def test_defects_do_not_share_rows():
    """The mutations combined in the tests above touch distinct rows (else counts would not add up)."""
    rows = clean_rows()
    pristine = copy.deepcopy(rows)
    for _, mutate, _ in DEFECTS[:16]:
        mutate(rows)
    changed = {(n, i) for n in FILES for i, r in enumerate(rows[n]) if i >= len(pristine[n]) or r != pristine[n][i]}
    assert len(changed) == 16
