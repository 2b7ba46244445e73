"""The production stack on one machine, without Docker: PostgreSQL from the distribution's packages, an MLflow
server on it (basic-auth, `postgresql://` backend, proxied local artifacts) and a Prefect server on it (API auth).

    python -m infra.local_stack up [--dir .stack]     # start everything, print the client settings, wait for Ctrl-C
    make stack                                          # the same

What it starts, each on a free port of 127.0.0.1, with its data and logs under --dir:

* PostgreSQL (`initdb` + `pg_ctl` of the installed server; as root, run as the `postgres` user): databases
  `mlflow` (tracking + registry), `mlflow_auth` (users and permissions) and `prefect`; password auth over TCP.
* `mlflow server --app-name basic-auth`: nobody gets in without a password. Users: `admin`; `pipeline`, who
  creates the experiment and registered model and so manages them (MLflow grants creators MANAGE); `viewer`,
  who may read everything (default permission READ) and change nothing, the champion alias included.
* `prefect server start` with `PREFECT_SERVER_API_AUTH_STRING`: every API call and the UI need it.

The passwords are generated at first start and kept in <dir>/credentials.env (mode 0600): the only place they
are written. Clients take them from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD, PREFECT_API_AUTH_STRING),
never from params.yaml, so they are in no logged param, tag or artifact. `source <dir>/pipeline.env` gives a
shell the pipeline's settings.

The tests (tests/flows/test_production_stack.py) start this same stack with `Stack.start`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from infra.mlflow_users import PIPELINE_USER, VIEWER_USER, ensure_users

START_S = 300.0  # a first start migrates two fresh databases: slow on a busy 2-core machine
DB_USER = "grpo"
DATABASES = ("mlflow", "mlflow_auth", "prefect")
ADMIN_USER = "admin"


class StackError(RuntimeError):
    """A part of the stack could not be started: says which, and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def postgres_bindir() -> Path:
    """The installed PostgreSQL server's programs (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise StackError("PostgreSQL's server is not installed (no initdb): `apt-get install postgresql` "
                         "(Debian/Ubuntu), or put its bin folder on PATH")
    return Path(candidates[-1]).parent


@dataclass
class Credentials:
    """Every password of the stack; generated once, kept in <dir>/credentials.env."""

    db: str
    admin: str
    pipeline: str
    viewer: str
    prefect: str
    secret_key: str

    @classmethod
    def load_or_create(cls, path: Path) -> Credentials:
        names = [f for f in cls.__dataclass_fields__]
        if path.is_file():
            values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            missing = [n for n in names if f"GRPO_STACK_{n.upper()}" not in values]
            if missing:
                raise StackError(f"{path} lacks {', '.join(missing)}: delete the stack folder to start afresh")
            return cls(**{n: values[f"GRPO_STACK_{n.upper()}"] for n in names})
        creds = cls(**{n: secrets.token_urlsafe(18) for n in names})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"GRPO_STACK_{n.upper()}={getattr(creds, n)}\n" for n in names))
        return creds


@dataclass
class Stack:
    """A running stack; `stop()` (or leaving `Stack.start`'s context) ends every process it started."""

    root: Path
    creds: Credentials
    pg_port: int = 0
    mlflow_url: str = ""
    prefect_api: str = ""
    _stops: list[Callable[[], None]] = field(default_factory=list)

    # --- what clients need -------------------------------------------------------------------------------
    def db_url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{DB_USER}:{self.creds.db}@127.0.0.1:{self.pg_port}/{database}"

    def client_env(self, user: str = PIPELINE_USER) -> dict[str, str]:
        """The environment a pipeline (or any client) needs: server URLs and the credentials of `user`."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.password(user),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_API_AUTH_STRING": f"admin:{self.creds.prefect}",
        }

    def password(self, user: str) -> str:
        return {ADMIN_USER: self.creds.admin, PIPELINE_USER: self.creds.pipeline, VIEWER_USER: self.creds.viewer}[user]

    def basic_auth_header(self, user: str) -> str:
        return "Basic " + b64encode(f"{user}:{self.password(user)}".encode()).decode()

    def prefect_auth_header(self) -> str:
        return "Basic " + b64encode(f"admin:{self.creds.prefect}".encode()).decode()

    # --- lifecycle ---------------------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def start(cls, root: Path, env: dict[str, str] | None = None) -> Iterator[Stack]:
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        stack = cls(root=root, creds=Credentials.load_or_create(root / "credentials.env"))
        base_env = dict(os.environ if env is None else env)
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
            base_env.pop(key, None)
        try:
            stack._start_postgres()
            stack._start_mlflow(base_env)
            stack._start_prefect(base_env)
            stack._write_pipeline_env()
            yield stack
        finally:
            stack.stop()

    def stop(self) -> None:
        while self._stops:
            with contextlib.suppress(Exception):
                self._stops.pop()()

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("a")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd or self.root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def stop() -> None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=20)
            log.close()

        self._stops.append(stop)
        return proc

    def _wait_http(self, name: str, proc: subprocess.Popen, url: str, headers: dict[str, str]) -> None:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}; {self.root / (name + '.log')}:\n"
                                 f"{tail(self.root / (name + '.log'))}")
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:  # not up yet (HTTPError and URLError are OSErrors)
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{name} not answering {url} after {START_S:.0f} s; {self.root / (name + '.log')}:"
                                 f"\n{tail(self.root / (name + '.log'))}")
            time.sleep(1)

    # --- PostgreSQL --------------------------------------------------------------------------------------
    def _start_postgres(self) -> None:
        bindir = postgres_bindir()
        data = self.root / "postgres"
        as_user: list[str] = []
        pg: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # the server refuses to run as root: run it as the distribution's postgres user
            try:
                pg = pwd.getpwnam("postgres")
            except KeyError as e:
                raise StackError("running as root needs the `postgres` user (the postgresql package makes it)") from e
            as_user = ["runuser", "-u", "postgres", "--"]
            data.mkdir(mode=0o700, exist_ok=True)
            os.chown(data, pg.pw_uid, pg.pw_gid)
            probe = subprocess.run([*as_user, "test", "-w", str(data)])
            if probe.returncode != 0:
                raise StackError(f"the postgres user cannot reach {data}: choose a --dir whose parents others "
                                 "may enter (e.g. under /tmp)")
        if not (data / "PG_VERSION").exists():
            pwfile = self.root / "postgres.pw"
            pwfile.write_text(self.creds.db + "\n")
            if pg is not None:
                os.chown(pwfile, pg.pw_uid, -1)
            out = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", DB_USER,
                                  "--pwfile", str(pwfile), "--auth-local=scram-sha-256",
                                  "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"],
                                 capture_output=True, text=True)
            pwfile.unlink()
            if out.returncode != 0:
                raise StackError(f"initdb failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        self.pg_port = free_port()
        log = self.root / "postgres.log"
        if pg is not None:
            log.touch()
            os.chown(log, pg.pw_uid, -1)
        opts = f"-p {self.pg_port} -k {data} -c listen_addresses=127.0.0.1"
        out = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                              "-w", "-t", str(int(START_S)), "start"], capture_output=True, text=True)
        if out.returncode != 0:
            raise StackError(f"PostgreSQL did not start:\n{out.stdout[-1500:]}\n{tail(log)}")
        self._stops.append(lambda: subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True))
        env = {**os.environ, "PGPASSWORD": self.creds.db}
        for db in DATABASES:
            exists = subprocess.run([str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", DB_USER,
                                     "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{db}'"],
                                    env=env, capture_output=True, text=True)
            if exists.stdout.strip() == "1":
                continue
            made = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.pg_port),
                                   "-U", DB_USER, db], env=env, capture_output=True, text=True)
            if made.returncode != 0:
                raise StackError(f"createdb {db} failed: {made.stderr.strip()}")

    # --- MLflow ------------------------------------------------------------------------------------------
    def _start_mlflow(self, base_env: dict[str, str]) -> None:
        port = free_port()
        self.mlflow_url = f"http://127.0.0.1:{port}"
        ini = self.root / "mlflow_auth.ini"
        fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("[mlflow]\ndefault_permission = READ\n"
                    f"database_uri = {self.db_url('mlflow_auth')}\n"
                    f"admin_username = {ADMIN_USER}\nadmin_password = {self.creds.admin}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {**base_env, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": self.creds.secret_key,
               "MLFLOW_BACKEND_STORE_URI": self.db_url("mlflow"),  # from the environment: no password in argv
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--app-name", "basic-auth",
               "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        proc = self._spawn("mlflow", cmd, env)
        self._wait_http("mlflow", proc, f"{self.mlflow_url}/health", {})
        self._ensure_mlflow_users()

    def _ensure_mlflow_users(self) -> None:
        with _env(MLFLOW_TRACKING_USERNAME=ADMIN_USER, MLFLOW_TRACKING_PASSWORD=self.creds.admin):
            ensure_users(self.mlflow_url, {u: self.password(u) for u in (PIPELINE_USER, VIEWER_USER)})

    # --- Prefect -----------------------------------------------------------------------------------------
    def _start_prefect(self, base_env: dict[str, str]) -> None:
        port = free_port()
        self.prefect_api = f"http://127.0.0.1:{port}/api"
        env = {**base_env, "PREFECT_HOME": str(self.root / "prefect-home"),
               "PREFECT_API_DATABASE_CONNECTION_URL": self.db_url("prefect", "postgresql+asyncpg"),
               "PREFECT_SERVER_API_AUTH_STRING": f"admin:{self.creds.prefect}",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": self.prefect_api}
        prefect_bin = Path(sys.executable).with_name("prefect")
        cmd = [str(prefect_bin) if prefect_bin.exists() else "prefect", "server", "start",
               "--host", "127.0.0.1", "--port", str(port)]
        proc = self._spawn("prefect", cmd, env)
        self._wait_http("prefect", proc, f"{self.prefect_api}/health", {"Authorization": self.prefect_auth_header()})

    def _write_pipeline_env(self) -> None:
        path = self.root / "pipeline.env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"export {k}={v}\n" for k, v in self.client_env().items()))


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local_stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start PostgreSQL, MLflow and Prefect; stop them all on Ctrl-C")
    up.add_argument("--dir", type=Path, default=Path(".stack"), help="data, logs and credentials (default .stack)")
    args = parser.parse_args(argv)
    try:
        with Stack.start(args.dir) as stack:
            print(f"PostgreSQL  127.0.0.1:{stack.pg_port}   databases {', '.join(DATABASES)}")
            print(f"MLflow      {stack.mlflow_url}   users {ADMIN_USER}, {PIPELINE_USER}, {VIEWER_USER} (read-only)")
            print(f"Prefect     {stack.prefect_api.removesuffix('/api')}   auth string in PREFECT_API_AUTH_STRING")
            print(f"Passwords:  {stack.root / 'credentials.env'} (0600)")
            print(f"Pipeline:   source {stack.root / 'pipeline.env'} && grpo run")
            print("Ctrl-C stops the stack; its data stays in the folder for the next `up`.")
            signal.signal(signal.SIGTERM, _interrupt)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
