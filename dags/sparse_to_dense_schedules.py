"""Broken schedule files, where operators look: Airflow's import errors (the UI's "Dag Import Errors",
``airflow dags list-import-errors``).

The scheduled DAGs ``sparse_to_dense__<name>`` are built by ``sparse_to_dense.py`` from the schedule files
(``s2d_schedules``); a file that does not load (a bad cron, a conf the form or the deployment's policy
refuses, an unknown key, not YAML) gets no DAG there. This Airflow DAG file defines no DAG: it reads the
same folder with the same checks and fails to import when a file does not load, naming each file and
why. Airflow marks every DAG of a file with an import error as stale, which is why the error is raised
here and not in ``sparse_to_dense.py``: the manual DAG and every good schedule keep running.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # Airflow's own commands do not put the DAG folder on sys.path
    sys.path.insert(0, HERE)

import s2d_form  # noqa: E402
import s2d_schedules  # noqa: E402

s2d_schedules.check(s2d_schedules.folder(), s2d_form.form_params())
