"""`grpo`: every pipeline stage as a command, plus `grpo run` for the whole Prefect flow.

    grpo run                      # the whole pipeline as a Prefect flow, one MLflow parent run
    grpo grpo --set grpo.beta=0   # one stage, with an override of params.yaml
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


def _user_errors() -> tuple[type[BaseException], ...]:
    from grpo_steps.grpo.trainer import NonFiniteLossError
    from grpo_steps.io import DataFileError
    from grpo_steps.train_reward import RewardGateError
    from grpo_steps.validate import DataValidationError

    return _USER_ERRORS + (DataFileError, DataValidationError, RewardGateError, NonFiniteLossError)


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
    sub.add_parser("run", parents=[common], help="run the whole pipeline as a Prefect flow")
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, parents=[common], help=help_text, description=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Without PREFECT_API_URL, `grpo run` starts Prefect's local server for the run; a busy 2-core machine
    # needs longer than Prefect's default 20 s for its first start (database migrations).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    try:
        cfg = load_config(args.params, args.overrides)
        if args.command == "run":
            from flows.pipeline import grpo_pipeline

            grpo_pipeline(params_path=args.params, overrides=args.overrides)
        else:
            STAGES[args.command][0](cfg)
    except _user_errors() as e:
        print(f"grpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
