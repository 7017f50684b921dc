"""Stage commands: ``python -m stages <stage> --config <preset-or-yaml> --root <artifact-root> [...]``.

    python -m stages workflow --config tiny --root runs/demo          # everything, in order
    python -m stages teacher_rl --config tiny --root runs/demo --teacher runs/demo/bootstrap/teacher
    python -m stages validate --config qwen3-1.7b                      # check a config, load nothing
    python -m stages plan --config tiny --root runs/demo               # stage order + inputs, MLflow parent run
    python -m stages report --config tiny --root runs/demo --parent-run-id ID   # the table, from manifests

Stage inputs default to the workflow's plan (e.g. kl_warmup reads <root>/teacher_rl/model when
stage 1 is on); --teacher / --student override them.

The same command runs as a local subprocess, in Docker and in a Kubernetes pod. Exit code 0 only
when the stage's outputs are published; the last stdout line is a JSON summary (URIs, metrics).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .registry import STAGES

NOT_PLANNED = 99
COMMANDS = (*STAGES, "workflow", "validate", "plan", "report")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", default="tiny", help="preset name (stages/configs/) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set teacher_rl.steps=10 (repeatable)")
    p.add_argument("--root", default=None,
                   help="this run's artifact root: local folder or s3://bucket/prefix "
                        "(default: <S2D_ARTIFACT_ROOT>/default; S2D_ARTIFACT_ROOT is the base folder all runs live "
                        "under, as for the DAG: default 'runs')")
    p.add_argument("--teacher", help="teacher checkpoint URI (default: from the config)")
    p.add_argument("--student", help="student checkpoint URI (default: from the config)")
    p.add_argument("--model", help="checkpoint to evaluate (evaluate)")
    p.add_argument("--label", default="model", help="name of this evaluation (evaluate)")
    p.add_argument("--parent-run-id", default=os.environ.get("S2D_PARENT_RUN_ID"),
                   help="MLflow parent run to attach the stage's child run to (env S2D_PARENT_RUN_ID)")
    p.add_argument("--if-planned", action="store_true",
                   help=f"exit {NOT_PLANNED} (orchestrators: 'skipped') when the config switches this stage off")
    p.add_argument("--xcom-file", help="also write the JSON summary here (Kubernetes: /airflow/xcom/return.json)")
    return p.parse_args(argv)


def check_input(uri: str, what: str) -> None:
    """Fail before any model loads when a local input is missing or unfinished."""
    from .artifacts import find_manifest, uri_kind

    if uri_kind(uri) != "local":
        return
    path = Path(uri.removeprefix("file://"))
    if not path.exists():
        raise SystemExit(f"error: {what} {uri} does not exist (has the stage that writes it finished?)")
    if find_manifest(uri) is None and not (path / "config.json").exists():
        raise SystemExit(f"error: {what} {uri} has no manifest.json and is not a Hugging Face checkpoint folder")


def emit(args, payload: dict) -> None:
    line = json.dumps(payload)
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
    if gpus <= 1 or any(k in env for k in LAUNCHED_ENV) or (argv and argv[0] in ("validate", "plan", "report")):
        return None
    cfg = env.get("S2D_ACCELERATE_CONFIG") or str(Path(__file__).resolve().parents[1] / "infra/accelerate/deepspeed_zero3.yaml")
    if not Path(cfg).exists():
        raise SystemExit(f"error: accelerate config {cfg} not found (set S2D_ACCELERATE_CONFIG)")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg, "--num_processes", str(gpus),
            "-m", "stages", *argv]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    relaunch = relaunch_command(argv)
    if relaunch is not None:
        import subprocess

        print(f"relaunching on {os.environ['S2D_GPUS']} processes: {' '.join(relaunch)}", file=sys.stderr, flush=True)
        return subprocess.call(relaunch)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .config import ConfigError, load_config

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "validate":
        emit(args, {"valid": True, "name": cfg.name})
        return 0

    from . import workflow

    root = (args.root or f"{os.environ.get('S2D_ARTIFACT_ROOT', 'runs').rstrip('/')}/default").rstrip("/")
    if args.command == "plan":  # validate, open (or find) the MLflow parent run, print the stage plan
        steps = workflow.plan(cfg, root)
        emit(args, {"root": root, "parent_run_id": workflow.open_parent(cfg, root), "stages": [s["stage"] for s in steps]})
        return 0
    if args.command == "report":
        summary = workflow.report(cfg, root, args.parent_run_id)
        emit(args, {"final_student": summary["final_student"], "teacher": summary["teacher"], "headline": summary["headline"]})
        return 0
    if args.command == "workflow":
        summary = workflow.run(cfg, root, args.parent_run_id)
        emit(args, {"final_student": summary["final_student"], "teacher": summary["teacher"], "headline": summary["headline"]})
        return 0

    cmd = args.command
    if args.if_planned and STAGES[cmd].kind != "tool" and cmd not in {s["stage"] for s in workflow.plan(cfg, root)}:
        emit(args, {"stage": cmd, "skipped": "not planned"})
        return NOT_PLANNED
    explicit = {"teacher": args.teacher, "student": args.student, "base_student": args.student, "final_student": args.model}
    inputs = workflow.stage_inputs(cfg, root, cmd, explicit)
    for what, uri in inputs.items():
        check_input(uri, what)
    name = f"evaluate/{args.label}" if cmd == "evaluate" else cmd
    manifest, skipped = workflow.run_stage(cfg, root, name, inputs, args.parent_run_id)
    emit(args, {"stage": cmd, "skipped": skipped, "uri": f"{root}/{name}", "outputs": manifest["outputs"],
                "metrics": manifest["metrics"], "mlflow_run_id": manifest.get("mlflow_run_id")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
