"""The one contract every runner keeps: what runs (:func:`stage_argv`: ``python -m stages --args-env``,
the stage image's ``ENTRYPOINT`` + ``CMD`` override), with which arguments (:func:`stage_args`, delivered as
data: a JSON list in the environment variable ``S2D_ARGS_JSON``, never on a command line a shell could
read) and which environment (:func:`stage_env`: ``S2D_GPUS``, the served teacher's URL).

Four runners (``s2d_runners``: ``local``, ``docker``, ``kubernetes``; ``s2d_rayjob``: ``rayjob``) change
only where the command runs. No trigger value ever reaches a shell: the command line is a constant, and
the KubeRay entrypoint (which KubeRay and Ray's job supervisor run through ``sh -c``) is that constant.
"""

from __future__ import annotations

import json
import logging
import os

import s2d_policy as policy
import s2d_settings as s
import s2d_table as table

ENTRYPOINT = ("python", "-m", "stages")  # docker/*.Dockerfile ENTRYPOINT and the pod's command (tested)
ARGS_FLAG = "--args-env"  # `python -m stages --args-env`: the arguments are the JSON list in ARGS_ENV
ARGS_ENV = "S2D_ARGS_JSON"
USER_ERROR = 2  # the stage command's exit code for bad input (one `error: ...` line on stderr)
NOT_PLANNED = table.NOT_PLANNED
FINAL_STUDENT_URI = "s2d://sparse_to_dense/final_student"
log = logging.getLogger(__name__)
XCOM_FILE = "/airflow/xcom/return.json"  # the pod runners' XCom sidecar file
# the approval's two outcomes (s2d_approval): task id -> the flag of `python -m stages promote`
VERDICTS = {"promote_approved": "--approve", "promote_rejected": "--reject"}


def overrides(params: dict) -> list[str]:
    """The trigger form's values as ``--set`` overrides of the preset (one field per step budget:
    :func:`s2d_table.budget_fields`)."""
    out = [f"seed={int(params['seed'])}", f"workflow.stages=[{','.join(params['stages'])}]",
           f"workflow.baseline={str(bool(params['baseline'])).lower()}"]
    for role in ("teacher", "student"):
        if params.get(role):
            out.append(f"models.{role}.source={params[role]}")
    out += [f"{key}={steps}" for key, steps in budgets(params).items()]
    out += list(params.get("overrides") or [])
    # deployment and form settings that change no stage's outputs (not in any stage's hash): the gate holds
    # a passing version for approval; the cost table prices accelerator hours
    if params.get("approval") is True:
        out.append("promote.approval=true")
    price = s.setting("usd_per_accelerator_hour")
    if price:
        out.append(f"cost.usd_per_accelerator_hour={float(price)}")
    return out


def budgets(params: dict) -> dict[str, int]:
    """The step budgets a trigger sets, by config key. The form shows the default preset's budgets
    (:func:`s2d_table.default_preset`); with another preset, a field still at that shown value is the chosen
    preset's own, not an override (a trigger or schedule naming only ``preset`` runs that preset)."""
    default = table.default_preset()
    shown = table.preset_budgets(default) if params.get("preset") != default else {}
    out = {}
    for field, key in table.budget_fields().items():
        steps = params.get(field)
        if steps is None or (field in shown and steps == shown[field]):
            continue
        out[key] = int(steps)
    return out


def kept_presets(params: dict) -> list[str]:
    """What :func:`budgets` read as the chosen preset's own, one line each (the plan task logs them)."""
    default = table.default_preset()
    if params.get("preset") == default:
        return []
    shown = table.preset_budgets(default)
    own = table.preset_budgets(params["preset"])
    return [f"{field}={params[field]} is the form's shown value (preset {default}'s): preset {params['preset']}'s own "
            f"{own[field] if own[field] is not None else '(none: not used)'} is used; to force {params[field]}, set the "
            f"override {key}={params[field]}"
            for field, key in table.budget_fields().items()
            if params.get(field) is not None and params.get(field) == shown[field] and own[field] != shown[field]]


def artifact_root(params: dict, dag_id: str, run_id: str) -> str:
    """The run's artifact root: the form's value (confined to the base, see :func:`s2d_policy.refusal`), else
    ``<base>/<dag_id>/<run_id>``."""
    if params.get("artifact_root"):
        return params["artifact_root"].rstrip("/")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return f"{s.artifact_base()}/{dag_id}/{safe}"


def stage_args(command: str, params: dict, root: str, parent_run_id: str | None = None, by: str | None = None) -> list[str]:
    """Arguments of ``python -m stages``: identical for every runner (tested). A verdict task (:data:`VERDICTS`)
    is ``promote --approve`` / ``--reject`` ``--by <who answered>``."""
    verdict = VERDICTS.get(command)
    args = ["promote" if verdict else command, "--config", params["preset"], "--root", root]
    if verdict:
        args += [verdict, "--by", by or "unknown"]
    for o in overrides(params):
        args += ["--set", o]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    if command in table.STAGES:
        args.append("--if-planned")
    return args


def task_args(command: str, params: dict, form: set[str], dag_id: str, run_id: str, plan=None,
              runner: str = "local", by: str | None = None) -> list[str]:
    """What every runner sends for one task of one DAG run: the trigger's values checked
    (:func:`s2d_policy.refusal`), the root and MLflow parent run from ``plan``'s XCom (``plan`` itself
    computes the root)."""
    problem = policy.refusal(params, form)
    if problem and command == "close-runs":  # the teardown: a refused run opened nothing to close
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"nothing to close: error: {problem}")
    if problem:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"error: {problem}")  # a refusal is not retried
    if command == "plan":  # say which step fields mean the chosen preset's own (the task log)
        for line in kept_presets(params):
            log.warning("%s", line)
    if isinstance(plan, str):
        plan = last_json(plan)
    root = (plan or {}).get("root") or artifact_root(params, dag_id, run_id)
    args = stage_args(command, params, root, (plan or {}).get("parent_run_id"), by)
    pod = runner == "kubernetes" or runner == "rayjob" and command not in table.GPU_STAGES  # XCom through the sidecar
    return args + (["--xcom-file", XCOM_FILE] if pod else [])


def verdict_by(command: str, ti) -> str | None:
    """Who answered the approval (a verdict task's ``--by``): the approval task's XCom ``response``."""
    if command not in VERDICTS:
        return None
    response = ti.xcom_pull(task_ids="approval", key="response") or {}
    return str(response.get("by") or "unknown")[:100]


def stage_argv(python: str | None = None) -> list[str]:
    """The command line, the same for every task: :data:`ENTRYPOINT` + :data:`ARGS_FLAG`. ``python``
    replaces the interpreter for the local runner (its venv's python); containers use the image's."""
    return [python or ENTRYPOINT[0], *ENTRYPOINT[1:], ARGS_FLAG]


def args_env(args: list[str]) -> dict[str, str]:
    """The stage's arguments as data: the environment variable the stage command reads them from."""
    return {ARGS_ENV: json.dumps(list(args))}


def gpu_count(stage: str) -> int:
    """GPUs a stage task holds (setting ``gpus_per_task``, default 1); bookkeeping commands get none."""
    return int(s.setting("gpus_per_task", "1")) if stage in table.GPU_STAGES else 0


def stage_env(stage: str) -> dict[str, str]:
    """Environment every runner gives the stage command, besides its arguments, credentials and tracking
    settings: ``S2D_GPUS`` (GPUs this task holds; the stage relaunches under ``accelerate launch`` above
    one) and, for the stages that read the teacher, ``S2D_TEACHER_URL`` (setting ``teacher_url``)."""
    env = {"S2D_GPUS": str(gpu_count(stage)), "PYTHONUNBUFFERED": "1"}
    if stage in table.TEACHER_STAGES and s.setting("teacher_url", ""):
        env["S2D_TEACHER_URL"] = s.setting("teacher_url", "")
    return env


def last_json(text: str) -> dict:
    """The stage command's JSON summary: the last line of its output that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("the stage command printed no JSON summary")


def user_error(lines: list[str], rc: int) -> str:
    """The stage command's one ``error:`` line (bounded), for a task that fails without retries."""
    said = [x.strip() for x in lines if x.startswith("error:")]
    text = said[-1] if said else f"error: the stage command refused its input (exit {rc})"
    return text if len(text) <= 1000 else text[:1000] + f" (…{len(text)} characters)"


def workdir() -> str:
    """The stage command's working directory (setting ``workdir``; relative artifact bases are under it)."""
    return s.setting("workdir") or os.getcwd()
