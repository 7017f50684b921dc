"""A stage as a Ray Train job: the same stage command on N workers, for stages that outgrow one node.

    S2D_ENGINE=ray S2D_RAY_WORKERS=16 python -m stages teacher_rl --config llama3.1-8b --root s3://...

This process becomes the Ray *driver*: it checks the config (a bad one is a one-line error, exit 2,
before Ray starts), connects to the cluster (``RAY_ADDRESS``, which a KubeRay ``RayJob`` sets for its
entrypoint; a local Ray runtime when unset) and runs a ``TorchTrainer`` whose workers each run the
unchanged stage command in-process. Ray Train sets up ``torch.distributed`` (gloo on CPUs, NCCL on GPUs)
and the usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables, so the stage's ``Accelerator`` sees a
launched multi-process run exactly as under ``accelerate launch``: rollouts split across ranks and
gathered, gradients averaged, rank 0 writing resume states, artifacts (manifest last) and the MLflow
child run.

Failures: ``FailureConfig(max_failures)`` makes Ray restart the whole worker group when a worker dies
(a lost node, an OOM-killed process); the restarted stage command resumes from its last resume state
under ``<root>/<stage>/_resume`` (``checkpoint_every``), the same state a plain restart uses, so Ray's
own checkpoints are not needed. An input error (exit 2) or "not planned" (exit 99) is not retried.

Settings (environment): ``S2D_RAY_WORKERS`` (default 2), ``S2D_RAY_GPUS_PER_WORKER`` (default 1 when the
config's device is cuda, else 0), ``S2D_RAY_CPUS_PER_WORKER`` (default 1), ``S2D_RAY_MAX_FAILURES``
(default 2), ``S2D_RAY_STORAGE`` (Ray Train's run folder; default Ray's). Non-secret settings are passed
to the workers in the job's runtime environment; credentials are not: workers read them from their own
environment (the pods' ``envFrom`` Secret on Kubernetes).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("stages.ray")

ENGINE = "S2D_ENGINE"
INSIDE = "S2D_RAY_RANK"  # set in each worker: the stage command there runs the stage, never Ray again
FORWARD_PREFIXES = ("S2D_", "MLFLOW_", "AWS_", "HF_", "TQDM_", "TOKENIZERS_", "OMP_", "PYTHONPATH", "DS_ACCELERATOR",
                    "AIRFLOW_CTX_")
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET", "CREDENTIAL")


def wanted(argv: list[str], env=os.environ) -> bool:
    """True when this stage command should run as a Ray Train job (``S2D_ENGINE=ray``, a stage command,
    not already inside a Ray Train worker)."""
    engine = env.get(ENGINE, "")
    if engine not in ("", "ray", "local"):
        raise SystemExit(f"error: {ENGINE} must be 'ray' or unset, got {engine!r}")
    from .registry import STAGES  # the stage commands; bookkeeping commands and the workflow stay in one process

    # the promotion gate evaluates and talks to the registry: one process, never a Ray job
    return engine == "ray" and INSIDE not in env and bool(argv) and argv[0] in STAGES and STAGES[argv[0]].kind != "gate"


def _int(env, name: str, default: int, low: int = 0) -> int:
    raw = env.get(name)
    try:
        value = int(raw) if raw not in (None, "") else default
    except ValueError:
        raise SystemExit(f"error: {name} must be an integer, got {raw!r}") from None
    if value < low:
        raise SystemExit(f"error: {name} must be >= {low}, got {value}")
    return value


def scaling(env, device: str) -> dict:
    """Workers and resources from the settings: ``ScalingConfig`` keyword arguments."""
    gpus = _int(env, "S2D_RAY_GPUS_PER_WORKER", 0 if device == "cpu" else 1)
    resources = {"CPU": _int(env, "S2D_RAY_CPUS_PER_WORKER", 1)}
    if gpus:
        resources["GPU"] = gpus
    return {"num_workers": _int(env, "S2D_RAY_WORKERS", 2, low=1), "use_gpu": gpus > 0, "resources_per_worker": resources}


def forwarded_env(env=os.environ) -> dict[str, str]:
    """What the workers get from the driver's environment: settings and the Airflow try identity
    (``AIRFLOW_CTX_*``: a Ray Train restart of rank 0 is then a retry of the same task, which waits out the
    stage lock of the group Ray just tore down instead of failing with LockHeld), never credentials: neither
    variables named like secrets nor values that carry one inside a URI (``http://user:pass@host``), which
    the workers must get from their own environment (the pods' Secret) like the other credentials."""
    from .redact import has_credentials

    return {k: v for k, v in env.items()
            if k.startswith(FORWARD_PREFIXES) and not any(w in k for w in SECRET_WORDS) and k != INSIDE
            and not has_credentials(v)}


def withheld_env(env=os.environ) -> list[str]:
    """Settings NOT forwarded because their value carries a credential inside a URI (names only)."""
    from .redact import has_credentials

    return sorted(k for k, v in env.items() if k.startswith(FORWARD_PREFIXES) and not any(w in k for w in SECRET_WORDS)
                  and has_credentials(v))


def run(argv: list[str], parse_args, entry, env=os.environ) -> int:
    """Run ``python -m stages <argv>`` on N Ray Train workers; print rank 0's JSON summary last. ``parse_args``
    and ``entry`` are the stage command's own (``stages.cli``; passed in, so that this module imports no CLI)."""
    from .config import ConfigError, load_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kw = scaling(env, cfg.device)
    max_failures = _int(env, "S2D_RAY_MAX_FAILURES", 2)

    withheld = withheld_env(env)
    if withheld:
        print(f"warning: not forwarded to the Ray workers (a credential inside the value): {', '.join(withheld)}; "
              "the workers read them from their own environment", file=sys.stderr, flush=True)

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address=env.get("RAY_ADDRESS") or None, runtime_env={"env_vars": forwarded_env(env)},
             log_to_driver=True, configure_logging=False)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"argv": list(argv), "cwd": os.getcwd(), "entry": entry},
            torch_config=TorchConfig(backend="nccl" if kw["use_gpu"] else "gloo"),
            scaling_config=ScalingConfig(**kw),
            run_config=RunConfig(name=f"s2d-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                 storage_path=env.get("S2D_RAY_STORAGE") or None,
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        print(f"running {args.command} on {kw['num_workers']} Ray Train workers ({kw['resources_per_worker']} each, "
              f"up to {max_failures} restarts)", file=sys.stderr, flush=True)
        try:
            result = trainer.fit()
        except Exception as e:  # the worker group failed more than max_failures times
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            from .redact import redact

            print(f"error: {args.command} failed on Ray Train: {redact(why)}", file=sys.stderr)
            return 1
    finally:
        ray.shutdown()
    rc, line, error = result.return_value  # rank 0's exit code, JSON summary and one-line error
    if error:
        print(error, file=sys.stderr, flush=True)
    if line:
        if args.xcom_file:
            Path(args.xcom_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.xcom_file).write_text(line)
        print(line, flush=True)
    return rc


def _worker(config: dict) -> tuple[int, str, str]:
    """One Ray Train worker: the stage command in this process (torch.distributed is already set up)."""
    import ray.train

    main = config["entry"]

    ctx = ray.train.get_context()
    os.environ[INSIDE] = str(ctx.get_world_rank())
    if Path(config["cwd"]).is_dir():  # relative artifact roots mean the same folder as for the driver
        os.chdir(config["cwd"])
    print(f"ray train worker rank {ctx.get_world_rank()}/{ctx.get_world_size()} pid {os.getpid()} "
          f"node {ctx.get_node_rank()}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="s2d-ray-") as d, contextlib.redirect_stderr(_ErrorLine(sys.stderr)) as err:
        summary = Path(d) / "summary.json"
        # the stage command turns its errors into one line and an exit code (2: bad input, final, so not
        # retried); an exception escaping it is a failure Ray retries
        rc = main([*config["argv"], "--xcom-file", str(summary)])
        line = summary.read_text() if summary.exists() else ""
    return rc, line, err.error


class _ErrorLine(io.TextIOBase):
    """stderr as it was, remembering the stage command's last ``error: ...`` line for the driver."""

    def __init__(self, stream):
        self.stream, self.error, self._tail = stream, "", ""

    def write(self, s: str) -> int:
        self.stream.write(s)
        *lines, self._tail = (self._tail + s).split("\n")
        self.error = next((x for x in reversed(lines) if x.startswith("error: ")), self.error)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
