"""The architecture picture in README.md and ARCHITECTURE.md: the stage DAG and the package's rooms.

    .venv/bin/python docs/diagram.py            # writes docs/img/architecture.svg
    .venv/bin/python docs/diagram.py --check    # exit 1 when the committed picture is out of date

Drawn from the code, not by hand: the stages and their edges come from the stage records (a stage depends on
another when one of its inputs is the other's output, for the default `paths`), the rooms and their modules
from the folders of grpo_steps/. Plain SVG text, the same bytes for the same code
(tests/test_imports.py checks the committed file is current).
"""

from __future__ import annotations

import argparse
import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "architecture.svg"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the rooms, top (imports the others) to bottom (imports none of them), with their folder and what they are
ROOMS = (
    ("entry points", None, "grpo_steps/cli.py (`grpo ...`), grpo_steps/launch_rank.py (a rank of a launched stage)"),
    ("flows", "flows", "the Prefect flow: tasks, retries, cache keys, run summary, `grpo serve`"),
    ("stages", "grpo_steps/stages", "one module per stage, named as its CLI verb; __init__.py: the records"),
    ("platform", "grpo_steps/platform", "config, stage runs, tracking, launch, lineage, checkpoints, I/O, models"),
    ("data", "grpo_steps/data", "task, sources, contracts, prompt rendering, tokenizers, their settings"),
    ("algorithm", "grpo_steps/grpo", "GRPO step by step: sample, score, advantages, loss, update; no app config"),
)
W, BOX_W, BOX_H, GAP = 980, 118, 40, 19
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


def stage_edges() -> tuple[list[str], list[tuple[str, str]]]:
    """The stages in run order and (from, to) for each stage whose inputs include another's outputs."""
    from grpo_steps.platform.config import Config
    from grpo_steps.stages import STAGES

    cfg = Config()
    outs = {name: [str(p) for p in s.outs(cfg)] for name, s in STAGES.items()}
    edges = []
    for name, stage in STAGES.items():
        deps = [str(p) for p in stage.deps(cfg)]
        for other, paths in outs.items():
            if other != name and any(d == o or d.startswith(o + "/") for d in deps for o in paths):
                edges.append((other, name))
    return list(STAGES), edges


def modules(folder: str | None) -> list[str]:
    if folder is None:
        return ["cli", "launch_rank"]
    return sorted(p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__")


def _text(x: float, y: float, s: str, size: int = 13, anchor: str = "middle", weight: str = "normal",
          fill: str = "#1f2933") -> str:
    return (f'<text x="{x:.0f}" y="{y:.0f}" {FONT} font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{escape(s)}</text>')


def render() -> str:
    names, edges = stage_edges()
    parts: list[str] = []
    # the stage DAG: boxes in run order, each edge an arc above (adjacent stages: a straight arrow)
    x0 = (W - (len(names) * BOX_W + (len(names) - 1) * GAP)) / 2
    top = 120
    xs = {n: x0 + i * (BOX_W + GAP) for i, n in enumerate(names)}
    parts.append(_text(W / 2, 28, "The stages (grpo <stage>, the Prefect flow and dvc repro run the same records)",
                       15, weight="bold"))
    for a, b in edges:
        xa, xb = xs[a] + BOX_W / 2, xs[b] + BOX_W / 2
        if names.index(b) - names.index(a) == 1:
            parts.append(f'<line x1="{xs[a] + BOX_W:.0f}" y1="{top + BOX_H / 2:.0f}" x2="{xs[b] - 3:.0f}" '
                         f'y2="{top + BOX_H / 2:.0f}" stroke="#52606d" stroke-width="1.5" marker-end="url(#arrow)"/>')
        else:
            lift = 16 + 11 * (names.index(b) - names.index(a))
            parts.append(f'<path d="M {xa:.0f} {top} Q {(xa + xb) / 2:.0f} {top - 2 * lift} {xb:.0f} {top - 3}" '
                         f'fill="none" stroke="#9aa5b1" stroke-width="1.2" marker-end="url(#arrow)"/>')
    for n in names:
        parts.append(f'<rect x="{xs[n]:.0f}" y="{top}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="#e3f0ff" '
                     f'stroke="#2f6fb3" stroke-width="1.5"/>')
        parts.append(_text(xs[n] + BOX_W / 2, top + 25, n, 14, weight="bold"))
    # the rooms: stacked bands, imports pointing down
    y = top + BOX_H + 58
    parts.append(_text(W / 2, y, "The rooms of grpo_steps/ (a module imports its own room and the rooms below it)",
                       15, weight="bold"))
    y += 14
    band_h, left = 58, 40
    for i, (room, folder, what) in enumerate(ROOMS):
        fill = "#f5f7fa" if i % 2 else "#fffbea"
        parts.append(f'<rect x="{left}" y="{y}" width="{W - 2 * left - 40}" height="{band_h - 6}" rx="6" '
                     f'fill="{fill}" stroke="#9aa5b1"/>')
        parts.append(_text(left + 12, y + 20, f"{room}" + (f"  ({folder}/)" if folder else ""), 13, "start", "bold"))
        parts.append(_text(left + 330, y + 20, what, 12, "start", fill="#52606d"))
        parts.append(_text(left + 12, y + 40, ", ".join(modules(folder)), 12, "start", fill="#3e4c59"))
        y += band_h
    arrow_x = W - 50
    parts.append(f'<line x1="{arrow_x}" y1="{y - len(ROOMS) * band_h + 8}" x2="{arrow_x}" y2="{y - 14}" '
                 f'stroke="#52606d" stroke-width="2" marker-end="url(#arrow)"/>')
    parts.append(_text(arrow_x + 14, y - len(ROOMS) * band_h / 2, "imports", 12, fill="#52606d")
                 .replace("<text ", f'<text transform="rotate(90 {arrow_x + 14} {y - len(ROOMS) * band_h / 2:.0f})" '))
    height = y + 16
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}">\n'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#52606d"/></marker></defs>\n'
            f'<rect width="{W}" height="{height}" fill="white"/>\n')
    return head + "\n".join(parts) + "\n</svg>\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check: exit 1 when the file is out of date")
    parser.add_argument("--out", type=Path, default=OUT, help="the SVG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    text = render()
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    if args.check:
        if current != text:
            print(f"{args.out} is out of date: run `python docs/diagram.py`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
