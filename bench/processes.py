"""What a run on several processes costs and computes, against one process: the grpo stage launched as users
launch it (`grpo grpo`; `grpo grpo --set launch.processes_per_node=2`, a torchrun child job, DDP over gloo; the
same with `model.sharding=fsdp2`), from the same inputs, each in a directory of its own.

Prints one row per layout: wall time of the stage (process start included), mean step time, and the largest
weight difference to the one-process run next to the largest weight change of that run.

    python bench/processes.py                          # default params, 20 steps, 1 / 2 DDP / 2 FSDP2
    python bench/processes.py --steps 50 --set grpo.prompts_per_step=16 --out reports/processes.json

The inputs: data from the real prepare and validate stages, a default-size starting policy with fresh weights,
and the same weights as the likelihood reward model (the layouts are compared, not the policy's skill).
tests/platform/test_distributed.py uses the same launch and inputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# no GPU, unbuffered; threads per process are set per run (`env`)
ENV = {"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
LAYOUTS = {"1 process": (1, []), "2 processes, DDP": (2, []), "2 processes, FSDP2": (2, ["model.sharding=fsdp2"])}


def build_inputs(base: Path, overrides: list[str], reward_model: bool = True) -> Path:
    """data/validated, models/sft (and, with `reward_model`, models/reward) in `base` (see the module
    docstring)."""
    import torch

    from grpo_steps.platform.config import load_config
    from grpo_steps.platform.modeling import build_policy, load_tokenizer
    from grpo_steps.stages import run_stage

    shutil.copy(ROOT / "params.yaml", base / "params.yaml")
    cwd = Path.cwd()
    os.chdir(base)
    try:
        cfg = load_config("params.yaml", overrides + [f"tracking.tracking_uri=sqlite:///{base}/mlflow.db"])
        run_stage("prepare", cfg)
        run_stage("validate", cfg)
        tok = load_tokenizer(cfg.paths.tokenizer())
        torch.manual_seed(0)
        policy = build_policy(cfg.model, tok)
        for out in (cfg.paths.sft_policy(), *([cfg.paths.reward_model()] if reward_model else [])):
            policy.save_pretrained(str(out), safe_serialization=True)
            tok.save_pretrained(str(out))
    finally:
        os.chdir(cwd)
    return base


def install(inputs: Path, workdir: Path) -> None:
    """A fresh project directory holding the inputs (data/validated and the models there are)."""
    workdir.mkdir(parents=True)
    shutil.copy(inputs / "params.yaml", workdir / "params.yaml")
    shutil.copytree(inputs / "data" / "validated", workdir / "data" / "validated")
    for m in ("tokenizer", "sft", "reward"):
        if (inputs / "models" / m).is_dir():
            shutil.copytree(inputs / "models" / m, workdir / "models" / m)


def command(workdir: Path, processes: int, overrides: list[str], stage: str = "grpo") -> list[str]:
    """`grpo <stage>` as a user runs it, on `processes` processes (launch.processes_per_node: torch's launcher
    starts them when more than one)."""
    settings = [*overrides, f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
                f"launch.processes_per_node={processes}"]
    return [sys.executable, "-m", "grpo_steps.cli", stage, "--params", "params.yaml",
            *[x for o in settings for x in ("--set", o)]]


def env(threads: int = 1) -> dict[str, str]:
    """The launch's environment: no GPU, `threads` per process, this project importable, and no tracking URI
    of the caller's (each run tracks in its own directory)."""
    out = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT)}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def run(inputs: Path, workdir: Path, processes: int, overrides: list[str], fresh: bool = True, threads: int = 1
        ) -> tuple[dict, list[dict], str, float]:
    """The grpo stage in `workdir`, `threads` torch threads per process: (final weights, the curve's rows, its
    output, wall seconds)."""
    from safetensors.torch import load_file

    if fresh:
        install(inputs, workdir)
    t0 = time.perf_counter()
    proc = subprocess.run(command(workdir, processes, overrides), cwd=workdir, env=env(threads),
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"grpo on {processes} process(es) failed ({proc.returncode}):\n{out[-6000:]}")
    with (workdir / "reports" / "grpo_steps.csv").open() as f:
        curve = list(csv.DictReader(f))
    return load_file(str(workdir / "models" / "grpo" / "model.safetensors")), curve, out, wall


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"different weights: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="grpo steps per run (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every run, e.g. --set grpo.prompts_per_step=16")
    p.add_argument("--cores", type=int, default=2, help="cores to use: threads of the one process, processes "
                   "x threads of the others (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args()
    overrides = ["task.n_train=400", "task.n_eval=40", "task.n_test=40", f"grpo.steps={args.steps}",
                 "grpo.eval_every=0", "grpo.checkpoint_every=0", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="grpo-processes-") as tmp:
        inputs = build_inputs(Path(tmp), overrides)
        start = None
        one = None
        for name, (n, extra) in LAYOUTS.items():
            # the same cores either way: one process with a thread per core, or a process per core
            weights, curve, _, wall = run(inputs, Path(tmp) / name.replace(" ", "_").replace(",", ""), n,
                                          overrides + extra, threads=max(1, args.cores // n))
            if one is None:
                from safetensors.torch import load_file

                start = load_file(str(inputs / "models" / "sft" / "model.safetensors"))
                one = weights
            step = sum(float(r["step_time"]) for r in curve) / len(curve)
            rows.append({"layout": name, "wall_s": round(wall, 1), "step_s": round(step, 3),
                         "max_abs_dw_vs_1": max_diff(weights, one), "max_abs_update": max_diff(one, start)})
    base = rows[0]
    print(f"grpo stage, {args.steps} steps, on {args.cores} cores ({' '.join(args.overrides) or 'default params'})")
    print("| layout | wall (s) | step (s) | step vs 1 process | max abs dW vs 1 process | max abs update |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['wall_s']} | {r['step_s']} | {r['step_s'] / base['step_s']:.2f}x | "
              f"{r['max_abs_dw_vs_1']:.2g} | {r['max_abs_update']:.2g} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
