"""`grpo`: every pipeline stage as a command, plus `grpo run` for the whole Prefect flow.

    grpo run                      # the whole pipeline as a Prefect flow, one MLflow parent run
    grpo grpo --set grpo.beta=0   # one stage, with an override of params.yaml
    grpo serve --dry-run          # the flow on a cron schedule (default 02:00 UTC), served by this process
    grpo status                   # which stages `grpo run` would skip for these params
    grpo node                     # on each other node of a multi-node run: join its training stages
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import textwrap
import tomllib
import traceback
from pathlib import Path

from flows import serve
from flows.serve import DEFAULT_CRON, DEFAULT_NAME, DEFAULT_TIMEZONE
from grpo_steps.errors import USER_ERRORS
from grpo_steps.platform import dvc_yaml, logs
from grpo_steps.platform.config import load_config
from grpo_steps.platform.logs import setup_logging
from grpo_steps.stages import STAGES

log = logging.getLogger("grpo")

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="configuration file (default: %(default)s)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set grpo.steps=10 (repeatable)")
    common.add_argument("-v", "--verbose", "--debug", action="store_true",
                        help="debug logging, and the traceback behind an error's one line")
    p = argparse.ArgumentParser(
        prog="grpo",
        description="GRPO fine-tuning pipeline: validate data, cold-start, train a reward model, GRPO, "
        "evaluate, register. Run from the project root (paths in params.yaml are relative to it).",
        epilog="Stages run in order: " + " -> ".join(STAGES) + ". Try `grpo run` first.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", parents=[common], help="run the whole pipeline as a Prefect flow",
                         description="Run every stage as a Prefect task. Stages whose params, inputs and code are "
                         "unchanged since an earlier run in this directory are skipped (cached).")
    run.add_argument("--refresh-cache", action="store_true", help="run every stage, even unchanged ones")
    serve = sub.add_parser(
        "serve", parents=[common], help="run the pipeline on a cron schedule (Prefect flow.serve; no worker needed)",
        description="Create a Prefect deployment of the pipeline with a cron schedule and execute its runs from "
        "this process until interrupted. Needs a Prefect server (PREFECT_API_URL). For work pools and "
        "workers use prefect.yaml (`prefect deploy`) instead.")
    serve.add_argument("--cron", default=DEFAULT_CRON, help="cron expression (default: %(default)r, 02:00 daily)")
    serve.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="time zone of the cron (default: %(default)s)")
    serve.add_argument("--name", default=DEFAULT_NAME, help="deployment name (default: %(default)s)")
    serve.add_argument("--dry-run", action="store_true",
                       help="validate the schedule and parameters, print the next run times, and exit")
    sub.add_parser("status", parents=[common], help="which stages `grpo run` would skip for these params (no work)",
                   description="For each stage: up to date (a cached run with the same params, inputs and code, "
                   "its outputs unchanged on disk), will run (and why), or always runs (register). Like "
                   "`dvc status`, for the Prefect flow's cache. Reads only; writes nothing.")
    node = sub.add_parser(
        "node", parents=[common], help="on the other nodes of a multi-node run: join its training stages",
        description="Join, as one node, every training stage (sft, train_reward, grpo) that the run led from "
        "another node launches, with this node's launch.processes_per_node processes, until that run releases "
        "it. Every node uses the same launch settings (launch.nodes, launch.rdzv_endpoint, launch.rdzv_id) and "
        "the same project directory (a shared volume). See infra/README.md, section 7.")
    node.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                      help="give up after this long without a stage to join (default: wait until released or "
                      "stopped; a Kubernetes Job ends its pods when pod 0 ends)")
    node.add_argument("--release", action="store_true",
                      help="from the leading node: release the nodes waiting in `grpo node` (the flow does this "
                      "at its end; after `dvc repro` or stage commands, run it yourself)")
    dvc = sub.add_parser("dvc-yaml", parents=[common],
                         help="write dvc.yaml from the stage records (grpo_steps/stages/__init__.py)",
                         description="Generate dvc.yaml from the stage records, for the default `paths`.")
    dvc.add_argument("--check", action="store_true", help="only check: exit 1 when dvc.yaml is out of date")
    dvc.add_argument("--path", default="dvc.yaml", help="file to write or check (default: %(default)s)")
    defaults = load_config(None)
    for name, stage in STAGES.items():
        sub.add_parser(name, parents=[common], help=stage.help, description=_stage_description(name, defaults),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def _stage_description(name: str, cfg) -> str:
    """A stage's help, then what its record says it reads and writes (for the default `paths`)."""
    spec = STAGES[name]
    reads = [str(p) for p in spec.deps(cfg)] or ["its params only (or your data files, data.source: files)"]
    writes = [str(o.path(cfg)) + (" (kept between runs)" if o.persist else "") for o in spec.outputs]
    lines = [("", spec.help), ("reads:  ", ", ".join(reads)), ("writes: ", ", ".join(writes)),
             ("params: ", ", ".join(spec.params))]
    wrapped = [textwrap.fill(text, 100, initial_indent=label, subsequent_indent=" " * len(label))
               for label, text in lines]
    return "\n\n".join(wrapped[:1]) + "\n\n" + "\n".join(wrapped[1:])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("dvc-yaml", "status"):  # no work, nothing to keep
        setup_logging(args.verbose)
        return _main(args, None)
    # `serve` keeps its own: each flow run it starts is a process of its own, with its own log file
    with logs.run_log(args.command, args.verbose, export=args.command != "serve") as log_file:
        if log_file is not None:
            log.info("log file: %s", log_file)
        return _main(args, log_file)


def _main(args: argparse.Namespace, log_file: Path | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without PREFECT_API_URL, `grpo run` starts Prefect's local server for the run; a busy 2-core machine
    # needs longer than Prefect's default 20 s for its first start (database migrations).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Offline by design: Prefect's server would send usage data (and its telemetry service, racing the other
    # services on a fresh database, printed "database is locked" tracebacks on a first run).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A stop signal unwinds like Ctrl-C: a launched stage stops its ranks, Prefect marks the run, servers stop.
    with contextlib.suppress(ValueError):  # not from a thread other than the main one (tests calling main())
        signal.signal(signal.SIGTERM, _exit_on_signal)
    if args.command == "run":
        _project_prefect_home()
    if args.command == "dvc-yaml":
        current = dvc_yaml.write(STAGES.values(), args.path, check=args.check)
        if args.check and not current:
            print(f"{args.path} is out of date with the stage records (grpo_steps/stages/__init__.py): run "
                  "`grpo dvc-yaml`", file=sys.stderr)
            return 1
        print(f"{args.path} {'is up to date' if current else 'written'}")
        return 0
    try:
        cfg = load_config(args.params, args.overrides)
        if args.command == "run":
            from flows.pipeline import grpo_pipeline, pipeline_guard  # deferred: Prefect, torch, mlflow

            with pipeline_guard(cfg):  # before Prefect's server starts
                grpo_pipeline(params_path=args.params, overrides=args.overrides, refresh_cache=args.refresh_cache)
        elif args.command == "serve":
            return _serve(args)
        elif args.command == "node":
            from grpo_steps.platform import launch  # deferred: torch

            if args.release:
                launch.release_followers(cfg)
            else:
                return launch.follow(cfg, args.idle_timeout)
        elif args.command == "status":
            from flows.status import format_status, stage_status  # deferred: Prefect

            print(format_status(stage_status(cfg)))
        else:
            from grpo_steps.platform import preflight  # deferred: mlflow

            preflight.check(cfg, [args.command])
            STAGES[args.command](cfg)
    except USER_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        logs.trace_to_file()
        message = str(e)
        if log_file is not None and not args.verbose:
            message += ("\n" if "\n" in message else " ") + f"(details: {log_file})"  # after a table, a line
        print(f"grpo {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception:
        logs.trace_to_file()  # the terminal shows it as Python prints it
        raise
    return 0


def _project_prefect_home() -> None:
    """`grpo run` without a Prefect server of the user's starts Prefect's temporary server: it gets the project's
    own home (`.prefect/`, beside the cached results) rather than `~/.prefect`, which every other project of the
    user shares. Left alone when PREFECT_HOME or PREFECT_API_URL is set, or when the active profile names a
    server; the user's profiles file stays the one read."""
    if os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL"):
        return
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or Path.home() / ".prefect" / "profiles.toml")
    if profiles.is_file():
        try:
            data = tomllib.loads(profiles.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
        if (data.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL"):
            return
        os.environ.setdefault("PREFECT_PROFILES_PATH", str(profiles))
    os.environ["PREFECT_HOME"] = str(Path.cwd() / ".prefect")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    plan = serve.plan(cron=args.cron, timezone=args.timezone, name=args.name, params_path=args.params,
                      overrides=args.overrides)
    print(plan.describe())
    if args.dry_run:
        print("dry run: nothing created; without --dry-run this process serves the schedule until interrupted")
        return 0
    serve.serve(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
