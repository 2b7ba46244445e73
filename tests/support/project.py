"""Helpers (no tests) shared by the reward-model, evaluation, registry and tracking tests.

`project_template` builds, once per test session, a tiny project: real prepared + validated data, the
tokenizer, and untrained tiny policies / reward model saved like the stages save them (training them is not
what these tests check). Tests copy it into their own working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from infra.local_stack import free_port, tail
from tests.conftest import ROOT, TINY

_TEMPLATE: dict[str, Path] = {}
_SKIP = {"mlflow.db", "mlartifacts", ".prefect", "params.yaml"}


def tiny_overrides(workdir: Path, *extra: str) -> list[str]:
    return [*TINY, f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", "tracking.system_metrics=false", *extra]


def load_tiny(workdir: Path, *extra: str):
    from grpo_steps.platform.config import load_config

    return load_config(workdir / "params.yaml", tiny_overrides(workdir, *extra))


def _build(root: Path) -> None:
    from grpo_steps.platform.modeling import build_policy, build_reward_backbone, load_tokenizer, seed_everything
    from tests.support.stages import prepare, validate

    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    with contextlib.chdir(root):
        cfg = load_tiny(root)
        prepare(cfg)
        validate(cfg)
        tok = load_tokenizer(cfg.paths.tokenizer())
        seed_everything(0)
        policy = build_policy(cfg.model, tok)
        for folder in (cfg.paths.sft_policy(), cfg.paths.grpo_policy()):
            policy.save_pretrained(str(folder), safe_serialization=True)
            tok.save_pretrained(str(folder))
        reward = build_reward_backbone(cfg.model, tok)
        reward.save_pretrained(str(cfg.paths.reward_model()), safe_serialization=True)
        tok.save_pretrained(str(cfg.paths.reward_model()))
        perturb_policy(cfg.paths.grpo_policy(), 0.01)
        reports = cfg.paths.reports()
        reports.mkdir(parents=True, exist_ok=True)
        (reports / "grpo_steps.csv").write_text(
            "step,reward,kl\n" + "".join(f"{s},{0.1 * s:.2f},{0.01 * s:.3f}\n" for s in range(1, 4))
        )


def project_template(tmp_path_factory) -> Path:
    if "root" not in _TEMPLATE:
        root = tmp_path_factory.mktemp("project-template")
        _build(root)
        _TEMPLATE["root"] = root
    return _TEMPLATE["root"]


def copy_project(template: Path, workdir: Path) -> None:
    """The template's data, models and reports into `workdir` (the test's own MLflow store stays empty)."""
    for item in template.iterdir():
        if item.name in _SKIP:
            continue
        dst = workdir / item.name
        if item.is_dir():
            shutil.copytree(item, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst)


def perturb_policy(folder: Path, delta: float) -> None:
    """Change one weight slightly: another policy (another md5) with the same behaviour, to register again."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith("norm.weight"))
    tensors[key] = tensors[key] + delta
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_metrics(cfg, accuracy: float, start_accuracy: float = 0.1, **extra) -> None:
    """A hand-written reports/metrics.json in the evaluate stage's format."""
    from grpo_steps.platform.io import write_json

    metrics = {
        "n_test": 60,
        "start": {"accuracy": start_accuracy, "pass_at_2": start_accuracy},
        "grpo": {"accuracy": accuracy, "pass_at_2": accuracy, "kl_to_reference": 0.01},
        "accuracy_gain": accuracy - start_accuracy,
        "reward_hacking_warning": None,
        **extra,
    }
    write_json(cfg.paths.reports() / "metrics.json", metrics)


@contextlib.contextmanager
def mlflow_server(root: Path, timeout_s: float = 180.0, store: str | None = None,
                  artifacts: Path | None = None) -> Iterator[str]:
    """`mlflow server` on a free port, always terminated: on `store` and `artifacts` when given, else on a
    new SQLite store and artifact folder in `root` (which holds its log either way)."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
           "--backend-store-uri", store or f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(artifacts or root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (root / "server.log").open("w")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{tail(root / 'server.log')}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{tail(root / 'server.log')}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)  # the server and the workers it started (its own session)
            try:  # uvicorn waits for idle keep-alive connections of the clients: a short grace period only
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
        log.close()



def read_json(path: Path):
    return json.loads(Path(path).read_text())
