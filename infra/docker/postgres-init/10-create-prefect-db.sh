#!/bin/sh
# Runs once, when the postgres volume is first initialised: POSTGRES_DB (MLflow's database) is created by
# the image itself; this adds Prefect's database and MLflow's auth database (users, permissions).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<EOSQL
CREATE DATABASE "${PREFECT_DB:-prefect}";
CREATE DATABASE "${MLFLOW_AUTH_DB:-mlflow_auth}";
EOSQL
