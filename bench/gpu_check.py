"""The prepared GPU check (`make gpu-check`): on one CUDA GPU, offline, in under 10 minutes, what CPUs cannot show,
printed as one table.

    python bench/gpu_check.py                       # CUDA; without a CUDA device: says so and exits 0
    python bench/gpu_check.py --device cpu --quick  # the same checks on CPU, toy sizes (tests/bench)
    python bench/gpu_check.py --out reports/gpu_check.json

1. the `gpu`-marked tests (tests/gpu: models placed and trained on cuda, bf16);
2. a shortened default pipeline, `grpo run` in a fresh directory, with `launch.processes_per_node: auto` (one
   process per visible GPU: a torchrun child job per training stage when there are several);
3. the memory of one GRPO step at Qwen2.5-0.5B's shape: fp32 full fine-tune against LoRA + bf16, ours
   (bench/memory_table.py) and TRL's next to ours (bench/grpo_vs_trl.py, the same settings on both sides).

Each check runs in a subprocess with its own time limit; a failed one is a row saying why, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
# The shortened default pipeline: the default model and task, fewer steps.
PIPELINE = ["sft.max_steps=600", "reward_model.epochs=1", "grpo.steps=30", "grpo.eval_every=10",
            "launch.processes_per_node=auto"]
# --quick: toy sizes, for a CPU run of every check
QUICK_PIPELINE = ["task.n_train=400", "task.n_eval=40", "task.n_test=60", "task.n_preference_pairs=200",
                  "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
                  "reward_model.epochs=1", "reward_model.min_pairwise_accuracy=0.0", "sft.max_steps=20",
                  "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.num_generations=4", "evaluate.pass_k=2",
                  "launch.processes_per_node=auto"]


class Row(dict):
    """One line of the table: check, result, detail."""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), **extra}


def _run(cmd: list[str], timeout: int, cwd: Path = ROOT, env: dict[str, str] | None = None
         ) -> tuple[subprocess.CompletedProcess | None, float, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, time.perf_counter() - t0, f"timed out after {timeout} s\n{out[-1500:]}"
    return proc, time.perf_counter() - t0, proc.stdout + proc.stderr


def _failed(check: str, seconds: float, out: str) -> Row:
    last = [line for line in out.strip().splitlines() if line.strip()][-3:]
    return Row(check=check, result="FAILED", detail=f"{seconds:.0f} s: " + " / ".join(last)[-400:])


def device_row(device: str) -> Row:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        detail = (f"{torch.cuda.device_count()} visible, {memory:.0f} GiB; torch {torch.__version__}, "
                  f"CUDA {torch.version.cuda}")
    else:
        name = "CPU (no CUDA)"
        detail = f"{os.cpu_count()} cores; torch {torch.__version__}"
    return Row(check="device", result=name, detail=detail)


def gpu_tests(timeout: int) -> Row:
    proc, seconds, out = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                               "tests/gpu"], timeout)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    summary = re.findall(r"(\d+ (?:passed|failed|skipped|error)s?)", last)
    if proc is None or proc.returncode not in (0, 5):
        return _failed("gpu-marked tests (tests/gpu)", seconds, out)
    return Row(check="gpu-marked tests (tests/gpu)", result=", ".join(summary) or "none collected",
               detail=f"{seconds:.0f} s")


def pipeline(overrides: list[str], timeout: int) -> Row:
    """`grpo run` in a fresh directory: the flow, every stage, registration."""
    check = "shortened default pipeline (grpo run, launch.processes_per_node auto)"
    with tempfile.TemporaryDirectory(prefix="grpo-gpu-check-") as tmp:
        work = Path(tmp)
        shutil.copy(ROOT / "params.yaml", work / "params.yaml")
        cmd = [sys.executable, "-m", "grpo_steps.cli", "run",
               *[x for o in [*overrides, f"tracking.tracking_uri=sqlite:///{work}/mlflow.db"] for x in ("--set", o)]]
        env = _env(PREFECT_HOME=str(work / ".prefect"))
        env.pop("PREFECT_API_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        proc, seconds, out = _run(cmd, timeout, cwd=work, env=env)
        if proc is None or proc.returncode != 0:
            return _failed(check, seconds, out)
        metrics = json.loads((work / "reports" / "metrics.json").read_text())
        rm = json.loads((work / "reports" / "reward_model.json").read_text())
        launched = re.search(r"stage grpo: (\d+) processes", out)
        processes = int(launched.group(1)) if launched else 1
        start, grpo = metrics["start"]["accuracy"], metrics["grpo"]["accuracy"]
        return Row(check=check, result=f"accuracy {start:.3f} -> {grpo:.3f} ({100 * (grpo - start):+.1f} points)",
                   detail=f"{seconds:.0f} s; grpo on {processes} process(es); reward model held-out "
                          f"{rm['pairwise_accuracy']:.3f}; registered")


def our_memory(device: str, preset: str, timeout: int) -> list[Row]:
    """Ours: bench/memory_table.py's fp32 full fine-tune and LoRA + bf16 (chunked log-probs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "memory.json"
        proc, seconds, out = _run([sys.executable, str(ROOT / "bench" / "memory_table.py"), "--device", device,
                                   "--preset", preset, "--variants", "fp32-full", "lora-bf16-chunked",
                                   "--json", str(out_file)], timeout)
        if proc is None or proc.returncode != 0:
            return [_failed(f"memory, {preset}, ours", seconds, out)]
        results = json.loads(out_file.read_text())["results"]
    names = {"fp32-full": "fp32, full fine-tune", "lora-bf16-chunked": "LoRA r=16 + bf16, chunked log-probs"}
    return [Row(check=f"memory, {preset} shape, ours, {names[r['variant']]}",
                result=f"{r['peak_bytes'] / 2**30:.2f} GiB",
                detail=f"one step {r['seconds']:.1f} s; {r['trainable'] / 1e6:.1f} M trainable") for r in results]


def trl_memory(device: str, preset: str, lora_bf16: bool, timeout: int) -> list[Row]:
    """Ours and TRL's GRPO step side by side (bench/grpo_vs_trl.py), fp32 full or LoRA + bf16."""
    kind = "LoRA r=16 + bf16" if lora_bf16 else "fp32, full fine-tune"
    with tempfile.TemporaryDirectory() as tmp:
        stem = Path(tmp) / "vs_trl"
        cmd = [sys.executable, str(ROOT / "bench" / "grpo_vs_trl.py"), "--device", device, "--model-preset", preset,
               "--steps", "1", "--warmup-steps", "1", "--repeats", "1", "--prompts-per-step", "2",
               "--num-generations", "4", "--completion-length", "8", "--threads", "0", "--out", str(stem),
               *(["--lora-bf16"] if lora_bf16 else [])]
        proc, seconds, out = _run(cmd, timeout)
        if proc is None or proc.returncode != 0:
            return [_failed(f"memory, {preset}, ours vs TRL, {kind}", seconds, out)]
        result = json.loads(Path(f"{stem}.json").read_text())
    key = "cuda_peak_allocated_mib" if device == "cuda" else "peak_rss_mib"
    peak = {impl: result["medians"][impl][key] / 1024 for impl in ("ours", "trl")}
    return [Row(check=f"memory, {preset} shape, ours vs TRL, {kind}",
                result=f"ours {peak['ours']:.2f} GiB, TRL {peak['trl']:.2f} GiB ({peak['ours'] / peak['trl']:.2f}x)",
                detail=f"{'max_memory_allocated' if device == 'cuda' else 'peak RSS'}; {seconds:.0f} s")]


def table(rows: list[Row]) -> str:
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['result']} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="toy sizes (the micro model, a tiny pipeline): minutes on CPU")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): nothing to check. Run it where a GPU is.")
        return 0
    preset = "micro" if args.quick else "qwen2.5-0.5b"
    t0 = time.perf_counter()
    rows = [device_row(args.device)]
    steps = [
        lambda: [gpu_tests(timeout=120)],
        lambda: [pipeline(QUICK_PIPELINE if args.quick else PIPELINE, timeout=300)],
        lambda: our_memory(args.device, preset, timeout=150),
        lambda: trl_memory(args.device, preset, lora_bf16=False, timeout=120),
        lambda: trl_memory(args.device, preset, lora_bf16=True, timeout=120),
    ]
    for step in steps:
        rows += step()
        print(f"gpu-check: {rows[-1]['check']}: {rows[-1]['result']}", file=sys.stderr, flush=True)
    rows.append(Row(check="total", result=f"{time.perf_counter() - t0:.0f} s", detail="offline"))
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 1 if any(r["result"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
