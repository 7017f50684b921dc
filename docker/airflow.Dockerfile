# syntax=docker/dockerfile:1.7
# Airflow for this project: the official image, the provider versions CI tests with (pyproject.toml's
# `airflow` extra), the DAG baked in (dags/ -> /opt/airflow/dags) and the stage table it derives its
# tasks and form from (stages/registry.py: no torch, no other stage code) on PYTHONPATH, so the DAG
# folder also loads where only dags/ is synced (the Helm chart's gitSync subPath dags). Used by
# infra/compose.yaml and by the Helm chart (infra/k8s/airflow-values.yaml: images.airflow). Stages never
# run in this image.
#
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/sparse-to-dense/airflow:3.3.2-0.1.0 .
#   docker push ghcr.io/sparse-to-dense/airflow:3.3.2-0.1.0
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}
ARG AIRFLOW_VERSION=3.3.2
ARG PROVIDER_STANDARD=1.21.0
ARG PROVIDER_DOCKER=4.6.1
ARG PROVIDER_KUBERNETES=10.25.0
# apache-airflow is named with its version so pip can never up- or downgrade Airflow itself
RUN pip install --no-cache-dir \
      "apache-airflow==${AIRFLOW_VERSION}" \
      "apache-airflow-providers-standard==${PROVIDER_STANDARD}" \
      "apache-airflow-providers-docker==${PROVIDER_DOCKER}" \
      "apache-airflow-providers-cncf-kubernetes==${PROVIDER_KUBERNETES}"
COPY --chown=airflow:0 stages/__init__.py stages/registry.py /opt/airflow/s2d/stages/
ENV PYTHONPATH=/opt/airflow/s2d
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
