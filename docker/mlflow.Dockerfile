# syntax=docker/dockerfile:1.7
# The MLflow tracking server: the published mlflow image has neither a Postgres driver nor boto3, and
# installing them at container start would make every start depend on a package index. This image
# pins them. Used by infra/compose.yaml and infra/k8s/mlflow.yaml. Two Postgres drivers: SQLAlchemy 2.1
# (what mlflow 3.17.2 installs) maps a plain postgresql:// URI (compose.yaml, the k8s secret) to
# psycopg 3, and postgresql+psycopg2:// URIs keep working.
#
#   docker build -f docker/mlflow.Dockerfile -t ghcr.io/sparse-to-dense/mlflow:3.17.2 docker/
#   docker push ghcr.io/sparse-to-dense/mlflow:3.17.2
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG PSYCOPG_VERSION=3.3.9
ARG BOTO3_VERSION=1.44.8
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" \
      "psycopg[binary]==${PSYCOPG_VERSION}" "boto3==${BOTO3_VERSION}" \
 && groupadd --gid 10001 mlflow \
 && useradd --uid 10001 --gid mlflow --create-home --shell /usr/sbin/nologin mlflow
# One server process per container (scale with replicas); the job runner is off: it would start
# extra worker processes this server does not need.
ENV MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
