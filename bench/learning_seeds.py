"""Does GRPO really learn? Held-out accuracy of the starting policy and of the GRPO policy, per seed.

Runs prepare -> validate -> train_reward -> sft -> grpo -> evaluate with params.yaml (plus any --set
overrides) once per seed, each in its own directory, and prints a table. Registration is skipped: this
measures the algorithm, not the registry.

    python bench/learning_seeds.py --seeds 0 1 2
    python bench/learning_seeds.py --seeds 0 --set grpo.loss_type=dr_grpo --set grpo.scale_rewards=none
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "validate", "train_reward", "sft", "grpo", "evaluate")


def run_seed(seed: int, overrides: list[str], workdir: Path) -> dict:
    from grpo_steps.config import load_config
    from grpo_steps.stages import STAGES as ALL

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", workdir / "params.yaml")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cfg = load_config("params.yaml", [f"seed={seed}", f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db",
                                          *overrides])
        t0 = time.perf_counter()
        for name in STAGES:
            ALL[name][0](cfg)
        metrics = json.loads(Path("reports/metrics.json").read_text())
        metrics["seconds"] = time.perf_counter() - t0
        return metrics
    finally:
        os.chdir(cwd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", type=Path, default=None, help="keep each seed's outputs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="grpo-seeds-"))
    rows = []
    for seed in args.seeds:
        m = run_seed(seed, args.overrides, base / f"seed-{seed}")
        rows.append({"seed": seed, "start": m["start"]["accuracy"], "grpo": m["grpo"]["accuracy"],
                     "gain": m["accuracy_gain"], "kl": m["grpo"].get("kl_to_reference", float("nan")),
                     "seconds": m["seconds"]})
        print(f"seed {seed}: start {rows[-1]['start']:.4f} -> grpo {rows[-1]['grpo']:.4f}", file=sys.stderr)
    print("| seed | start accuracy | GRPO accuracy | gain (points) | KL to start | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['start']:.4f} | {r['grpo']:.4f} | {100 * r['gain']:+.1f} | {r['kl']:.4f} "
              f"| {r['seconds']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
