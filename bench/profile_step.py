"""Where the time of one GRPO step goes, ours and TRL's, phase by phase (the settings of bench/grpo_vs_trl.py).

    python bench/profile_step.py                       # both, tiny model, CPU, a table of seconds per step
    python bench/profile_step.py --impl ours --cprofile 30

Each implementation runs in its own subprocess. The functions each step calls are wrapped with timers (wall and
CPU time, *exclusive*: a phase nested in another, e.g. TRL's policy log-probs inside `_compute_loss`, is charged
to itself only); "other" is the rest of the step (bookkeeping, metrics, the Trainer loop, the data loader).

  phase                          ours (grpo_steps.grpo.trainer)        TRL (trl.GRPOTrainer)
  sample (generate)              sample_groups (tokenize + generate    _generate_single_turn (pad + generate +
                                 + masks + decode)                     masks); TRL's decode is in "other"
  rewards + advantages           score_completions, group_advantages   _calculate_rewards (advantages: "other")
  reference log-probs (no grad)  rollout_logps under no_grad           _get_per_token_logps_and_entropies, no_grad
  policy log-probs forward       rollout_logps with grad               the same, with grad
  loss                           policy_loss                           _compute_loss minus its log-probs
  backward                       accelerator.backward                  accelerator.backward
  grad clip + optimizer          clip_grad_norm_, optimizer.step,      clip_grad_norm_, optimizer.step,
                                 zero_grad                             zero_grad, lr_scheduler.step
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.grpo_vs_trl import (  # noqa: E402  (after the path set-up)
    _load,
    _sync,
    add_step_arguments,
    build_ours,
    build_trl,
    micro_batch_text,
    prepare_model_dir,
    step_settings,
)

PHASES = ("sample (generate)", "rewards + advantages", "reference log-probs (no grad)", "policy log-probs forward",
          "loss", "backward", "grad clip + optimizer", "other")


class PhaseTimer:
    """Exclusive wall and CPU seconds per phase, from wrapped callables that may nest."""

    def __init__(self, sync=None) -> None:
        self.sync = sync  # e.g. torch.cuda.synchronize: without it, GPU time lands in whichever phase waits
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open phase: [wall, cpu] spent in nested phases
        self.enabled = False

    def wrap(self, fn, phase: str | None = None, choose=None):
        """`fn` timed as `phase` (or `choose()`'s phase, decided at call time)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            name = phase if phase is not None else choose()
            self._stack.append([0.0, 0.0])
            if self.sync is not None:
                self.sync()
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync is not None:
                    self.sync()
                w, c = time.perf_counter() - w0, time.process_time() - c0
                nested_w, nested_c = self._stack.pop()
                self.wall[name] = self.wall.get(name, 0.0) + w - nested_w
                self.cpu[name] = self.cpu.get(name, 0.0) + c - nested_c
                if self._stack:
                    self._stack[-1][0] += w
                    self._stack[-1][1] += c

        return timed


def _logps_phase() -> str:
    import torch

    return "policy log-probs forward" if torch.is_grad_enabled() else "reference log-probs (no grad)"


def profile_ours(s: dict[str, Any], model_dir: Path, timer: PhaseTimer, profiler) -> list[tuple[float, float]]:
    import grpo_steps.grpo.trainer as T

    for name, phase in (("sample_groups", "sample (generate)"), ("score_completions", "rewards + advantages"),
                        ("group_advantages", "rewards + advantages"), ("policy_loss", "loss")):
        setattr(T, name, timer.wrap(getattr(T, name), phase))
    # every log-prob pass (reference, old, update) goes through `rollout_logps`: the shared-prompt pass or the full
    T.rollout_logps = timer.wrap(T.rollout_logps, choose=_logps_phase)
    trainer, sampler = build_ours(s, model_dir)
    acc, opt = trainer.accelerator, trainer.optimizer
    acc.backward = timer.wrap(acc.backward, "backward")
    acc.clip_grad_norm_ = timer.wrap(acc.clip_grad_norm_, "grad clip + optimizer")
    opt.step = timer.wrap(opt.step, "grad clip + optimizer")
    opt.zero_grad = timer.wrap(opt.zero_grad, "grad clip + optimizer")
    steps = []
    for i in range(s["warmup_steps"] + s["steps"]):
        timed = i >= s["warmup_steps"]
        timer.enabled = timed
        if timed and profiler is not None:
            profiler.enable()
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(sampler.next(trainer.cfg.prompts_per_step))
        _sync(s["device"])
        if timed:
            steps.append((time.perf_counter() - w0, time.process_time() - c0))
        if profiler is not None:
            profiler.disable()
    return steps


def profile_trl(s: dict[str, Any], model_dir: Path, timer: PhaseTimer, profiler) -> list[tuple[float, float]]:
    from transformers import TrainerCallback

    steps: list[tuple[float, float]] = []
    last = [0.0, 0.0]

    class Hooks(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            for obj, name in ((optimizer, "step"), (optimizer, "zero_grad"), (lr_scheduler, "step")):
                setattr(obj, name, timer.wrap(getattr(obj, name), "grad clip + optimizer"))

        def on_step_end(self, args, state, control, **kwargs):
            _sync(s["device"])
            now = [time.perf_counter(), time.process_time()]
            if state.global_step > s["warmup_steps"]:
                steps.append((now[0] - last[0], now[1] - last[1]))
            if state.global_step == s["warmup_steps"]:
                timer.enabled = True
                if profiler is not None:
                    profiler.enable()
            if state.global_step == s["warmup_steps"] + s["steps"] and profiler is not None:
                profiler.disable()
            last[:] = now

    with tempfile.TemporaryDirectory(prefix="grpo-profile-trl-") as out:
        trainer = build_trl(s, model_dir, out, [], [Hooks()])
        for name, phase in (("_generate_single_turn", "sample (generate)"),
                            ("_calculate_rewards", "rewards + advantages"), ("_compute_loss", "loss")):
            setattr(trainer, name, timer.wrap(getattr(trainer, name), phase))
        trainer._get_per_token_logps_and_entropies = timer.wrap(trainer._get_per_token_logps_and_entropies,
                                                                choose=_logps_phase)
        acc = trainer.accelerator
        acc.backward = timer.wrap(acc.backward, "backward")
        acc.clip_grad_norm_ = timer.wrap(acc.clip_grad_norm_, "grad clip + optimizer")
        trainer.train()
    return steps


def child(impl: str, s: dict[str, Any], model_dir: Path, cprofile: int, result_file: Path) -> None:
    import cProfile
    import io
    import pstats

    import torch

    if s["threads"] > 0:
        torch.set_num_threads(s["threads"])
    timer = PhaseTimer(torch.cuda.synchronize if s["device"] == "cuda" else None)
    profiler = cProfile.Profile() if cprofile else None
    steps = (profile_ours if impl == "ours" else profile_trl)(s, model_dir, timer, profiler)
    n = len(steps)
    step_wall, step_cpu = sum(w for w, _ in steps) / n, sum(c for _, c in steps) / n
    wall = {k: v / n for k, v in timer.wall.items()}
    cpu = {k: v / n for k, v in timer.cpu.items()}
    wall["other"] = step_wall - sum(wall.values())
    cpu["other"] = step_cpu - sum(cpu.values())
    result = {"impl": impl, "steps": n, "step_wall_s": step_wall, "step_cpu_s": step_cpu, "wall": wall, "cpu": cpu}
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(cprofile)
        result["cprofile"] = buf.getvalue()
    result_file.write_text(json.dumps(result))


def table(results: list[dict[str, Any]], key: str) -> str:
    names = {"ours": "ours", "trl": "TRL"}
    header = ["phase"] + [f"{names[r['impl']]} ({key} ms/step)" for r in results]
    total_key = "step_wall_s" if key == "wall" else "step_cpu_s"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for phase in PHASES:
        cells = []
        for r in results:
            v = r[key].get(phase, 0.0)
            cells.append(f"{1000 * v:.1f} ({100 * v / r[total_key]:.0f}%)")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| **step** | " + " | ".join(f"**{1000 * r[total_key]:.1f}**" for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--impl", choices=("ours", "trl", "both"), default="both")
    add_step_arguments(p, steps=5, warmup_steps=2)
    p.add_argument("--cprofile", type=int, default=0, help="also print the top N functions by cumulative time")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.settings_json), args.model_dir, args.cprofile, args.result_file)
        return 0
    settings = step_settings(args)
    impls = ("ours", "trl") if args.impl == "both" else (args.impl,)
    load_before, results = _load(), []
    with tempfile.TemporaryDirectory(prefix="grpo-profile-") as tmp:
        model_dir = Path(tmp) / "model"
        prepare_model_dir(args, model_dir)
        for impl in impls:
            result_file = Path(tmp) / f"{impl}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--model-dir", str(model_dir),
                   "--settings-json", json.dumps(settings), "--result-file", str(result_file),
                   "--cprofile", str(args.cprofile)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                return 1
            results.append(json.loads(result_file.read_text()))
    print(f"{args.model_preset} model, {args.device}, P={args.prompts_per_step} x G={args.num_generations}, "
          f"completion length {args.completion_length}, beta {args.beta}, reward {args.reward}, "
          f"{micro_batch_text(args)}, ours: backend {args.generation_backend}, share_prompt "
          f"{args.share_prompt}, merge rows {args.merge_identical_rows}, "
          f"{'LoRA on bf16 weights' if args.lora_bf16 else 'fp32'}; {args.threads or 'default'} thread(s); "
          f"mean over {args.steps} steps after {args.warmup_steps} warm-up; load average before {load_before}, "
          f"after {_load()}\n")
    print(table(results, "wall") + "\n")
    print(table(results, "cpu"))
    for r in results:
        if "cprofile" in r:
            print(f"\n### cProfile, {r['impl']}\n{r['cprofile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
