"""Ingestion of user datasets: round trips per format, and a clear error (file + line/row) for unreadable input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo_steps.data.files import DataFileError, read_jsonl
from grpo_steps.data.ingest import derive_preferences, gsm8k_answer, load_preferences, load_prompts, split_off
from grpo_steps.platform.config import ConfigError, load_config
from tests.support.stages import prepare

P = load_config(None).paths  # the catalog, default layout (tests run in a project dir)

FIXTURES = Path(__file__).parent / "fixtures" / "data"
PROMPT_FILES = ("train", "eval", "test")
PREF_FILES = ("preferences_train", "preferences_eval")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One MLflow store for every data test: creating a SQLite store costs seconds."""
    d = tmp_path_factory.getbasetemp() / "data-tests-mlflow"
    d.mkdir(exist_ok=True)
    return f"sqlite:///{d}/mlflow.db"


def _cfg(mlflow_uri, *overrides):
    return load_config("params.yaml", [f"tracking.tracking_uri={mlflow_uri}", *overrides])


def _fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def _prepared(name: str) -> list[dict]:
    return read_jsonl(P.prepared() / f"{name}.jsonl")


def _write_parquet(path: Path, rows: list[dict] | dict, schema: pa.Schema | None = None) -> Path:
    table = pa.Table.from_pydict(rows, schema=schema) if isinstance(rows, dict) else pa.Table.from_pylist(rows)
    pq.write_table(table, path)
    return path


def _assert_prepared_layout():
    ids = []
    for name in PROMPT_FILES:
        for row in _prepared(name):
            assert list(row) in (["id", "prompt", "answer", "split"], ["id", "prompt", "answer", "split",
                                 "demonstration"]) and row["split"] == name
            ids.append(row["id"])
    for name in PREF_FILES:
        for row in _prepared(name):
            assert list(row) == ["id", "prompt", "chosen", "rejected"]
            ids.append(row["id"])
    assert len(ids) == len(set(ids))


def _prompt_pairs(*names: str) -> list[tuple]:
    return sorted((r["prompt"], r["answer"]) for n in names for r in _prepared(n))


# ---------------------------------------------------------------------------------------------- round trips


def test_jsonl_round_trip_with_split_off_then_validates(workdir, mlflow_uri):
    from tests.support.stages import validate

    cfg = _cfg(mlflow_uri, "data.source=files", f"data.train={FIXTURES / 'prompts.jsonl'}",
               "data.eval_fraction=0.2", "data.test_fraction=0.2")
    counts = prepare(cfg)
    expected = sorted((r["prompt"], r["answer"]) for r in _fixture_rows("prompts.jsonl"))
    assert _prompt_pairs(*PROMPT_FILES) == expected  # every row kept, none duplicated
    assert counts["eval"] == 3 and counts["test"] == 3 and counts["train"] == 8
    _assert_prepared_layout()
    # no preference file: one derived pair per train / eval prompt, never from test
    test_prompts = {r["prompt"] for r in _prepared("test")}
    assert counts["preferences_train"] == 8 and counts["preferences_eval"] == 3
    for r in _prepared("preferences_train") + _prepared("preferences_eval"):
        assert r["prompt"] not in test_prompts and r["chosen"] != r["rejected"]
    result = validate(cfg)
    assert result["quarantined"] == 0
    for name in (*PROMPT_FILES, *PREF_FILES):
        assert read_jsonl(P.validated_file(name)) == _prepared(name)


def test_split_off_is_deterministic_by_seed(workdir, mlflow_uri):
    args = ["data.source=files", f"data.train={FIXTURES / 'prompts.jsonl'}", "data.eval_fraction=0.2"]
    prepare(_cfg(mlflow_uri, *args))
    first = {n: _prepared(n) for n in PROMPT_FILES}
    prepare(_cfg(mlflow_uri, *args))
    assert {n: _prepared(n) for n in PROMPT_FILES} == first
    prepare(_cfg(mlflow_uri, *args, "seed=5"))
    assert {n: _prepared(n) for n in PROMPT_FILES} != first


def test_csv_round_trip_with_given_splits(workdir, mlflow_uri):
    shutil.copy(FIXTURES / "prompts.csv", workdir / "train.csv")
    (workdir / "eval.csv").write_text("prompt,answer\nWhat is 2 plus 2?,4\n")
    (workdir / "test.csv").write_text('prompt,answer\r\n"What is 4 plus\n4?", 8\r\n')  # CRLF, multi-line field
    cfg = _cfg(mlflow_uri, "data.source=files", "data.train=train.csv", "data.eval=eval.csv", "data.test=test.csv")
    counts = prepare(cfg)
    assert counts["train"] == 15 and counts["eval"] == 1 and counts["test"] == 1
    assert ("What is 1,000 plus 1?", "1001") in _prompt_pairs("train")
    assert _prompt_pairs("test") == [("What is 4 plus\n4?", "8")]  # the answer's surrounding space stripped
    _assert_prepared_layout()


def test_parquet_round_trip_normalises_numeric_answers(workdir, mlflow_uri):
    rows = _fixture_rows("prompts.jsonl")
    _write_parquet(workdir / "train.parquet", {
        "prompt": [r["prompt"] for r in rows],
        "answer": [float(r["answer"]) for r in rows],  # a numeric column: 19.0 becomes "19", 2.5 stays "2.5"
    })
    cfg = _cfg(mlflow_uri, "data.source=files", "data.train=train.parquet")
    prepare(cfg)
    assert _prompt_pairs(*PROMPT_FILES) == sorted((r["prompt"], r["answer"]) for r in rows)
    _assert_prepared_layout()


def test_gsm8k_round_trip(workdir, mlflow_uri):
    from tests.support.stages import validate

    cfg = _cfg(mlflow_uri, "data.source=files", f"data.train={FIXTURES / 'gsm8k.jsonl'}", "data.gsm8k=true",
               "validate.max_prompt_tokens=80", "validate.max_completion_tokens=80")
    prepare(cfg)
    got = dict(_prompt_pairs(*PROMPT_FILES))
    src = _fixture_rows("gsm8k.jsonl")
    assert set(got) == {r["question"] for r in src}
    assert got[src[0]["question"]] == "7" and got[src[3]["question"]] == "1200"
    assert got[src[4]["question"]] == "-3" and got[src[5]["question"]] == "2.5"
    # the worked solution is the cold start's demonstration (train only), without calculator annotations
    solutions = {r["question"]: r["answer"] for r in src}
    train = _prepared("train")
    assert train and all(r["demonstration"].endswith(f"#### {solutions[r['prompt']].rsplit('#### ', 1)[1]}")
                         and "<<" not in r["demonstration"] for r in train)
    assert all("demonstration" not in r for n in ("eval", "test") for r in _prepared(n))
    # derived pairs: the solution against the same solution ending in a near miss
    for pair in _prepared("preferences_train"):
        assert pair["chosen"].rsplit("####", 1)[0] == pair["rejected"].rsplit("####", 1)[0]
        assert pair["chosen"] != pair["rejected"]
    validate(cfg)


def test_gsm8k_as_format_and_as_parquet(workdir, mlflow_uri):
    rows = _fixture_rows("gsm8k.jsonl")
    _write_parquet(workdir / "gsm.parquet", rows)
    cfg = _cfg(mlflow_uri, "data.source=files", "data.train=gsm.parquet", "data.format=gsm8k")
    prepare(cfg)
    assert sorted(a for _, a in _prompt_pairs(*PROMPT_FILES)) == sorted(["7", "60", "140", "1200", "-3", "2.5"])


@pytest.mark.parametrize("fixture", ["preferences.jsonl", "preferences.csv"])
def test_preference_pairs_round_trip(workdir, mlflow_uri, fixture):
    cfg = _cfg(mlflow_uri, "data.source=files", f"data.train={FIXTURES / 'prompts.jsonl'}",
               f"data.preferences_train={FIXTURES / fixture}", "data.preferences_eval_fraction=0.2")
    counts = prepare(cfg)
    src = sorted(tuple(r.values()) for r in _fixture_rows("preferences.jsonl"))
    got = sorted((r["prompt"], r["chosen"], r["rejected"]) for n in PREF_FILES for r in _prepared(n))
    assert got == src and counts["preferences_eval"] == 2
    _assert_prepared_layout()


def test_preference_eval_file_and_parquet(workdir, mlflow_uri):
    rows = _fixture_rows("preferences.jsonl")
    _write_parquet(workdir / "pt.parquet", rows[:7])
    _write_parquet(workdir / "pe.parquet", {"prompt": [r["prompt"] for r in rows[7:]],
                                            "chosen": [int(r["chosen"]) for r in rows[7:]],
                                            "rejected": [int(r["rejected"]) for r in rows[7:]]})
    cfg = _cfg(mlflow_uri, "data.source=files", f"data.train={FIXTURES / 'prompts.jsonl'}",
               "data.preferences_train=pt.parquet", "data.preferences_eval=pe.parquet")
    prepare(cfg)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in _prepared("preferences_eval")] == [
        tuple(r.values()) for r in rows[7:]]
    assert len(_prepared("preferences_train")) == 7


def test_custom_column_names_and_ids(workdir, mlflow_uri):
    cfg = _cfg(mlflow_uri, "data.source=files", f"data.train={FIXTURES / 'custom_columns.csv'}",
               "data.prompt_column=question_text", "data.answer_column=target", "data.id_column=uid",
               "data.eval_fraction=0.2", "data.test_fraction=0.2")
    prepare(cfg)
    rows = [r for n in PROMPT_FILES for r in _prepared(n)]
    assert sorted(r["id"] for r in rows) == [f"q{i}" for i in range(6)]
    assert ("What is 12 plus 7?", "19") in [(r["prompt"], r["answer"]) for r in rows]


def test_synthetic_default_is_unchanged(workdir, mlflow_uri):
    from grpo_steps.data.task import demonstrations, make_splits

    cfg = _cfg(mlflow_uri, "task.n_train=50", "task.n_eval=5", "task.n_test=5", "task.n_preference_pairs=20")
    counts = prepare(cfg)
    assert counts == {"train": 50, "eval": 5, "test": 5, "preferences_train": 18, "preferences_eval": 2}
    splits = make_splits(0, {"train": 50, "eval": 5, "test": 5}, cfg.task.max_operand, list(cfg.task.operations))
    demos = demonstrations(0, splits["train"], cfg.task.demo_error_rate)
    assert _prepared("train")[3] == {"id": "train-000003", "prompt": splits["train"][3].prompt,
                                     "answer": splits["train"][3].answer, "split": "train",
                                     "demonstration": demos[3]}
    assert "demonstration" not in _prepared("test")[0]  # only the cold start imitates the teacher
    assert sorted(p.name for p in P.prepared().iterdir()) == sorted(
        f"{n}.jsonl" for n in (*PROMPT_FILES, *PREF_FILES))


# ------------------------------------------------------------------------------------------------ helpers


def test_split_off_keeps_every_row_and_repeats_together():
    rows = [{"prompt": f"p{i % 30}", "answer": str(i)} for i in range(60)]  # every prompt twice
    rest, parts = split_off(rows, {"eval": 0.1, "test": 0.2}, seed=3)
    assert len(rest) + sum(len(p) for p in parts.values()) == len(rows)
    groups = [{r["prompt"] for r in g} for g in (rest, parts["eval"], parts["test"])]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert len(groups[1]) == 3 and len(groups[2]) == 6
    assert split_off(rows, {"eval": 0.1, "test": 0.2}, seed=3) == (rest, parts)


def test_gsm8k_answer_parsing():
    assert gsm8k_answer("so 3\n#### 1,234") == "1234"
    assert gsm8k_answer("#### -5 ") == "-5"
    assert gsm8k_answer("no marker 5") is None and gsm8k_answer("#### ") is None and gsm8k_answer(5) is None


def test_derived_preferences_skip_non_numbers():
    pairs = derive_preferences(0, [{"prompt": "a", "answer": "3"}, {"prompt": "b", "answer": "x"},
                                   {"prompt": "c", "answer": "0.5"}, {"prompt": "a", "answer": "3"}])
    assert [p["prompt"] for p in pairs] == ["a", "c"] and all(p["chosen"] != p["rejected"] for p in pairs)


def test_data_config_is_checked(workdir):
    with pytest.raises(ConfigError, match="needs a train file"):
        load_config("params.yaml", ["data.source=files"])
    with pytest.raises(ConfigError, match="source is 'synthetic'"):
        load_config("params.yaml", ["data.train=x.jsonl"])
    with pytest.raises(ConfigError, match=r"data\.format"):
        load_config("params.yaml", ["data.format=xlsx"])
    with pytest.raises(ConfigError, match="below 1"):
        load_config("params.yaml", ["data.source=files", "data.train=a.csv", "data.eval_fraction=0.6",
                                    "data.test_fraction=0.5"])


# ------------------------------------------------------------------------------------------ unreadable input

DATA = load_config(None, ["data.source=files", "data.train=unused.jsonl"]).data


def _parquet_bytes(tmp_path: Path, table: pa.Table) -> bytes:
    pq.write_table(table, tmp_path / "t.parquet")
    return (tmp_path / "t.parquet").read_bytes()


def _error(path: Path, loader=load_prompts, data=DATA) -> str:
    with pytest.raises(DataFileError) as e:
        loader(path, data)
    msg = str(e.value)
    assert str(path) in msg or str(path.resolve()) in msg  # every message names the file
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_empty_file(tmp_path, ext):
    path = tmp_path / f"train.{ext}"
    path.write_bytes(b"")
    assert "empty file" in _error(path)


def test_whitespace_only_jsonl_and_header_only_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n  \n")
    assert "empty" in _error(tmp_path / "a.jsonl")
    (tmp_path / "b.csv").write_text("prompt,answer\n")
    assert "no rows" in _error(tmp_path / "b.csv")


def test_parquet_without_rows(tmp_path):
    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string())])
    (tmp_path / "e.parquet").write_bytes(_parquet_bytes(tmp_path, schema.empty_table()))
    assert "no rows" in _error(tmp_path / "e.parquet")


def test_non_utf8_jsonl_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    msg = _error(path)
    assert "line 2" in msg and "UTF-8" in msg


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"prompt,answer\nok,1\n" + "café,2\n".encode("latin-1"))
    msg = _error(path)
    assert "line 3" in msg and "UTF-8" in msg


def test_non_utf8_parquet_names_the_row(tmp_path):
    table = pa.table({"prompt": pa.array([b"ok", b"caf\xe9"], pa.binary()), "answer": ["1", "2"]})
    path = tmp_path / "train.parquet"
    path.write_bytes(_parquet_bytes(tmp_path, table))
    msg = _error(path)
    assert "row 2" in msg and "UTF-8" in msg and "'prompt'" in msg


def test_garbage_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"\x00\xffnot parquet at all")
    assert "not a readable Parquet file" in _error(path)


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_missing_column_each_format(tmp_path, ext):
    path = tmp_path / f"train.{ext}"
    rows = [{"prompt": "What is 1 plus 1?", "solution": "2"}]
    if ext == "jsonl":
        path.write_text(json.dumps(rows[0]) + "\n")
    elif ext == "csv":
        path.write_text("prompt,solution\nWhat is 1 plus 1?,2\n")
    else:
        _write_parquet(path, rows)
    msg = _error(path)
    assert "missing column(s) 'answer'" in msg and "solution" in msg


def test_missing_preference_column(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "1"}) + "\n")
    assert "'rejected'" in _error(path, load_preferences)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": 2,}\n')
    msg = _error(path)
    assert "line 3" in msg and "not valid JSON" in msg
    path.write_text('{"prompt": "a", "answer": "1"}\n["a list"]\n')
    assert "line 2" in _error(path)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,answer\na,1\nb,2,extra\n")
    assert "line 3" in _error(path)


def test_gsm8k_answer_without_marker_names_the_rows(tmp_path):
    rows = _fixture_rows("gsm8k.jsonl")
    rows[1]["answer"] = "60 eggs"
    rows[4]["answer"] = None
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gsm = DATA.model_copy(update={"gsm8k": True})
    msg = _error(path, data=gsm)
    assert "2 row(s)" in msg and "line 2, line 5" in msg and "####" in msg


def test_unknown_extension(tmp_path):
    path = tmp_path / "train.xlsx"
    path.write_text("x")
    assert "data.format" in _error(path)
    assert load_prompts(FIXTURES / "prompts.jsonl", DATA.model_copy(update={"format": "jsonl"}))


def test_prepare_stops_before_writing_on_unreadable_input(workdir, mlflow_uri):
    prepare(_cfg(mlflow_uri, "task.n_train=20", "task.n_eval=5", "task.n_test=5", "task.n_preference_pairs=10"))
    before = {p.name: p.read_bytes() for p in P.prepared().iterdir()}
    (workdir / "bad.jsonl").write_bytes(b'{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(DataFileError, match="bad.jsonl"):
        prepare(_cfg(mlflow_uri, "data.source=files", "data.train=bad.jsonl"))
    assert {p.name: p.read_bytes() for p in P.prepared().iterdir()} == before


def test_cli_reports_unreadable_input_with_exit_code_2(workdir, capsys):
    from grpo_steps.cli import main

    (workdir / "train.csv").write_text("question,answer\nq,1\n")
    assert main(["prepare", "--set", "data.source=files", "--set", "data.train=train.csv"]) == 2
    err = capsys.readouterr().err
    assert "train.csv" in err and "'prompt'" in err


def test_a_failing_row_is_named_by_the_line_of_the_users_own_file(workdir, mlflow_uri):
    """Before: an over-long prompt was reported only as row N (0-based) of data/prepared/train.jsonl, a file the
    split had shuffled, and the user had to find it in their own file themselves."""
    from grpo_steps.stages.validate import DataValidationError
    from tests.support.stages import validate

    lines = (FIXTURES / "prompts.jsonl").read_text().splitlines()
    long = json.loads(lines[8])
    long["prompt"] = "1+" * 40 + "1="  # line 9 of the user's file: beyond validate.max_prompt_tokens
    lines[8] = json.dumps(long)
    (workdir / "mine.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _cfg(mlflow_uri, "data.source=files", "data.train=mine.jsonl", "data.eval_fraction=0.2")
    prepare(cfg)
    assert all("_source" not in row for name in PROMPT_FILES for row in _prepared(name))  # the rows as before
    with pytest.raises(DataValidationError) as e:
        validate(cfg)
    # the train row, and the preference pair derived from it (which has no line of its own)
    (failure,) = [f for f in e.value.failures.to_dict(orient="records") if f["file"] == "train.jsonl"]
    assert failure["check"] == "max_prompt_tokens"
    assert f"{failure['file']} row {failure['row']}: mine.jsonl line 9" in str(e.value)
