"""DVC reproducibility, for real: `dvc repro` on a clean git clone, up-to-date checks, a changed GRPO param,
`dvc exp run -S`, metrics and plots, and a push/pull round trip through a local remote.

The project's pipeline files are copied into a temporary git repository with params.yaml set to the tiny
budget of tests/conftest.py (TINY), so a full repro takes about a minute on 2 cores. Stages run through the
`grpo` CLI of this virtualenv. The first test of the slow group pays for the one full repro; the others
reuse it, each in its own copy of the repository where they change something.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from grpo_steps.platform.config import load_config
from grpo_steps.platform.stage import param_values
from grpo_steps.stages import STAGES
from tests.conftest import ROOT, TINY

BIN = Path(sys.executable).parent
# What a stage needs from the project (plus prefect.yaml for the deployment test): copied into a temporary
# repository. Generated outputs, caches and local state are left behind, as in a clean clone.
PROJECT_FILES = ("grpo_steps", "flows", "dvc.yaml", "params.yaml", "prefect.yaml", "pyproject.toml",
                 ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")
GIT_ID = {"GIT_AUTHOR_NAME": "grpo-test", "GIT_AUTHOR_EMAIL": "grpo-test@example.invalid",
          "GIT_COMMITTER_NAME": "grpo-test", "GIT_COMMITTER_EMAIL": "grpo-test@example.invalid"}
ALL_STAGES = list(STAGES)
AFTER_GRPO = ["grpo", "evaluate", "register"]


def tool_env(**extra: str) -> dict[str, str]:
    """The environment of a stage subprocess: this venv's tools first, offline, no outer MLflow/Prefect run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false", **GIT_ID, **extra)
    return env


def copy_project(dst: Path, tiny: bool = True) -> Path:
    """The project's pipeline files in `dst`, with params.yaml at the TINY budget."""
    dst.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in PROJECT_FILES:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dst / rel, ignore=ignore)
        elif src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    if tiny:
        from grpo_steps.platform.config import _merge, parse_overrides

        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        (dst / "params.yaml").write_text(yaml.safe_dump(_merge(raw, parse_overrides(TINY)), sort_keys=False))
    return dst


def run(cmd: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def dvc(*args: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd, timeout, check)


def git(*args: str, cwd: Path) -> str:
    return run(["git", *args], cwd, timeout=60).stdout


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def lock_outs(repo: Path, rev: str | None = None) -> dict[str, dict[str, Any]]:
    text = git("show", f"{rev}:dvc.lock", cwd=repo) if rev else (repo / "dvc.lock").read_text()
    lock = yaml.safe_load(text)
    return {o["path"]: {**o, "stage": name} for name, st in lock["stages"].items() for o in st.get("outs", [])}


# ------------------------------------------------------------------------- dvc.yaml vs the stage specs


def _entries(items: list[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for item in items or []:
        if isinstance(item, str):
            out[item] = {}
        else:
            ((path, opts),) = item.items()
            out[path] = opts or {}
    return out


def test_dvc_yaml_agrees_with_the_stage_specs():
    """dvc.yaml and grpo_steps.stages.STAGES (which keys the Prefect cache) say the same."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cfg = load_config(ROOT / "params.yaml")
    assert list(doc) == ALL_STAGES
    for name, spec in STAGES.items():
        st = doc[name]
        assert st["cmd"] == f"grpo {name}"
        assert set(st["deps"]) == set(spec.code) | {str(p) for p in spec.deps(cfg)}, name
        assert list(st["params"]) == list(spec.params), name
        outs = {**_entries(st.get("outs")), **_entries(st.get("metrics")), **_entries(st.get("plots"))}
        assert set(outs) == {str(p) for p in [*spec.outs(cfg), *spec.persistent_outs(cfg)]}, name
        for p in spec.persistent_outs(cfg):
            assert outs[str(p)].get("persist") is True, f"{p} must survive re-runs (persist: true)"
        for code in spec.code:
            assert (ROOT / code).exists(), f"{name}: source dependency {code} does not exist"
    for spec in STAGES.values():  # every params key exists in params.yaml
        param_values(cfg, spec.params)
    # metrics and plots are cached by DVC (reports/ is git-ignored): metrics diff / plots diff across revisions
    for name in ("validate", "train_reward", "grpo", "evaluate"):
        for kind in ("metrics", "plots"):
            for path, opts in _entries(doc[name].get(kind)).items():
                assert opts.get("cache", True) is True, f"{path} must be cached"
    assert _entries(doc["register"]["outs"]) == {"reports/registration.json": {"cache": False}}
    assert _entries(doc["grpo"]["outs"])["models/grpo_checkpoints"] == {"persist": True}
    assert _entries(doc["grpo"]["plots"])["reports/grpo_steps.csv"] == {"x": "step", "y": "reward"}


def test_committed_dvc_yaml_is_generated_from_the_stage_records():
    from grpo_steps.platform.dvc_yaml import render

    assert (ROOT / "dvc.yaml").read_text() == render(STAGES.values()), "dvc.yaml is stale: run `grpo dvc-yaml`"


def test_dvc_yaml_check_command(tmp_path, capsys):
    from grpo_steps.cli import main

    target = tmp_path / "dvc.yaml"
    assert main(["dvc-yaml", "--check", "--path", str(target)]) == 1 and not target.exists()
    assert "out of date" in capsys.readouterr().err
    assert main(["dvc-yaml", "--path", str(target)]) == 0
    assert main(["dvc-yaml", "--check", "--path", str(target)]) == 0
    assert target.read_text() == (ROOT / "dvc.yaml").read_text()


def test_checkpoints_folder_is_left_even_without_checkpoints(workdir, monkeypatch):
    """dvc.yaml's persistent out of the grpo stage always exists after the stage (DVC fails on a missing out)."""
    import grpo_steps.stages.grpo
    from grpo_steps.platform.results import StageResult
    from grpo_steps.stages import STAGES

    cfg = load_config("params.yaml")
    monkeypatch.setattr(grpo_steps.stages.grpo, "train_grpo", lambda cfg: StageResult({"steps": 0}))
    assert STAGES["grpo"](cfg) == {"steps": 0}
    (declared,) = STAGES["grpo"].persistent_outs(cfg)
    assert declared.is_dir() and str(declared) == "models/grpo_checkpoints"
    from grpo_steps.platform.checkpoint import checkpoints_root

    assert checkpoints_root(cfg) == declared, "the trainer writes where dvc.yaml looks"


def test_a_copy_outside_git_falls_back_to_prefects_cache(tmp_path, monkeypatch):
    """A project copied without .git (a deployment's checkout, a tarball): DVC cannot open it, `dvc repro` would fail
    there too, so the flow neither asks nor records DVC and says why, instead of dying in DVC's SCMError."""
    from flows import dvc_record

    project = copy_project(tmp_path / "project")
    monkeypatch.chdir(project)
    why = dvc_record.why_not(load_config("params.yaml"), "prepare")
    assert why is not None and "not a git repository" in why, why


# ------------------------------------------------------------------------------------------ real DVC

@pytest.fixture(scope="module")
def repro_repo(tmp_path_factory):
    """A clean git clone of the project (TINY params) after one full `dvc repro`, with dvc.lock committed."""
    if not (BIN / "dvc").exists() or shutil.which("git") is None:
        pytest.skip("needs the dvc CLI of this virtualenv and git")
    base = tmp_path_factory.mktemp("dvc")
    origin = copy_project(base / "origin")
    git("init", "-q", "-b", "main", cwd=origin)
    git("add", "-A", cwd=origin)
    git("commit", "-q", "-m", "project", cwd=origin)
    repo = base / "clone"
    git("clone", "-q", str(origin), str(repo), cwd=base)
    proc = dvc("repro", cwd=repo, timeout=600)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "dvc repro", cwd=repo)
    return repo, proc.stdout + proc.stderr


def _copy_repo(repo: Path, dst: Path) -> Path:
    shutil.copytree(repo, dst, symlinks=True)
    return dst


@pytest.mark.slow  # one full `dvc repro` at the TINY budget: about a minute on 2 cores
def test_repro_on_a_clean_clone_runs_every_stage(repro_repo):
    repo, output = repro_repo
    assert stages_run(output) == ALL_STAGES, output[-3000:]
    for path in ("data/validated/train.jsonl", "models/grpo/model.safetensors", "reports/metrics.json",
                 "reports/grpo_steps.csv", "reports/eval.png", "reports/registration.json"):
        assert (repo / path).is_file(), path
    outs = lock_outs(repo)
    ckpt = outs["models/grpo_checkpoints"]
    assert ckpt["stage"] == "grpo" and ckpt["md5"].endswith(".dir"), "checkpoints are a DVC output of grpo"
    assert "md5" in outs["reports/metrics.json"], "metrics are cached by DVC"
    assert "registration.json" not in git("ls-files", cwd=repo)
    # the registry side effect happened in this repository's MLflow store
    reg = json.loads((repo / "reports/registration.json").read_text())
    assert reg["model_name"] == "grpo-policy" and reg["alias"] == "champion"
    assert (repo / "mlflow.db").is_file()


@pytest.mark.slow
def test_second_repro_is_up_to_date(repro_repo):
    repo, _ = repro_repo
    proc = dvc("repro", cwd=repo)
    assert stages_run(proc.stdout) == []
    assert "Data and pipelines are up to date" in proc.stdout
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}


@pytest.mark.slow
def test_metrics_and_plots(repro_repo):
    repo, _ = repro_repo
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo).stdout)
    metrics = shown[""]["data"]["reports/metrics.json"]["data"]
    assert 0.0 <= metrics["grpo"]["accuracy"] <= 1.0 and "start" in metrics and "accuracy_gain" in metrics
    assert "pairwise_accuracy" in shown[""]["data"]["reports/reward_model.json"]["data"]
    assert json.loads(dvc("metrics", "diff", "--json", cwd=repo).stdout) == {}, "workspace == HEAD"

    plots = json.loads(dvc("plots", "show", "--json", cwd=repo).stdout)["data"]
    (curve,) = plots["reports/grpo_steps.csv"]
    values = curve["content"]["data"]["values"]
    assert [int(v["step"]) for v in values] == [1, 2, 3] and all("reward" in v for v in values)
    assert curve["content"]["encoding"]["x"]["field"] == "step"
    assert plots["reports/eval.png"][0]["type"] == "image"


@pytest.mark.slow
def test_push_pull_round_trip_through_a_local_remote(repro_repo, tmp_path):
    repo, _ = repro_repo
    remote = tmp_path / "remote"
    dvc("remote", "add", "--local", "-d", "store", str(remote), cwd=repo)
    try:
        dvc("push", cwd=repo)
    finally:
        dvc("remote", "remove", "--local", "store", cwd=repo)
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "models").exists()
    dvc("remote", "add", "--local", "-d", "store", str(remote), cwd=clone)
    dvc("pull", cwd=clone)

    from flows.cache import path_md5

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    uncached = {p for st in stages.values() for kind in ("outs", "metrics", "plots")
                for p, opts in _entries(st.get(kind)).items() if opts.get("cache") is False}
    cached = [p for p in lock_outs(repo) if p not in uncached]
    assert "models/grpo_checkpoints" in cached and "models/grpo" in cached
    for path in cached:
        assert (clone / path).exists(), path
        assert path_md5(clone / path) == path_md5(repo / path), path
    # everything but the registry side effect (an uncached out) is up to date in the clone
    assert set(json.loads(dvc("status", "--json", cwd=clone).stdout)) <= {"register"}


@pytest.mark.slow  # grpo + evaluate + register again: ~30 s
def test_changing_a_grpo_param_reruns_grpo_and_the_stages_after_it(repro_repo, tmp_path):
    """By hand (edit params.yaml: DVC sees only grpo's params changed), then as `dvc exp run -S grpo.beta=0.0`,
    which re-runs grpo, evaluate and register and records an experiment."""
    repo = _copy_repo(repro_repo[0], tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["grpo"]["beta"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(dvc("status", "--json", cwd=repo).stdout)) == {"grpo"}, "only grpo's own params changed"
    git("checkout", "--", "params.yaml", cwd=repo)

    proc = dvc("exp", "run", "-S", "grpo.beta=0.0", cwd=repo, timeout=600)
    assert stages_run(proc.stdout) == AFTER_GRPO, proc.stdout[-3000:]
    assert json.loads(dvc("params", "diff", "--json", cwd=repo).stdout) == {
        "params.yaml": {"grpo.beta": {"old": 0.02, "new": 0.0, "diff": -0.02}}}
    before, after = lock_outs(repo, "HEAD"), lock_outs(repo)
    assert after["models/grpo"]["md5"] != before["models/grpo"]["md5"], "a new policy, not a resumed old one"
    for path in ("data/validated", "models/reward", "models/sft"):
        assert after[path]["md5"] == before[path]["md5"]
    diff = json.loads(dvc("metrics", "diff", "--json", "HEAD", cwd=repo).stdout)
    assert set(diff) <= {"reports/metrics.json"}, diff
    assert json.loads(dvc("status", "--json", cwd=repo).stdout) == {}

    def experiments(node: Any) -> list[dict[str, Any]]:
        """The data of every named experiment with grpo.beta == 0 in `dvc exp show --json`."""
        hits = []
        if isinstance(node, dict):
            data = node.get("data") or {}
            grpo = (((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}).get("grpo")
            if node.get("name") and isinstance(grpo, dict) and grpo.get("beta") == 0.0:
                hits.append(data)
            for v in node.values():
                hits += experiments(v)
        elif isinstance(node, list):
            for v in node:
                hits += experiments(v)
        return hits

    (exp,) = experiments(json.loads(dvc("exp", "show", "--json", cwd=repo).stdout))
    assert "grpo" in exp["metrics"]["reports/metrics.json"]["data"]


def grpo_run(repo: Path, timeout: float = 600) -> tuple[str, list[str]]:
    """`grpo run` in `repo` as a user runs it; returns its output and the stages it reports as cached."""
    proc = subprocess.run([str(BIN / "grpo"), "run"], cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env=tool_env(PREFECT_HOME=str(repo / ".prefect")))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (cached,) = re.findall(r"cached stages: ([\w, ]+)$", out, flags=re.M)
    return out, [] if cached == "none" else cached.split(", ")


@pytest.mark.slow  # three `grpo run`s at the TINY budget: ~3 min on 2 cores
def test_grpo_run_and_dvc_repro_share_one_record(repro_repo, tmp_path):
    """Before: `dvc repro` after `grpo run` retrained every stage (593 s at short settings), and `grpo run` after
    `dvc repro` too: each kept its own record. Now the flow reads and writes dvc.lock as `dvc repro` does."""
    after_repro = _copy_repo(repro_repo[0], tmp_path / "after-repro")
    status = run([str(BIN / "grpo"), "status"], after_repro).stdout
    assert status.count("dvc.lock records it up to date") == len(ALL_STAGES) - 1, status
    out, cached = grpo_run(after_repro)
    assert cached == ALL_STAGES[:-1], out[-3000:]  # all but register, a side effect that always runs
    assert "dvc.lock records it up to date" in out
    assert json.loads(dvc("status", "--json", cwd=after_repro).stdout) == {}

    fresh = tmp_path / "fresh"
    git("clone", "-q", str(repro_repo[0].parent / "origin"), str(fresh), cwd=tmp_path)
    out, cached = grpo_run(fresh)
    assert cached == [], out[-3000:]
    assert json.loads(dvc("status", "--json", cwd=fresh).stdout) == {}
    proc = dvc("repro", cwd=fresh)
    assert stages_run(proc.stdout) == [] and "Data and pipelines are up to date" in proc.stdout
    assert lock_outs(fresh)["models/grpo"]["md5"] == lock_outs(repro_repo[0])["models/grpo"]["md5"], \
        "the flow and dvc repro trained the same bytes"

    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["grpo"]["beta"] = 0.0
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, cached = grpo_run(fresh)
    assert cached == ALL_STAGES[:4], out[-3000:]  # grpo, evaluate and register ran again
    assert json.loads(dvc("status", "--json", cwd=fresh).stdout) == {}
