"""One computation at any scale: the grpo stage as users launch it, `grpo grpo` on 1 process against
`grpo grpo --set launch.processes_per_node=2` on 2 (a torchrun child job of the stage, CPU, gloo), from
the same inputs, gives the same samples, rewards and logged metrics and the same weights up to float summation
order.

The two runs share nothing but their inputs: each samples (every row from its own random stream, so the split
does not matter), scores, gathers and updates through the real stage, with the single-process savings on where
one process takes them (shared prompt, merged rows, the zero-advantage skip) and off under DDP.

Tolerance. Each weight moves by at most ~lr per step under AdamW (8e-4 over 4 steps at the default lr). The
same update in another float order (the row split, merged rows, the shared prompt) differs by a few 1e-6 after
4 steps: AdamW's g / sqrt(v) passes a relative difference of a small gradient on at full size (measured on the
default: 2.4e-6, the largest in an MLP weight). A real difference in the computation (rewards scaled per shard,
the ranks drawing alike) moves the weights by as much as the update itself (measured on the main this replaced:
1e-3). So: max |W_2 - W_1| <= 1e-5 absolute and <= 2% of max |W_end - W_start|.

bf16 (autocast) rounds every matmul's output to 8 bits of mantissa, so the float path itself (the shared prompt
or the full pass, the rows' padding) changes gradients by ~1e-2 relative, and from step 2 on a token drawn near
a boundary of its distribution may flip. There the first step must still agree exactly (the same samples, the
KL exactly 0), and the weights must be as close as one process's own two float paths are: the same run with the
single-process savings off (what DDP computes) is the noise floor, and 2 processes stay within 2x of it
(measured: 1.3e-3 against a floor of 8.9e-4, 1.7e-3 against 1.2e-3 for LoRA; the 2-process run is
as far from the savings-off run as from the savings-on one: every float path differs from every other by as
much). On this fresh-weights model bf16's floor is as large as the update itself, so the weights' bound catches
gross errors only: in bf16 the first step's exact agreement (samples, rewards, KL 0, loss, grad norm) is the
sharp check.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import processes
from tests.support.process_tree import kill_tree

pytestmark = pytest.mark.slow

# The default params with a short run: 4 steps, 8 prompts x 8 completions, the last step evaluated.
SHORT = ["grpo.steps=4", "grpo.prompts_per_step=8", "grpo.checkpoint_every=2", "grpo.eval_every=4",
         "grpo.eval_prompts=16", "task.n_train=400", "task.n_eval=40", "task.n_test=40"]
VARIANTS = {
    "default": [],
    # beta 0: one process skips zero-advantage rows; DDP computes them
    "group-dapo-dynamic-mu2": ["grpo.scale_rewards=group", "grpo.loss_type=dapo", "grpo.dynamic_sampling=true",
                               "grpo.beta=0.0", "grpo.mu=2", "grpo.epsilon_high=0.28", "grpo.micro_batch_size=24"],
    "none-drgrpo": ["grpo.scale_rewards=none", "grpo.loss_type=dr_grpo"],
    "bf16": ["model.precision=bf16"],
    # 2 processes shard the policy and the reference (FSDP2); one process has nothing to shard
    "fsdp2": ["model.sharding=fsdp2"],
    "lora-bf16-gspo": ["model.lora={r: 8, alpha: 16}", "model.precision=bf16",
                       "grpo.importance_sampling_level=sequence", "grpo.learning_rate=0.002"],
    # rollouts decoded in bf16 for an fp32 update: each process weights its rows (rollout correction)
    "bf16-rollouts-corrected": ["grpo.rollout_precision=bf16", "grpo.rollout_correction=token_truncate"],
    # one-step-off: each process decodes its share of the next step in the background, by the policy before the update
    "async-rollout": ["grpo.async_rollout=true"],
    # one process cuts its micro-batches by completion positions; two take micro_batch_size rows (named off)
    "micro-batch-tokens": ["grpo.micro_batch_tokens=24"],
}
CORRECTION_METRICS = ("sampling/importance_sampling_ratio/mean", "sampling/importance_sampling_ratio/clipped_frac",
                      "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max")
# logged per step, the same numbers whatever the layout (the others are timings, or count the savings)
# grad_norm: the gradient's scale (DDP's and FSDP2's mean over processes undone), which AdamW's m / sqrt(v) would hide
SAME_METRICS = ("reward", "reward_std", "kl", "loss", "grad_norm", "completions/mean_length", "frac_reward_zero_std",
                "clip_ratio/region_mean", "eval/accuracy", *CORRECTION_METRICS)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """data/validated from the real prepare and validate stages; a default-size starting policy (fresh weights:
    the weights, not its skill, are compared) and, as the reward model, the same weights scoring by likelihood."""
    return processes.build_inputs(tmp_path_factory.mktemp("dist-inputs"), SHORT)


def _grpo(inputs: Path, workdir: Path, n: int, extra: list[str], fresh: bool = True) -> tuple[dict, list[dict], str]:
    """The grpo stage through its CLI, as a user launches it (bench/processes.py); (weights, curve rows, output)."""
    weights, curve, out, _ = processes.run(inputs, workdir, n, SHORT + extra, fresh=fresh)
    return weights, curve, out


_max_diff = processes.max_diff


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_run_the_one_process_grpo_stage(inputs, tmp_path, variant):
    start = load_file(str(inputs / "models" / "sft" / "model.safetensors"))
    bf16 = "model.precision=bf16" in VARIANTS[variant]
    one, curve1, _ = _grpo(inputs, tmp_path / "one", 1, VARIANTS[variant])
    two, curve2, out2 = _grpo(inputs, tmp_path / "two", 2, VARIANTS[variant])
    assert "off on this layout, with the same update" in out2  # the plan says what DDP does without
    if os.environ.get("GRPO_LOG_DIR") is None:  # the ranks append to the command's log file
        (log_file,) = (tmp_path / "two" / "logs").glob("grpo-grpo-*.log")
        logged = log_file.read_text()
        assert "[rank 0] " in logged and "[rank 1] " in logged, logged[-3000:]

    assert len(curve1) == len(curve2) == 4
    bf16_rollouts = "grpo.rollout_precision=bf16" in VARIANTS[variant]
    corrected = bf16_rollouts or "grpo.async_rollout=true" in VARIANTS[variant]
    for curve in (curve1, curve2):  # the correction's metrics are there when it applies, and only then
        assert all((curve[0][k] != "") == corrected for k in CORRECTION_METRICS), curve[0]
    # bf16 rounds weights that differ by float noise after step 1 to other bf16 numbers: from then on the
    # log-probs (bf16 decoding's too) differ by bf16's noise, so only step 1 is compared number for number
    for r1, r2 in zip(curve1[:1] if bf16 or bf16_rollouts else curve1, curve2, strict=False):
        for k in SAME_METRICS:
            if r1.get(k, "") == "" and r2.get(k, "") == "":
                continue
            a, b = float(r1[k]), float(r2[k])
            tol = 1e-6 if k in ("reward", "reward_std", "completions/mean_length", "frac_reward_zero_std",
                                "eval/accuracy") else 1e-4 * max(abs(a), 1e-2)
            if k in CORRECTION_METRICS:  # the curve rounds to 6 decimals
                tol = max(1e-4 * abs(a), 2e-6)
            if bf16 and k == "grad_norm":  # bf16 gradients through another float path (measured: 1.3e-4 rel.)
                tol = 1e-3 * abs(a)
            assert abs(a - b) <= tol, f"step {r1['step']} {k}: 1 process {a}, 2 processes {b}"

    if "grpo.beta=0.0" not in VARIANTS[variant]:  # identical weights at step 1, one precision path: KL exactly 0
        assert float(curve1[0]["kl"]) == float(curve2[0]["kl"]) == 0.0

    moved = _max_diff(one, start)
    assert moved > 1e-4, "the update moved nothing: the test would pass vacuously"
    diff = _max_diff(one, two)
    print(f"{variant}: max |W_2proc - W_1proc| = {diff:.3g}, max |W_end - W_start| = {moved:.3g}")
    if bf16 or bf16_rollouts:  # within 2x of one process computing on another float path (the one DDP takes)
        full, _, _ = _grpo(inputs, tmp_path / "full", 1, VARIANTS[variant] + [
            "grpo.share_prompt=false", "grpo.merge_identical_rows=false"])
        floor = _max_diff(one, full)
        print(f"{variant}: bf16 floor, 1 process with and without the savings: {floor:.3g}")
        assert floor > 0 and diff <= 2 * floor, f"{variant}: 2 processes differ by {diff:.3g}, floor {floor:.3g}"
        return
    assert diff <= min(0.02 * moved, 1e-5), f"{variant}: the 2-process weights differ by {diff:.3g} (moved {moved:.3g})"


SHARDED = ["model.sharding=fsdp2", "grpo.eval_every=0", "grpo.steps=8"]


@pytest.fixture(scope="module")
def sharded_reference(inputs, tmp_path_factory):
    """An uninterrupted FSDP2 run on 2 processes: (weights, curve)."""
    weights, curve, _ = _grpo(inputs, tmp_path_factory.mktemp("sharded") / "reference", 2, SHARDED)
    return weights, curve


def _killed_at_first_checkpoint(inputs: Path, work: Path, n: int = 2, extra: list[str] = SHARDED) -> None:
    """A run on `n` processes (the sharded one by default), killed without warning (the stage, its launcher and
    the ranks) as soon as its first checkpoint is on disk."""
    processes.install(inputs, work)
    with (work / "victim.log").open("w") as log:
        victim = subprocess.Popen(processes.command(work, n, SHORT + extra), cwd=work, env=processes.env(),
                                  stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        while not list((work / "models" / "grpo_checkpoints").glob("*/step-000002")):
            assert victim.poll() is None, "ended before its first checkpoint:\n" + (work / "victim.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        kill_tree(victim.pid)
        victim.wait(timeout=60)
    assert not (work / "models" / "grpo").exists(), "killed mid-run: no final policy may exist yet"
    if "model.sharding=fsdp2" in extra:
        assert list((work / "models" / "grpo_checkpoints").glob("*/step-000002/shards/.metadata"))


def test_a_sharded_run_killed_mid_way_resumes_to_the_uninterrupted_weights(inputs, sharded_reference, tmp_path):
    """FSDP2 on 2 processes: each process writes its shards (torch.distributed.checkpoint), and a rerun after a
    kill reads them back, ending bit for bit where the uninterrupted run ends."""
    reference, ref_curve = sharded_reference
    work = tmp_path / "killed"
    _killed_at_first_checkpoint(inputs, work)
    resumed, curve, out = _grpo(inputs, work, 2, SHARDED, fresh=False)
    assert re.search(r"resuming GRPO from checkpoint \S+ at step [246] of 8", out), out[-3000:]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "resumed weights differ"
    drop = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_time")} for r in rows]  # noqa: E731
    assert drop(curve) == drop(ref_curve)


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(inputs, sharded_reference, tmp_path):
    """Written by 2 processes, resumed by 1: the shards are read back resharded (here: whole), and the run ends
    where the uninterrupted 2-process run ends, up to float order (the bound of the layout test above)."""
    reference, ref_curve = sharded_reference
    work = tmp_path / "killed"
    _killed_at_first_checkpoint(inputs, work)
    resumed, curve, out = _grpo(inputs, work, 1, SHARDED, fresh=False)
    assert re.search(r"resuming GRPO from checkpoint \S+ at step [246] of 8", out), out[-3000:]
    assert "was written by 2 processes, this run has 1" in out
    for r1, r2 in zip(curve, ref_curve, strict=True):
        assert float(r1["reward"]) == pytest.approx(float(r2["reward"]), abs=1e-6), r1["step"]
    start = load_file(str(inputs / "models" / "sft" / "model.safetensors"))
    moved, diff = _max_diff(reference, start), _max_diff(resumed, reference)
    assert diff <= min(0.02 * moved, 1e-5), f"resumed on 1 process: {diff:.3g} off (moved {moved:.3g})"


REPLICATED = ["grpo.eval_every=0", "grpo.steps=8"]


@pytest.fixture(scope="module")
def replicated_reference(inputs, tmp_path_factory):
    """An uninterrupted run on 1 process: its weights."""
    weights, _, _ = _grpo(inputs, tmp_path_factory.mktemp("replicated") / "reference", 1, REPLICATED)
    return weights


@pytest.mark.parametrize("written, resumed_on", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_a_checkpoint_resumes_on_another_number_of_processes(inputs, replicated_reference, tmp_path, written,
                                                             resumed_on):
    """Replicated (DDP) checkpoints hold the whole model: written on 2 processes and resumed on 1, or written on 1
    and resumed on 2, the run ends where the uninterrupted one-process run ends (the layout test's bound)."""
    work = tmp_path / "killed"
    _killed_at_first_checkpoint(inputs, work, written, REPLICATED)
    resumed, curve, out = _grpo(inputs, work, resumed_on, REPLICATED, fresh=False)
    assert re.search(r"resuming GRPO from checkpoint \S+ at step [246] of 8", out), out[-3000:]
    assert f"was written by {written} process" in out and f"this run has {resumed_on}" in out
    assert len(curve) == 8
    start = load_file(str(inputs / "models" / "sft" / "model.safetensors"))
    moved, diff = _max_diff(replicated_reference, start), _max_diff(resumed, replicated_reference)
    print(f"written on {written}, resumed on {resumed_on}: {diff:.3g} from the uninterrupted run (moved {moved:.3g})")
    assert diff <= min(0.02 * moved, 1e-5), f"{diff:.3g} off (moved {moved:.3g})"


def _two_node_launch(work: Path) -> list[str]:
    from infra.local_stack import free_port

    return ["launch.processes_per_node=1", "launch.nodes=2", f"launch.rdzv_endpoint=localhost:{free_port()}",
            f"launch.rdzv_id=test-{work.name}", "launch.join_timeout_s=120"]


def test_a_failure_on_another_node_fails_the_stage_at_once(inputs, tmp_path):
    """2 nodes x 1 process, rank 1 raises: wherever it runs, the other node's rank (waiting for it in a collective)
    stops within seconds (the failing rank tells the others through the launcher's store), and the stage on the
    leading node fails with rank 1's error."""
    work = tmp_path / "two-nodes-fault"
    processes.install(inputs, work)
    settings = SHORT + _two_node_launch(work) + [
        "grpo.reward_functions=[{name: 'tests.support.rank_faults:crash_on_rank_1', weight: 1.0}]"]
    env = processes.env()
    with (work / "node.log").open("w") as log:
        follower = subprocess.Popen(processes.command(work, 1, settings, stage="node"), cwd=work, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        leader = subprocess.run(processes.command(work, 1, settings), cwd=work, env=env, capture_output=True,
                                text=True, timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        kill_tree(follower.pid)
    out = leader.stdout + leader.stderr
    assert leader.returncode == 1, out[-4000:] + (work / "node.log").read_text()[-3000:]
    assert re.search(r"stage grpo failed on rank 1 of 2 \(node \d, \S+, exit code 1\): builtins.ZeroDivisionError: "
                     r"rank 1 divided by zero while scoring", out), out[-4000:]
    assert elapsed < 120, f"the stage took {elapsed:.0f} s to fail: a rank waited for its failed peer"


def test_two_nodes_on_one_machine_train_the_one_process_weights(inputs, tmp_path):
    """Two nodes x 1 process through c10d on localhost: the stage on one node (`grpo grpo` with launch.nodes=2),
    `grpo node` on the other, then `grpo node --release`; the same weights as 1 process within the layout bound."""
    one, _, _ = _grpo(inputs, tmp_path / "one", 1, [])
    work = tmp_path / "two-nodes"
    processes.install(inputs, work)
    launch = _two_node_launch(work)
    env = processes.env()
    follower_cmd = processes.command(work, 1, SHORT + launch, stage="node")
    with (work / "node.log").open("w") as log:
        follower = subprocess.Popen(follower_cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        leader = subprocess.run(processes.command(work, 1, SHORT + launch), cwd=work, env=env, capture_output=True,
                                text=True, timeout=600)
        out = leader.stdout + leader.stderr
        assert leader.returncode == 0, out[-5000:] + (work / "node.log").read_text()[-3000:]
        assert "stage grpo: 2 processes (1 per node x 2 nodes) under torch's launcher" in out
        assert follower.poll() is None, "the other node leaves only when released"
        release = subprocess.run([*processes.command(work, 1, SHORT + launch, stage="node"), "--release"], cwd=work,
                                 env=env, capture_output=True, text=True, timeout=300)
        assert release.returncode == 0, release.stdout[-3000:] + release.stderr[-3000:]
        assert follower.wait(timeout=120) == 0
    finally:
        kill_tree(follower.pid)
    node_log = (work / "node.log").read_text()
    # the other node ran one of the two ranks (which one, the rendezvous decides), then was released
    assert re.search(r"\[rank [01]\] ", node_log) and "released by the run's leader" in node_log
    two = load_file(str(work / "models" / "grpo" / "model.safetensors"))
    start = load_file(str(inputs / "models" / "sft" / "model.safetensors"))
    moved, diff = _max_diff(one, start), _max_diff(one, two)
    print(f"2 nodes x 1 process against 1 process: {diff:.3g} (moved {moved:.3g})")
    assert diff <= min(0.02 * moved, 1e-5), f"{diff:.3g} off (moved {moved:.3g})"


@pytest.mark.parametrize("fault, code, message", [
    ("crash_on_rank_1", 1, r"stage grpo failed on rank 1 of 2 \(node 0, \S+, exit code 1\): "
     r"builtins.ZeroDivisionError: rank 1 divided by zero while scoring"),
    ("bad_data_on_rank_1", 2, r"grpo grpo: error: stage grpo failed on rank 1 of 2 \(node 0, \S+, exit code 2\): "
     r"rank 1 found a reward it cannot read"),
])
def test_a_failure_on_any_rank_fails_the_stage_with_that_ranks_error(inputs, tmp_path, fault, code, message):
    """Rank 1 raises while rank 0 waits for it in a collective: the launcher stops rank 0 at once, and the stage
    fails with rank 1's error and exit code (a user error stays one: exit code 2, no retry)."""
    work = tmp_path / fault
    processes.install(inputs, work)
    t0 = time.monotonic()
    proc = subprocess.run(processes.command(work, 2, SHORT + [
        f"grpo.reward_functions=[{{name: 'tests.support.rank_faults:{fault}', weight: 1.0}}]"]), cwd=work,
        env=processes.env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-4000:]
    assert re.search(message, out), out[-4000:]
    assert time.monotonic() - t0 < 120, "rank 0 waited for its peer until a timeout"
    assert not (work / "models" / "grpo").exists()
    assert not list((work / "models" / ".launch").glob("*")), "the job's files are cleaned up"
    if os.environ.get("GRPO_LOG_DIR") is None:  # the rank's own traceback, in the log file of the command
        (log_file,) = (work / "logs").glob("grpo-grpo-*.log")
        logged = log_file.read_text()
        assert re.search(r"\[rank 1\] .*ERROR grpo\.trace: traceback", logged), logged[-3000:]
