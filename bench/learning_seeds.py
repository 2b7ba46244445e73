"""Does GRPO really learn, on any machine? The default pipeline per (seed, torch threads, reward setup).

For each seed, torch thread count and ATen CPU kernel path, runs prepare -> validate -> sft -> train_reward once,
then grpo -> evaluate once per reward setup:

* `default`: params.yaml's grpo.reward_functions (the verifier plus the reward model);
* `rm_only`: the reward model as the only reward function; the verifier only measures.

Another machine computes with other float rounding. Thread counts are one stand-in, but on a 2-core AVX2 CPU
the tiny model's results at 1 and 2 threads were bitwise identical; `--float-paths default` runs torch's
scalar ATen kernels instead of the AVX2 ones (ATEN_CPU_CAPABILITY=default), which round differently, as a
CPU with other vector units (AVX-512, NEON) does. Each (seed, threads, float path) runs in its own process
and directory; registration is skipped (this measures the
algorithm, not the registry). Prints one table row per run: seed, threads, reward setup, the reward model's
held-out pairwise accuracy (overall and per kind of rejected answer), start and GRPO held-out greedy accuracy,
the gain, KL to the start policy, the reward-model score before and after, and wall time.

    python bench/learning_seeds.py                                   # seeds 0 1 2 x threads 1 2, both setups
    python bench/learning_seeds.py --seeds 0 --threads 1 --setups default --set grpo.steps=50
    python bench/learning_seeds.py --jobs 2 --out reports/learning_seeds.json
    python bench/learning_seeds.py --threads 1 --float-paths native default   # the other float path
    python bench/learning_seeds.py --params configs/reasoning-cpu.yaml --seeds 0 --threads 2 --setups default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {
    "default": [],
    "rm_only": ["grpo.reward_functions=[{name: reward_model, weight: 1.0}]"],
}
SHARED = ("prepare", "validate", "sft", "train_reward")


def run_one(seed: int, threads: int, setups: list[str], overrides: list[str], workdir: Path,
            float_path: str = "native", params: Path = ROOT / "params.yaml") -> list[dict]:
    """In this process: the shared stages once, then grpo + evaluate per reward setup."""
    import torch

    torch.set_num_threads(threads)
    from grpo_steps.platform.config import load_config
    from grpo_steps.stages import STAGES

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(params, workdir / "params.yaml")
    os.chdir(workdir)
    base = [f"seed={seed}", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", "tracking.system_metrics=false",
            "evaluate.compare_champion=false", *overrides]
    cfg = load_config("params.yaml", base)
    t0 = time.perf_counter()
    for name in SHARED:
        STAGES[name](cfg)
    shared_s = time.perf_counter() - t0
    rm = json.loads(Path(cfg.paths.reports() / "reward_model.json").read_text())
    rows = []
    for setup in setups:
        t1 = time.perf_counter()
        scfg = load_config("params.yaml", base + SETUPS[setup])
        for name in ("grpo", "evaluate"):
            STAGES[name](scfg)
        m = json.loads(Path(scfg.paths.reports() / "metrics.json").read_text())
        rows.append({
            "seed": seed, "threads": threads, "float_path": float_path, "setup": setup,
            "rm_accuracy": rm["pairwise_accuracy"],
            "rm_by_kind": {k: v["pairwise_accuracy"] for k, v in rm.get("by_kind", {}).items()},
            "start": m["start"]["accuracy"], "grpo": m["grpo"]["accuracy"], "gain": m["accuracy_gain"],
            "kl": m["grpo"].get("kl_to_reference", float("nan")),
            "rm_score_start": m["start"].get("reward_model_score", float("nan")),
            "rm_score_grpo": m["grpo"].get("reward_model_score", float("nan")),
            "reward_hacking_warning": m.get("reward_hacking_warning"),
            "seconds_shared": shared_s, "seconds_grpo_eval": time.perf_counter() - t1,
        })
        shutil.rmtree(scfg.paths.grpo_policy().parent / "grpo_checkpoints", ignore_errors=True)
    return rows


def _name(seed: int, threads: int, float_path: str) -> str:
    return f"seed{seed}-threads{threads}" + ("" if float_path == "native" else f"-aten-{float_path}")


def _child(args: argparse.Namespace, seed: int, threads: int, float_path: str, base: Path) -> list[dict]:
    name = _name(seed, threads, float_path)
    out = base / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", str(seed), str(threads), "--child-float-path", float_path,
           "--workdir", str(base), "--params", str(args.params.resolve()), "--setups", *args.setups,
           *[x for o in args.overrides for x in ("--set", o)]]
    log = (base / f"{name}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if float_path != "native":
        env["ATEN_CPU_CAPABILITY"] = float_path
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log.name}")
    rows = json.loads(out.read_text())
    for r in rows:
        print(f"{name} {r['setup']}: start {r['start']:.4f} -> grpo {r['grpo']:.4f}",
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    kinds = sorted({k for r in rows for k in r["rm_by_kind"]})
    head = ["seed", "threads", "ATen kernels", "reward setup", "RM pairwise acc", *[f"RM acc {k}" for k in kinds],
            "start acc", "GRPO acc", "gain (points)", "KL to start", "RM score start -> GRPO",
            "seconds (shared stages + this row)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kernels = r.get("float_path", "native")
        cells = [str(r["seed"]), str(r["threads"]), "scalar" if kernels == "default" else kernels, r["setup"],
                 f"{r['rm_accuracy']:.3f}",
                 *[f"{r['rm_by_kind'].get(k, float('nan')):.3f}" for k in kinds],
                 f"{r['start']:.4f}", f"{r['grpo']:.4f}", f"{100 * r['gain']:+.2f}", f"{r['kl']:.3f}",
                 f"{r['rm_score_start']:.2f} -> {r['rm_score_grpo']:.2f}"
                 + (" (reward hacking warning)" if r["reward_hacking_warning"] else ""),
                 f"{r['seconds_shared'] + r['seconds_grpo_eval']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads per run")
    p.add_argument("--float-paths", nargs="+", default=["native"],
                   help="ATen CPU kernels per run: native (the CPU's best, e.g. AVX2) or an ATEN_CPU_CAPABILITY "
                   "value such as default (scalar) or avx2")
    p.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=["default", "rm_only"])
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                   help="params file the runs start from, e.g. configs/reasoning-cpu.yaml (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (the wall times then share the cores)")
    p.add_argument("--workdir", type=Path, default=None, help="keep each run's outputs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-float-path", default="native", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = (args.workdir or Path(tempfile.mkdtemp(prefix="grpo-seeds-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if args.child:
        seed, threads = args.child
        name = _name(seed, threads, args.child_float_path)
        rows = run_one(seed, threads, args.setups, args.overrides, base / name, args.child_float_path,
                       args.params.resolve())
        (base / f"{name}.json").write_text(json.dumps(rows, indent=2))
        return 0
    runs = [(s, t, f) for s in args.seeds for t in args.threads for f in args.float_paths]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda r: _child(args, *r, base), runs))
    rows = [r for rs in results for r in rs]
    print(table(rows))
    for setup in args.setups:
        gains = [r["gain"] for r in rows if r["setup"] == setup]
        print(f"{setup}: worst gain {100 * min(gains):+.2f} points over {len(gains)} runs; "
              f"worst RM accuracy {min(r['rm_accuracy'] for r in rows):.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
