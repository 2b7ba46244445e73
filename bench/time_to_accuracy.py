"""Time to accuracy: our GRPO stage and TRL's GRPOTrainer, from the same starting policy, rewards, data and seed,
held-out greedy accuracy on the eval split against training wall time.

    python bench/time_to_accuracy.py                                   # the default params, ~25 min on 2 cores
    python bench/time_to_accuracy.py --steps 60 --eval-every 10 --out reports/time_to_accuracy
    python bench/time_to_accuracy.py --set grpo.beta=0 --set grpo.dynamic_sampling=true   # ours with DAPO sampling
    python bench/time_to_accuracy.py --inputs .      # reuse models/sft, models/reward, data/validated of a run

Set-up (once, in a temporary directory unless `--inputs` names one that has them): the pipeline's own prepare,
validate, sft and train_reward stages for the params, so both trainers start from the same models/sft, score with
the same reward functions (grpo.reward_functions: the trained reward model and the verifiable ones, the very
Python objects the grpo stage builds, with their weights) and read the same rendered prompts.

Each trainer then runs in its own subprocess, with the same torch thread count (`--threads`):
  * ours: the grpo stage itself (`train_grpo`) with `grpo.eval_every`, so the accuracy is its own evaluation;
  * TRL: `trl.GRPOTrainer` with every setting of the params' grpo section that TRL has (prompts x G per
    generation batch as micro-batches x gradient accumulation, mu as num_iterations, loss type, beta, clip range,
    reward scaling and weights, temperature, learning rate, constant schedule, AdamW, gradient clipping, seed),
    bf16 off, TRL's gradient checkpointing as model.activation_checkpointing, `use_bias_correction_kl=False`
    (the plain k3 penalty, as ours), bookkeeping off. A callback evaluates it with the same evaluator object
    (grpo_steps/stages/training_eval.py: greedy decoding, the judge the evaluate stage uses) every `--eval-every` steps.
Settings TRL has no equivalent for (grpo.dynamic_sampling, grpo.skip_zero_advantage) apply to ours only.

Time: training only, on both sides: the sum of step times (ours: each step's `step_time`, sampling to optimizer
step; TRL: `on_step_begin` to `on_step_end`, which spans its generation, scoring and update), so evaluation is
not counted for either. Time to target: the training time at the first evaluation whose accuracy reaches
`start + --target-gain` (the start measured once, on the starting policy, by each side's evaluator: the same).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_k, _v)

SETUP_STAGES = ("prepare", "validate", "sft", "train_reward")
IMPLEMENTATIONS = ("ours", "trl")
LABELS = {"ours": "ours (grpo stage)", "trl": "TRL GRPOTrainer"}


def _overrides(args) -> list[str]:
    return [*args.set, f"grpo.steps={args.steps}", f"grpo.eval_every={args.eval_every}",
            "grpo.checkpoint_every=0", "grpo.select_best=false",
            *([f"grpo.eval_prompts={args.eval_prompts}"] if args.eval_prompts else [])]


def _config(args, workdir: Path):
    from grpo_steps.platform.config import load_config

    return load_config(str(workdir / "params.yaml"), [*_overrides(args),
                                                      f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db"])


def set_up(args, workdir: Path) -> None:
    """The grpo stage's inputs in `workdir`, made by the pipeline's own stages (skipped where they exist)."""
    if not (workdir / "params.yaml").is_file():
        shutil.copy(args.params, workdir / "params.yaml")
    cfg = _config(args, workdir)
    have = all((workdir / p).exists() for p in (cfg.paths.sft_policy(), cfg.paths.reward_model(),
                                                cfg.paths.validated_file("eval")))
    if have:
        return
    for stage in SETUP_STAGES:
        cmd = [sys.executable, "-m", "grpo_steps.cli", stage, "--params", "params.yaml",
               *[x for o in _overrides(args) for x in ("--set", o)],
               "--set", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db"]
        print(f"set-up: grpo {stage}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"set-up stage {stage} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


# ----------------------------------------------------------------------------------------------------------------
# children


def run_ours(cfg) -> dict[str, Any]:
    import csv

    from grpo_steps.stages.grpo import train_grpo

    result = train_grpo(cfg, progress=False)
    curve = list(csv.DictReader(cfg.paths.grpo_curve().open()))
    points, elapsed = [(0, 0.0, float(result.tags["eval_start_accuracy"]))], 0.0
    for row in curve:
        elapsed += float(row["step_time"])
        if row.get("eval/accuracy"):
            points.append((int(row["step"]), elapsed, float(row["eval/accuracy"])))
    return {"points": points}


def _trl_reward(fn, name: str):
    """Our reward function as TRL calls it: keyword arguments, `completion_ids` for the completion lengths."""

    def reward(prompts, completions, completion_ids, **kwargs):
        columns = {k: v for k, v in kwargs.items() if k not in ("trainer_state", "log_extra", "log_metric")}
        columns["completion_lengths"] = [len(ids) for ids in completion_ids]
        return fn(prompts, completions, **columns)

    reward.__name__ = name
    return reward


def run_trl(cfg, out_dir: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_steps.grpo.rewards import function_name
    from grpo_steps.platform.modeling import load_tokenizer, seed_everything
    from grpo_steps.stages.grpo import build_reward_functions, reward_model_of, training_rows
    from grpo_steps.stages.training_eval import TrainingEval

    g = cfg.grpo
    tok = load_tokenizer(cfg.paths.sft_policy())
    rows = training_rows(cfg, tok)  # the grpo stage's own rows, prompts rendered as it renders them
    funcs, weights = build_reward_functions(cfg, tok)
    evaluator = TrainingEval(cfg, tok, reward_model_of(funcs))
    generation_batch = g.prompts_per_step * g.num_generations
    micro = min(g.micro_batch_size, generation_batch)
    if generation_batch % micro:
        raise SystemExit(f"TRL needs micro_batch_size ({micro}) to divide prompts x G ({generation_batch})")
    args = GRPOConfig(
        output_dir=out_dir, report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=generation_batch // micro,
        num_generations=g.num_generations, num_iterations=g.mu, max_steps=g.steps,
        max_completion_length=g.max_completion_length, temperature=g.temperature, top_k=0, top_p=1.0,
        use_vllm=False, learning_rate=g.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm, optim="adamw_torch", beta=g.beta,
        epsilon=g.epsilon, epsilon_high=g.epsilon_high, loss_type=g.loss_type, scale_rewards=g.scale_rewards,
        importance_sampling_level=g.importance_sampling_level, mask_truncated_completions=g.mask_truncated_completions,
        reward_weights=list(weights), use_bias_correction_kl=False,
        activation_checkpointing=cfg.model.activation_checkpointing, logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, log_completions=False, dataloader_num_workers=0, seed=cfg.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(str(cfg.paths.sft_policy()), use_safetensors=True,
                                                 dtype=torch.float32)
    points: list[tuple[int, float, float]] = []
    clock = {"elapsed": 0.0, "t0": 0.0}

    class Evaluate(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            points.append((0, 0.0, evaluator(model)["eval/accuracy"]))

        def on_step_begin(self, args, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            clock["elapsed"] += time.perf_counter() - clock["t0"]
            if state.global_step % cfg.grpo.eval_every == 0 or state.global_step == g.steps:
                points.append((state.global_step, clock["elapsed"], evaluator(model)["eval/accuracy"]))

    seed_everything(cfg.seed)
    trainer = GRPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
                          reward_funcs=[_trl_reward(f, function_name(f)) for f in funcs], callbacks=[Evaluate()])
    if trainer.args.steps_per_generation * micro != generation_batch:
        raise SystemExit(f"TRL's generation batch is {trainer.args.steps_per_generation * micro} rows, ours "
                         f"{generation_batch}")
    trainer.train()
    return {"points": points}


def child(impl: str, args, workdir: Path, result: Path) -> None:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.chdir(workdir)
    cfg = _config(args, workdir)
    with tempfile.TemporaryDirectory(prefix="tta-") as out:
        data = run_ours(cfg) if impl == "ours" else run_trl(cfg, out)
    result.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------------------------
# parent


def time_to_target(points: list[list[float]], target: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches `target` (None: never)."""
    return next((t for _, t, acc in points if acc >= target - 1e-9), None)


def report(results: dict[str, dict[str, Any]], gain: float) -> tuple[str, dict[str, Any]]:
    start = results["ours"]["points"][0][2]
    target = start + gain
    reached = {impl: time_to_target(results[impl]["points"], target) for impl in IMPLEMENTATIONS}
    ratio = reached["ours"] / reached["trl"] if reached["ours"] is not None and reached["trl"] else None
    steps = sorted({p[0] for impl in IMPLEMENTATIONS for p in results[impl]["points"]})
    by = {impl: {p[0]: p for p in results[impl]["points"]} for impl in IMPLEMENTATIONS}
    lines = ["| step | ours: accuracy | ours: training s | TRL: accuracy | TRL: training s |",
             "|---:|---:|---:|---:|---:|"]
    for s in steps:
        cells = []
        for impl in IMPLEMENTATIONS:
            p = by[impl].get(s)
            cells += [f"{p[2]:.3f}", f"{p[1]:.0f}"] if p else ["-", "-"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")

    def fmt(t):
        return "not reached" if t is None else f"{t:.0f} s"

    lines += ["", f"start accuracy {start:.3f} (ours) / {results['trl']['points'][0][2]:.3f} (TRL); target "
              f"{target:.3f} (start + {gain * 100:.0f} points)",
              f"time to target: ours {fmt(reached['ours'])}, TRL {fmt(reached['trl'])}"
              + (f"; ratio ours/TRL {ratio:.2f}x" if ratio is not None else "")]
    return "\n".join(lines), {"start": start, "target": target, "time_to_target_s": reached, "ratio": ratio}


def plot(results: dict[str, dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for impl, color in (("ours", "tab:green"), ("trl", "tab:blue")):
        pts = results[impl]["points"]
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", ms=3, color=color, label=LABELS[impl])
    ax.axhline(target, ls="--", color="gray", lw=1, label="target")
    ax.set(xlabel="training wall time (s)", ylabel="held-out greedy accuracy", title="Time to accuracy",
           ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, for both trainers")
    p.add_argument("--steps", type=int, default=100, help="GRPO steps of each trainer (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (default: %(default)s)")
    p.add_argument("--eval-prompts", type=int, help="eval prompts per evaluation (default: the whole eval split)")
    p.add_argument("--target-gain", type=float, default=0.15, help="target = start accuracy + this (default 0.15)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each child (default: %(default)s)")
    p.add_argument("--inputs", type=Path, help="a folder with the grpo stage's inputs (made there if missing)")
    p.add_argument("--out", type=Path, help="write <out>.md, <out>.json and <out>.png")
    p.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args, args.workdir, args.result)
        return 0
    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as tmp:
        workdir = (args.inputs or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        set_up(args, workdir)
        results = {}
        for impl in IMPLEMENTATIONS:
            print(f"running {impl} ...", file=sys.stderr, flush=True)
            out = Path(tmp) / f"{impl}.json"
            passthrough = [x for o in args.set for x in ("--set", o)]
            cmd = [sys.executable, __file__, "--child", impl, "--workdir", str(workdir), "--result", str(out),
                   "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--threads", str(args.threads),
                   *passthrough, *(["--eval-prompts", str(args.eval_prompts)] if args.eval_prompts else [])]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"the {impl} child failed (exit {proc.returncode})")
            results[impl] = json.loads(out.read_text())
            results[impl]["process_s"] = time.perf_counter() - t0
    table, summary = report(results, args.target_gain)
    head = (f"Time to accuracy, {args.steps} GRPO steps, eval every {args.eval_every}; params {args.params.name}"
            f"{' ' + ' '.join(args.set) if args.set else ''}; {platform.machine()}, {os.cpu_count()} cores, "
            f"{args.threads} torch threads")
    print(head + "\n\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(head + "\n\n" + table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"results": results, "summary": summary}, indent=2))
        plot(results, summary["target"], args.out.with_suffix(".png"))
    return 0 if all(math.isfinite(p[2]) for r in results.values() for p in r["points"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
