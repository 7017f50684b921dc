#!/bin/bash
# The official image's convention: `bash ...` / `python ...` run as given, anything else is an
# Airflow subcommand (compose: `command: api-server`, `scheduler`, ...).
case "${1:-}" in
  bash|sh|python|python3) exec "$@" ;;
  *) exec airflow "$@" ;;
esac
