"""The stage command, run by ``stages/__main__.py``:
``python -m stages <stage> --config <preset-or-yaml> --root <artifact-root> [...]``.

    python -m stages workflow --config tiny --root runs/demo          # everything, in order
    python -m stages teacher_rl --config tiny --root runs/demo --teacher runs/demo/bootstrap/teacher
    python -m stages validate --config qwen3-1.7b                      # check a config, load nothing
    python -m stages plan --config tiny --root runs/demo               # stage order + inputs, MLflow parent run
    python -m stages report --config tiny --root runs/demo --parent-run-id ID   # the table, from manifests
    python -m stages close-runs --root runs/demo --status FAILED      # end the root's open MLflow runs

Stage inputs default to the workflow's plan (e.g. kl_warmup reads <root>/teacher_rl/model when
stage 1 is on); --teacher / --student override them.

The same command runs as a local subprocess, in Docker and in a Kubernetes pod. Exit code 0 only
when the stage's outputs are published; the last stdout line is a JSON summary (URIs, metrics).
A user error (config, flag, input, data) is one line ``error: ...`` on stderr and exit code 2, found
before any model loads; any other failure is one line and exit code 1; ``--debug`` adds the traceback.

Orchestrators pass the arguments as data, never through a shell: ``python -m stages --args-env`` reads
them as a JSON list of strings from the environment variable ``S2D_ARGS_JSON``, ``python -m stages
--args-file PATH`` from a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .registry import NOT_PLANNED, STAGES

COMMANDS = (*STAGES, "workflow", "validate", "plan", "report", "close-runs")
ARGS_ENV = "S2D_ARGS_JSON"


def args_from_data(argv: list[str], env=os.environ) -> list[str]:
    """``--args-env`` (the JSON list in ``S2D_ARGS_JSON``, taken out of the environment) or ``--args-file
    PATH`` (a JSON list in a file) as the command's arguments; any other ``argv`` as it is."""
    if argv == ["--args-env"]:
        if ARGS_ENV not in env:
            raise SystemExit(f"error: --args-env: {ARGS_ENV} is not set")
        raw, where = env.pop(ARGS_ENV), ARGS_ENV
    elif len(argv) == 2 and argv[0] == "--args-file":
        try:
            raw, where = Path(argv[1]).read_text(), argv[1]
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: --args-file: cannot read {argv[1][:200]}: {type(e).__name__}") from None
    else:
        return argv
    try:
        args = json.loads(raw)
    except ValueError:
        args = None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or args[:1] in (["--args-env"], ["--args-file"]):
        raise SystemExit(f"error: {where} must hold a JSON list of strings (the command's arguments)")
    return args


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line (``error: ...``, exit 2) like every other user error, not the
    usage block; ``--help`` still prints the full help."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (python -m stages --help lists the commands and flags)")


def _command(value: str) -> str:
    if value in COMMANDS:
        return value
    import difflib

    close = difflib.get_close_matches(value, COMMANDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise argparse.ArgumentTypeError(f"unknown command '{value[:80]}': {hint}commands: {', '.join(COMMANDS)}")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", type=_command, metavar="command")
    p.add_argument("--config", default="tiny", help="preset name (stages/configs/) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set teacher_rl.steps=10 (repeatable)")
    p.add_argument("--root", default=None,
                   help="this run's artifact root: local folder or s3://bucket/prefix "
                        "(default: <S2D_ARTIFACT_BASE>/default; S2D_ARTIFACT_BASE is the base folder all runs live "
                        "under, as for the DAG: default 'runs'; the old name S2D_ARTIFACT_ROOT still works)")
    p.add_argument("--teacher", help="teacher checkpoint URI (default: from the config)")
    p.add_argument("--student", help="student checkpoint URI (default: from the config)")
    p.add_argument("--model", help="checkpoint to evaluate (evaluate)")
    p.add_argument("--label", default="model", help="name of this evaluation (evaluate)")
    p.add_argument("--parent-run-id", default=os.environ.get("S2D_PARENT_RUN_ID"),
                   help="MLflow parent run to attach the stage's child run to (env S2D_PARENT_RUN_ID)")
    p.add_argument("--if-planned", action="store_true",
                   help=f"exit {NOT_PLANNED} (orchestrators: 'skipped') when the config switches this stage off")
    p.add_argument("--approve", action="store_true", help="promote: a held promotion (promote.approval) goes through")
    p.add_argument("--reject", action="store_true", help="promote: a held promotion is refused (the champion stays)")
    p.add_argument("--by", default=os.environ.get("USER", ""), help="promote --approve/--reject: who decided")
    p.add_argument("--note", default="", help="promote --approve/--reject: why (kept on the version)")
    p.add_argument("--status", default="FAILED", choices=("FAILED", "KILLED", "FINISHED"),
                   help="close-runs: the status given to the root's runs still RUNNING")
    p.add_argument("--xcom-file", help="also write the JSON summary here (Kubernetes: /airflow/xcom/return.json)")
    p.add_argument("--overwrite-registered", action="store_true",
                   help="let a stage overwrite a stage folder whose checkpoint a registered model version pins "
                        "(env S2D_OVERWRITE_REGISTERED=1; an operator's decision, not a trigger parameter)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p.parse_args(argv)


def check_input(uri: str, what: str, spec=None) -> None:
    """Fail before any model loads when an input is missing, unfinished, unreadable or unreachable."""
    from .artifacts import check_files, find_manifest, located
    from .config import InputError
    from .models import check_source
    from .storage import ArtifactError, CorruptManifest, StorageUnavailable, uri_kind

    kind = uri_kind(uri)
    path = Path(uri.removeprefix("file://"))
    if kind == "local" and not path.exists():
        raise InputError(f"{what} {uri} does not exist (has the stage that writes it finished?)")
    try:
        found = find_manifest(uri) if kind in ("local", "s3") else None
    except CorruptManifest as e:  # the input is bad (not a storage fault): say which file
        raise InputError(f"{what}: {e}") from None
    if found is None:
        check_source(uri, what, spec)
        return
    if found[0] == uri.rstrip("/"):
        outputs = ", ".join(found[1].get("outputs", {}).values()) or "none"
        raise InputError(f"{what} {uri}: a stage folder, not a model; pass one of its outputs: {outputs}")
    try:
        check_files(located(uri))  # an output taken from the shared store: its files are there
    except StorageUnavailable:
        raise
    except ArtifactError as e:
        raise InputError(f"{what}: {e}") from None


def check_root(root: str, what: str = "--root") -> None:
    """The artifact root names a place this project can write: a local folder, ``file://`` or ``s3://bucket/...``;
    anything else (``gs://``, ``models:/``, a URL with a password in it) is an error blamed on the root itself,
    before any input is looked at."""
    from .config import InputError
    from .redact import has_credentials, redact
    from .storage import uri_kind

    kind = uri_kind(root)
    if kind in ("unsupported", "registry"):
        scheme = root.split(":", 1)[0]
        raise InputError(f"{what} {redact(root)[:300]}: unsupported URI scheme '{scheme[:20]}' for an artifact root "
                         "(use a local folder, file:// or s3://bucket/prefix)")
    if kind == "s3" and not root.removeprefix("s3://").split("/", 1)[0]:
        raise InputError(f"{what} {root[:300]}: no bucket (use s3://bucket/prefix)")
    if has_credentials(root):
        raise InputError(f"{what} {redact(root)[:300]}: a credential inside the URI; credentials come from the "
                         "environment (AWS_* / the pod's Secret), never from the root")


def check_tokenizers(cfg, command: str, inputs: dict[str, str]) -> None:
    """A teacher/student tokenizer mismatch, from the tokenizer and config files alone (no weights loaded):
    for stages that read both roles with an in-process teacher. Files that cannot be read here (a hub id not
    in the cache) are left to the stage's own loader."""
    from .models import check_compatible, read_tokenizer
    from .registry import get

    spec = get(command) if command != "workflow" else None
    roles = {spec.inputs[k]: uri for k, uri in inputs.items()} if spec else inputs
    # a served teacher is checked against the student through the server's /tokenize when the stage opens it
    if not ({"teacher", "student"} <= set(roles)) or cfg.teacher.engine == "server":
        return
    t = read_tokenizer(roles["teacher"], cfg.models.teacher)
    s = read_tokenizer(roles["student"], cfg.models.student)
    if t is not None and s is not None:
        check_compatible(t[0], s[0], vocab_rows=(t[1], s[1]), names=(roles["teacher"], roles["student"]))


def emit(args, payload: dict) -> None:
    from .redact import redact
    from .storage import dumps

    line = redact(dumps(payload))  # strict JSON: orchestrators parse this line (XCom: no URI password in it)
    if args.xcom_file:
        Path(args.xcom_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.xcom_file).write_text(line)
    print(line, flush=True)


LAUNCHED_ENV = ("LOCAL_RANK", "ACCELERATE_PROCESS_ID", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_USE_FSDP")


def relaunch_command(argv: list[str], env=os.environ) -> list[str] | None:
    """``accelerate launch`` of this same command when ``S2D_GPUS`` > 1 and we are not already inside a
    launch (no LOCAL_RANK / ACCELERATE_* in the environment); None otherwise.

    ``S2D_ACCELERATE_CONFIG`` names the accelerate config (default: infra/accelerate/deepspeed_zero3.yaml).
    """
    try:
        gpus = int(env.get("S2D_GPUS", "1"))
    except ValueError:
        raise SystemExit(f"error: S2D_GPUS must be an integer, got {env.get('S2D_GPUS')!r}") from None
    if gpus <= 1 or any(k in env for k in LAUNCHED_ENV) or (argv and argv[0] in ("validate", "plan", "report", "promote")):
        return None
    cfg = env.get("S2D_ACCELERATE_CONFIG") or str(Path(__file__).resolve().parents[1] / "infra/accelerate/deepspeed_zero3.yaml")
    if not Path(cfg).exists():
        raise SystemExit(f"error: accelerate config {cfg} not found (set S2D_ACCELERATE_CONFIG)")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg, "--num_processes", str(gpus),
            "-m", "stages", *argv]


def main(argv=None) -> int:
    """Run a command; every failure is one line on stderr (2: a user error, 1: anything else)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # SIGTERM (Airflow, Kubernetes, docker stop) unwinds like an exception: scratch folders, locks and
    # MLflow runs are closed by the code that opened them
    import threading

    from .config import InputError
    from .storage import ArtifactError, LockHeld, NotWritable

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        argv = args_from_data(argv)
        return _main(argv)
    except (KeyboardInterrupt, Terminated) as e:
        print(f"error: {'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}; nothing published "
              "by the unfinished stage, its last resume state kept", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except (SystemExit, Exception) as e:  # noqa: BLE001 - the one place every error becomes one line
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise  # argparse's own exits (--help, usage errors) and plain exit codes
        from .redact import redact

        if "--debug" in argv:
            import traceback

            print(redact(traceback.format_exc()), file=sys.stderr, end="")
        msg = redact(str(e.code if isinstance(e, SystemExit) else e)).removeprefix("error: ")
        msg = " ".join(msg.split()) or type(e).__name__
        user = isinstance(e, (SystemExit, InputError, NotWritable)) and not isinstance(e, LockHeld)
        if not user and not isinstance(e, ArtifactError):
            msg = f"{type(e).__name__}: {msg} (--debug shows the traceback)"
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2 if user else 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def artifact_base(env=os.environ) -> str:
    """The base folder (or ``s3://`` prefix) runs live under: ``S2D_ARTIFACT_BASE``, else the deprecated
    ``S2D_ARTIFACT_ROOT`` (with a warning: it never was a run's root), else ``runs``."""
    base = env.get("S2D_ARTIFACT_BASE")
    if not base and env.get("S2D_ARTIFACT_ROOT"):
        print("warning: S2D_ARTIFACT_ROOT is deprecated: it names the base folder of all runs, set S2D_ARTIFACT_BASE",
              file=sys.stderr)
        base = env["S2D_ARTIFACT_ROOT"]
    return (base or "runs").rstrip("/") or "/"


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that ``finally`` blocks and context managers run (a
    BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it)."""


def _terminate(signum, frame):
    raise Terminated()


def _main(argv: list[str]) -> int:
    from . import ray_train

    if ray_train.wanted(argv):  # S2D_ENGINE=ray: this same command on S2D_RAY_WORKERS Ray Train workers
        return ray_train.run(argv, parse_args, main)
    relaunch = relaunch_command(argv)
    if relaunch is not None:
        import subprocess

        print(f"relaunching on {os.environ['S2D_GPUS']} processes: {' '.join(relaunch)}", file=sys.stderr, flush=True)
        return subprocess.call(relaunch)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .redact import install_log_filter, redact

    install_log_filter()  # no log line carries the password inside a URI (MLflow, S3 endpoint, teacher URL)
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .config import ConfigError, check_runtime, load_config

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    cfg = load_config(args.config, args.overrides)
    try:
        check_runtime(cfg)  # this host has the device, a task plugin imports
    except ConfigError as e:
        if args.command != "validate" or not str(e).startswith("device"):
            raise
        print(f"warning: {redact(str(e))}", file=sys.stderr)  # validating for another host is fine; running here is not
    warnings: list[str] = []
    if args.command not in ("report", "close-runs"):  # task data and plugin: before any model or MLflow run
        from .prompting import preflight

        warnings = preflight(cfg, allow_unavailable=args.command == "validate")
        for w in warnings:
            print(f"warning: {redact(w)}", file=sys.stderr)
    if args.command == "validate":  # everything that needs no model: the config, this host, the task's data
        emit(args, {"valid": True, "name": cfg.name, "warnings": warnings})
        return 0

    from . import workflow
    from .lineage import resolve_model_uri
    from .tracking import TrackingUnavailable, close_runs

    root = (args.root or f"{artifact_base()}/default").rstrip("/")
    check_root(root, "--root" if args.root else "S2D_ARTIFACT_BASE")
    if args.overwrite_registered:
        os.environ["S2D_OVERWRITE_REGISTERED"] = "1"  # read by workflow.guard_registered (and forwarded to Ray workers)
    if args.command == "close-runs":  # the DAG's failure callback / teardown: no run stays RUNNING forever
        try:
            closed = close_runs(cfg.tracking, root, args.status)
        except TrackingUnavailable as e:
            print(f"error: {redact(str(e))}", file=sys.stderr)
            return 1
        emit(args, {"root": root, "status": args.status, "closed": closed})
        return 0
    try:
        return _run(args, cfg, root, workflow, resolve_model_uri)
    except TrackingUnavailable as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except ValueError as e:
        if str(e).startswith("models:/"):  # a registry reference that does not resolve
            print(f"error: {redact(str(e))}", file=sys.stderr)
            return 2
        raise


def _promote(args, cfg, root: str, workflow, resolve_model_uri) -> int:
    """The promotion gate (``--if-planned``: only when it is on and there is a registry), or a verdict on a
    promotion held for approval (``--approve`` / ``--reject``)."""
    from .recipes.promote import format_decision

    if args.approve and args.reject:
        raise SystemExit("error: --approve and --reject exclude each other")
    if args.approve or args.reject:
        summary = workflow.approve(cfg, root, args.approve, args.by, args.note, args.parent_run_id)
    elif args.if_planned and not workflow.gate_planned(cfg):
        why = "promote.enabled is false" if not cfg.promote.enabled else "no model registry (tracking off or no student name)"
        emit(args, {"stage": "promote", "skipped": why})
        return NOT_PLANNED
    else:
        summary = workflow.promote(cfg, root, args.parent_run_id, args.model and resolve_model_uri(args.model))
    d = summary["promotion"]
    text = format_decision(d, d.get("approval"))
    print(text, flush=True)
    # the comparison's text travels with the decision: the DAG's approval task shows it, alerts send it
    emit(args, {"stage": "promote", "status": (d.get("approval") or {}).get("verdict") or d["status"], "passed": d["passed"],
                "version": d.get("version"), "champion": d.get("champion_now"), "uri": f"{root}/promote", "comparison": text})
    return 0


def _run(args, cfg, root: str, workflow, resolve_model_uri) -> int:
    from .config import InputError

    if args.command == "plan":  # validate, open (or find) the MLflow parent run, print the stage plan
        steps = workflow.plan(cfg, root)
        if mismatch := workflow.budget_mismatch(cfg):
            print(mismatch, file=sys.stderr, flush=True)
        emit(args, {"root": root, "parent_run_id": workflow.open_parent(cfg, root), "stages": [s["stage"] for s in steps]})
        return 0
    if args.command == "report":
        summary = workflow.report(cfg, root, args.parent_run_id)
        emit(args, {"final_student": summary["final_student"], "teacher": summary["teacher"], "headline": summary["headline"]})
        return 0
    if args.command == "promote":
        return _promote(args, cfg, root, workflow, resolve_model_uri)
    if args.command == "workflow":
        pairs = [s for s in workflow.plan(cfg, root) if {"teacher", "student"} <= set(STAGES[s["stage"]].inputs.values())]
        if pairs:  # the base models' tokenizers (a setup stage's output that does not exist yet is not read)
            check_tokenizers(cfg, "workflow", {r: workflow.base_uri(cfg, root, r) for r in ("teacher", "student")})
        summary = workflow.run(cfg, root, args.parent_run_id)
        emit(args, {"final_student": summary["final_student"], "teacher": summary["teacher"], "headline": summary["headline"]})
        return 0

    cmd = args.command
    if args.if_planned and STAGES[cmd].kind != "tool" and cmd not in {s["stage"] for s in workflow.plan(cfg, root)}:
        emit(args, {"stage": cmd, "skipped": "not planned"})
        return NOT_PLANNED
    explicit = {"teacher": args.teacher, "student": args.student, "final_student": args.model}
    # models:/<name>/<version> (or @alias) names a registered version: its checkpoint URI is the input
    inputs = workflow.stage_inputs(cfg, root, cmd, {k: v and resolve_model_uri(v) for k, v in explicit.items()})
    from .lora import preflight as lora_preflight
    from .storage import ArtifactError

    for what, uri in inputs.items():
        role = STAGES[cmd].inputs[what]
        check_input(uri, what, cfg.models.teacher if role == "teacher" else cfg.models.student)
        try:
            lora_preflight(cfg, cmd, role, uri)  # LoRA: an adapter input's base digest, target modules
        except ArtifactError as e:  # a damaged or incomplete input is the caller's to fix: exit 2
            raise InputError(f"{what}: {e}") from None
    try:
        check_tokenizers(cfg, cmd, inputs)  # from the tokenizer files alone, before any model loads
    except ArtifactError as e:
        raise InputError(str(e)) from None
    name = f"evaluate/{args.label}" if cmd == "evaluate" else cmd
    from .teacher import TeacherUnavailable

    try:
        manifest, skipped = workflow.run_stage(cfg, root, name, inputs, args.parent_run_id)
    except TeacherUnavailable as e:  # nothing published; the last saved state is kept for the rerun
        from .redact import redact

        print(f"error: {redact(str(e))} (stage {cmd} stopped without publishing; rerun it to resume)", file=sys.stderr)
        return 1
    emit(args, {"stage": cmd, "skipped": skipped, "uri": f"{root}/{name}", "outputs": manifest["outputs"],
                "metrics": manifest["metrics"], "mlflow_run_id": manifest.get("mlflow_run_id")})
    return 0
