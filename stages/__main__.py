"""Stage commands: ``python -m stages <stage> --config <preset-or-yaml> --root <artifact-root> [...]``.

    python -m stages workflow --config tiny --root runs/demo          # everything, in order
    python -m stages teacher_rl --config tiny --root runs/demo --teacher runs/demo/bootstrap/teacher
    python -m stages validate --config qwen3-1.7b                      # check a config, load nothing

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

COMMANDS = ("bootstrap", "teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl", "direct_grpo", "evaluate",
            "workflow", "validate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--config", default="tiny", help="preset name (stages/configs/) or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set teacher_rl.steps=10 (repeatable)")
    p.add_argument("--root", default=os.environ.get("S2D_ARTIFACT_ROOT", "runs/default"),
                   help="artifact root: local folder or s3://bucket/prefix (env S2D_ARTIFACT_ROOT)")
    p.add_argument("--teacher", help="teacher checkpoint URI (default: from the config)")
    p.add_argument("--student", help="student checkpoint URI (default: from the config)")
    p.add_argument("--model", help="checkpoint to evaluate (evaluate)")
    p.add_argument("--label", default="model", help="name of this evaluation (evaluate)")
    p.add_argument("--parent-run-id", default=os.environ.get("S2D_PARENT_RUN_ID"),
                   help="MLflow parent run to attach the stage's child run to (env S2D_PARENT_RUN_ID)")
    return p.parse_args(argv)


def check_input(uri: str, what: str) -> None:
    """Fail before any model loads when a local input is missing or unfinished."""
    from .artifacts import find_manifest
    from .runtime import _is_hub_id

    if "://" in uri and not uri.startswith("file://") or _is_hub_id(uri):
        return
    path = Path(uri.removeprefix("file://"))
    if not path.exists():
        raise SystemExit(f"error: {what} {uri} does not exist (has the stage that writes it finished?)")
    if find_manifest(uri) is None and not (path / "config.json").exists():
        raise SystemExit(f"error: {what} {uri} has no manifest.json and is not a Hugging Face checkpoint folder")


def main(argv=None) -> int:
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
        print(json.dumps({"valid": True, "name": cfg.name}))
        return 0

    from .workflow import base_uri

    root = args.root
    teacher = args.teacher or base_uri(cfg, root, "teacher")
    student = args.student or base_uri(cfg, root, "student")
    if args.command == "workflow":
        from . import workflow

        summary = workflow.run(cfg, root, args.parent_run_id)
        print(json.dumps({"final_student": summary["final_student"], "headline": summary["headline"]}))
        return 0

    from . import bootstrap, evaluate, grpo, kl_warmup, onpolicy_distill
    from .runtime import StageRun

    cmd = args.command
    plan = {
        "bootstrap": (bootstrap.run, {}),
        "teacher_rl": (grpo.run, {"policy": teacher}),
        "student_rl": (grpo.run, {"policy": student}),
        "direct_grpo": (grpo.run, {"policy": student}),
        "kl_warmup": (kl_warmup.run, {"teacher": teacher, "student": student}),
        "onpolicy_distill": (onpolicy_distill.run, {"teacher": teacher, "student": student}),
        "evaluate": (evaluate.run, {"model": args.model or student}),
    }
    fn, inputs = plan[cmd]
    for what, uri in inputs.items():
        check_input(uri, what)
    name = f"evaluate/{args.label}" if cmd == "evaluate" else cmd
    run = StageRun(name, cfg, root, inputs=inputs, parent_run_id=args.parent_run_id)
    if run.finished:
        manifest, skipped = run.finished, True
    else:
        manifest, skipped = fn(run, *inputs.values()), False
    print(json.dumps({"stage": cmd, "skipped": skipped, "uri": run.uri, "outputs": manifest["outputs"],
                      "metrics": manifest["metrics"], "mlflow_run_id": manifest.get("mlflow_run_id")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
