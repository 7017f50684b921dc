#!/bin/bash
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d): the MLflow
# database and its own user, next to Airflow's metadata database.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE USER mlflow WITH PASSWORD :'pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
