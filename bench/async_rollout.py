"""What one-step-off rollouts (`grpo.async_rollout`) give on this machine: the grpo stage as users run it
(`grpo grpo`), synchronous and one-step-off, from the same inputs, alternating, `--repeats` times each.

Prints one row per setup: the stage's wall time, the mean step time, the mean time decoding took per step
(`rollout/decode_time`, in the background when one-step-off) and the part of it the update did not hide
(`rollout/wait_time`), and the steps' mean reward (the rollouts are one step older, so the runs differ).

    python bench/async_rollout.py                                    # default params, 15 steps, 2 threads
    python bench/async_rollout.py --set grpo.max_completion_length=32 --threads 1

The inputs are bench/processes.py's: data from the real prepare and validate stages, a default-size starting
policy with fresh weights, and the same weights as the likelihood reward model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import processes  # noqa: E402 - after the path set-up

SETUPS = {"synchronous": [], "one-step-off": ["grpo.async_rollout=true"]}


def mean(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key, "") != ""]
    return statistics.fmean(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15, help="grpo steps per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setup, alternating (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the stage (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every run, e.g. --set grpo.max_completion_length=32")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args()
    overrides = ["task.n_train=400", "task.n_eval=40", "task.n_test=40", f"grpo.steps={args.steps}",
                 "grpo.eval_every=0", "grpo.checkpoint_every=0", *args.overrides]
    runs: dict[str, list[tuple[float, list[dict]]]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory(prefix="grpo-async-") as tmp:
        inputs = processes.build_inputs(Path(tmp), overrides)
        for r in range(args.repeats):
            for name, extra in SETUPS.items():
                _, curve, _, wall = processes.run(inputs, Path(tmp) / f"{name}-{r}", 1, overrides + extra,
                                                  threads=args.threads)
                runs[name].append((wall, curve))
    rows = []
    for name, done in runs.items():
        curves = [row for _, curve in done for row in curve[1:]]  # step 1 decodes synchronously either way
        rows.append({"setup": name, "wall_s": statistics.fmean(w for w, _ in done),
                     "step_s": mean(curves, "step_time"), "decode_s": mean(curves, "rollout/decode_time"),
                     "wait_s": mean(curves, "rollout/wait_time"), "reward": mean(curves, "reward")})
    print(f"{args.threads} threads, {args.steps} steps, {args.repeats} runs each, steps 2.. averaged")
    print(f"{'setup':<14} {'wall s':>8} {'s/step':>8} {'decode s/step':>14} {'waited s/step':>14} {'reward':>8}")
    for r in rows:
        print(f"{r['setup']:<14} {r['wall_s']:8.1f} {r['step_s']:8.3f} {r['decode_s']:14.3f} {r['wait_s']:14.3f} "
              f"{r['reward']:8.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
