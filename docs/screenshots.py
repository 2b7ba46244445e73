"""The README's MLflow UI pictures, taken from the local store that `make pipeline` wrote.

    make pipeline && .venv/bin/python docs/screenshots.py      # writes docs/img/mlflow-runs.png, mlflow-grpo-charts.png

Starts `mlflow server` on sqlite:///mlflow.db (and ./mlartifacts) on a free port, opens the link the
pipeline prints (Model training mode, the Headline metrics view) in headless Chromium (Debian's, as in the
tests), expands the newest pipeline run, then opens its grpo run's charts. Needs chromium and chromedriver.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo_steps.platform.tracking import HEADLINE_METRICS, ui_run_link, ui_runs_link  # noqa: E402
from tests.support.browser import browser, click, close_mlflow_assistant, wait_text  # noqa: E402
from tests.support.project import mlflow_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="the MLflow store of the run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    args = parser.parse_args()
    import mlflow

    client = mlflow.MlflowClient(args.store)
    exp = client.get_experiment_by_name("grpo-pipeline")
    if exp is None:
        print(f"no experiment grpo-pipeline in {args.store}: run `make pipeline` first", file=sys.stderr)
        return 2
    parent = client.search_runs([exp.experiment_id], "attributes.run_name = 'pipeline'", max_results=1,
                                order_by=["attributes.start_time DESC"])[0]
    grpo = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                              "and tags.stage = 'grpo'")[0]
    with tempfile.TemporaryDirectory() as logs, \
            mlflow_server(Path(logs), store=args.store, artifacts=ROOT / "mlartifacts") as url, \
            browser(args.out, size=(1600, 900)) as d:
        d.get(ui_runs_link(url, exp.experiment_id))
        wait_text(d, *HEADLINE_METRICS, shot="mlflow-runs")
        close_mlflow_assistant(d)
        click(d, f"[row-id='{parent.info.run_id}'] button[data-component-id*='runnamecellrenderer']", "expander")
        wait_text(d, "grpo", "evaluate", "register", shot="mlflow-runs")
        d.get(ui_run_link(url, exp.experiment_id, grpo.info.run_id).replace("?", "/model-metrics?"))
        wait_text(d, "grpo (Headline/reward)", "grpo (Headline/accuracy)", shot="mlflow-grpo-charts")
    print(f"wrote {args.out / 'mlflow-runs.png'} and {args.out / 'mlflow-grpo-charts.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
