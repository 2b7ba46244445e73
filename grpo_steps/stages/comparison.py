"""The evaluate stage's table, start against GRPO (and the champion): formatting alone, so that a flow whose
evaluate stage was cached prints it without loading torch and transformers (seconds on a no-op rerun)."""

from __future__ import annotations

from typing import Any


def format_comparison(result: dict[str, Any]) -> str:
    cols = ["start", "grpo"] + (["champion"] if "champion" in result else [])
    keys = [k for k in result["grpo"] if k in result["start"]]
    header = "".join(f"{c:>10}" for c in cols)
    lines = [f"held-out evaluation on {result['n_test']} test prompts", f"{'metric':<24}{header}"]
    for k in keys:
        lines.append(f"{k:<24}" + "".join(f"{result[c].get(k, float('nan')):>10.4f}" for c in cols))
    if "kl_to_reference" in result["grpo"]:
        lines.append(f"{'kl_to_reference':<24}{'':>10}{result['grpo']['kl_to_reference']:>10.4f}")
    lines.append(f"accuracy gain (grpo - start): {result['accuracy_gain']:+.4f}")
    if "champion" in result:
        lines.append(f"accuracy gain (grpo - champion v{result['champion_version']}): "
                     f"{result['accuracy_gain_over_champion']:+.4f}")
    elif result.get("champion_note"):
        lines.append(f"champion: not compared ({result['champion_note']})")
    return "\n".join(lines)
