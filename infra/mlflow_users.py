"""The MLflow server's users, made idempotently through its basic-auth API (run as the admin).

    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
    MLFLOW_PIPELINE_PASSWORD=... MLFLOW_VIEWER_PASSWORD=... python infra/mlflow_users.py http://mlflow:5000

* `pipeline`: the training jobs' user. It creates the experiment and the registered model, and MLflow gives
  a creator MANAGE on what it creates, so it may log runs, register versions and move the champion alias.
* `viewer`: everyone else. The server's default permission (READ) lets it browse every run and model; it
  can change nothing.

Only MLflow is imported: the compose stack runs this file in the MLflow server's image; the local stack
(infra/local_stack.py) imports it.
"""

from __future__ import annotations

import os
import sys
import time

PIPELINE_USER, VIEWER_USER = "pipeline", "viewer"


def ensure_users(url: str, passwords: dict[str, str], attempts: int = 30) -> None:
    """Create each user that does not exist yet (a password is never changed here)."""
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(url)
    for user, password in passwords.items():
        for attempt in range(attempts):
            try:
                client.create_user(user, password)
                break
            except RestException as e:
                if "RESOURCE_ALREADY_EXISTS" in str(e.error_code):
                    break
                raise
            except MlflowException:  # the server is still starting
                if attempt == attempts - 1:
                    raise
                time.sleep(2)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    missing = [v for v in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_PIPELINE_PASSWORD",
                           "MLFLOW_VIEWER_PASSWORD") if not os.environ.get(v)]
    if missing:
        print(f"error: set {', '.join(missing)} in the environment", file=sys.stderr)
        return 2
    ensure_users(sys.argv[1], {PIPELINE_USER: os.environ["MLFLOW_PIPELINE_PASSWORD"],
                               VIEWER_USER: os.environ["MLFLOW_VIEWER_PASSWORD"]})
    print(f"users {PIPELINE_USER} and {VIEWER_USER} exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
