"""`grpo`: every pipeline stage as a command, plus `grpo run` for the whole Prefect flow.

    grpo run                      # the whole pipeline as a Prefect flow, one MLflow parent run
    grpo grpo --set grpo.beta=0   # one stage, with an override of params.yaml
    grpo serve --dry-run          # the flow on a cron schedule (default 02:00 UTC), served by this process
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from grpo_steps.config import ConfigError, load_config
from grpo_steps.stages import STAGES

log = logging.getLogger("grpo")

# Errors a user can fix (bad params, bad or missing data, a failed gate): one clear line, exit code 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your params or data", not "try again": exit code 2, and no Prefect retry."""
    from flows.serve import ServeError
    from grpo_steps.grpo.trainer import NonFiniteLossError
    from grpo_steps.io import DataFileError
    from grpo_steps.train_reward import RewardGateError
    from grpo_steps.validate import DataValidationError

    return _USER_ERRORS + (DataFileError, DataValidationError, RewardGateError, NonFiniteLossError, ServeError)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="configuration file (default: %(default)s)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set grpo.steps=10 (repeatable)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p = argparse.ArgumentParser(
        prog="grpo",
        description="GRPO fine-tuning pipeline: validate data, train a reward model, cold-start, GRPO, "
        "evaluate, register. Run from the project root (paths in params.yaml are relative to it).",
        epilog="Stages run in order: " + " -> ".join(STAGES) + ". Try `grpo run` first.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", parents=[common], help="run the whole pipeline as a Prefect flow",
                         description="Run every stage as a Prefect task. Stages whose params, inputs and code are "
                         "unchanged since an earlier run in this directory are skipped (cached).")
    run.add_argument("--refresh-cache", action="store_true", help="run every stage, even unchanged ones")
    from flows.serve import DEFAULT_CRON, DEFAULT_NAME, DEFAULT_TIMEZONE

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
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, parents=[common], help=help_text, description=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per Prefect API request
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without PREFECT_API_URL, `grpo run` starts Prefect's local server for the run; a busy 2-core machine
    # needs longer than Prefect's default 20 s for its first start (database migrations).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    try:
        cfg = load_config(args.params, args.overrides)
        if args.command == "run":
            from flows.pipeline import grpo_pipeline

            grpo_pipeline(params_path=args.params, overrides=args.overrides, refresh_cache=args.refresh_cache)
        elif args.command == "serve":
            return _serve(args)
        else:
            STAGES[args.command][0](cfg)
    except user_errors() as e:
        print(f"grpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows import serve

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
