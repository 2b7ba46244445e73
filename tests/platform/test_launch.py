"""The `launch` section and torch's launcher command: layouts, rendezvous, the ranks' log prefix, errors."""

from __future__ import annotations

import io
import json

import pytest

from grpo_steps import launch_rank
from grpo_steps.platform import launch
from grpo_steps.platform.config import ConfigError, load_config


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_one_process_runs_in_the_stage_and_auto_is_one_per_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    assert launch.layout(_cfg()) == launch.Layout(1, 1)
    assert not launch.wants_child_job(_cfg())
    monkeypatch.setattr(launch, "visible_gpus", lambda: 8)
    assert launch.layout(_cfg()).world_size == 8 and launch.wants_child_job(_cfg())
    assert launch.layout(_cfg("launch.processes_per_node=2")).world_size == 2
    # inside a job someone launched (torchrun, accelerate launch), the stage runs in the rank itself
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert not launch.wants_child_job(_cfg())


def test_torchrun_command_standalone_on_one_node_c10d_across_nodes(tmp_path):
    one = launch.torchrun_command(_cfg("launch.processes_per_node=2"), tmp_path)
    assert one[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in one and "--nnodes=1" in one and "--standalone" in one
    assert "--max-restarts=0" in one and one[-3:] == ["-m", "grpo_steps.launch_rank", str(tmp_path)]
    two = launch.torchrun_command(_cfg("launch.processes_per_node=4", "launch.nodes=2",
                                       "launch.rdzv_endpoint=node-0.grpo:29400", "launch.rdzv_id=job-7"), tmp_path)
    assert "--standalone" not in two
    for arg in ("--nproc-per-node=4", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node-0.grpo:29400",
                "--rdzv-id=job-7", "--rdzv-conf=join_timeout=1800"):
        assert arg in two, arg


@pytest.mark.parametrize("overrides, message", [
    (["launch.nodes=2"], "set launch.rdzv_endpoint"),
    (["launch.processes_per_node=0"], "auto or >= 1"),
    (["launch.rdzv_endpoint=node-0"], "host:port"),
    (["launch.processes_per_node=many"], "launch.processes_per_node"),
])
def test_bad_launch_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_every_launch_key_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRPO_LAUNCH_NODES", "3")
    monkeypatch.setenv("GRPO_LAUNCH_RDZV_ENDPOINT", "grpo-0.grpo-nodes:29400")
    monkeypatch.setenv("GRPO_LAUNCH_PROCESSES_PER_NODE", "8")
    monkeypatch.setenv("GRPO_LAUNCH_RDZV_ID", "no")  # text stays text (YAML would read a boolean)
    cfg = _cfg("launch.nodes=2")  # the environment wins over params and --set (a Kubernetes pod's layout)
    assert (cfg.launch.nodes, cfg.launch.rdzv_endpoint, cfg.launch.processes_per_node, cfg.launch.rdzv_id) == (
        3, "grpo-0.grpo-nodes:29400", 8, "no")


def test_grpo_node_refuses_a_one_node_layout():
    with pytest.raises(ConfigError, match="launch.nodes is 1"):
        launch.follow(_cfg())


def test_rank_prefix_starts_every_line_and_every_progress_redraw():
    out = io.StringIO()
    stream = launch_rank._RankPrefixed(out, "[rank 1] ")
    stream.write("one\ntw")
    stream.write("o\n\rbar 1%\rbar 2%")
    stream.write("\n")
    assert out.getvalue() == "[rank 1] one\n[rank 1] two\n\r[rank 1] bar 1%\r[rank 1] bar 2%\n"


def _error(tmp_path, rank, t, user_error, exit_code):
    (tmp_path / f"error-rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": 2, "node": 0, "host": "h", "exit_code": exit_code, "user_error": user_error,
        "type": "builtins.ValueError", "message": f"bad thing on {rank}", "traceback": "Traceback ...", "time": t}))


def test_the_first_failing_rank_is_the_stage_error_and_a_user_error_stays_one(tmp_path):
    _error(tmp_path, 0, 2.0, False, 1)  # rank 0 failed later, in a collective its peer had left
    _error(tmp_path, 1, 1.0, False, 1)
    err = launch.job_error("grpo", tmp_path, 1, world_size=2)
    assert isinstance(err, launch.LaunchError)
    assert str(err).startswith("stage grpo failed on rank 1 of 2 (node 0, h, exit code 1): builtins.ValueError: "
                               "bad thing on 1\nTraceback")  # every rank recorded its error: no note
    _error(tmp_path, 1, 0.5, True, 2)
    assert isinstance(launch.job_error("grpo", tmp_path, 2, world_size=2), launch.LaunchUserError)  # no retry
    # rank 2 of 3 recorded nothing (killed by a signal?): the stage's error says so
    assert "[rank(s) 2 recorded no error" in str(launch.job_error("grpo", tmp_path, 1, world_size=3))
    empty = tmp_path / "none"
    empty.mkdir()
    assert "no rank recorded an error" in str(launch.job_error("sft", empty, -9, world_size=2))
