"""Deployment files, checked offline (no Docker engine, no cluster here):

- every Dockerfile passes hadolint with no finding, and each ignore says why;
- infra/compose.yaml validates against the Compose specification's schema, the Kubernetes manifests
  against the Kubernetes API schemas (kubernetes-validate, strict), the Helm values against
  infra/k8s/schemas/airflow-values.schema.json; each validator is shown to reject a broken file;
- the stage images' ENTRYPOINT is the runners' ENTRYPOINT (dags/s2d_contract.py: one contract);
- the stage command runs exactly as the CPU image would run it (its ENTRYPOINT, its ENV, the DAG's
  arguments) for the tiny preset, as a subprocess.
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TEST_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
STAGE_DOCKERFILES = ["stages.Dockerfile", "stages-cpu.Dockerfile", "vllm.Dockerfile"]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (pyproject.toml pins it)")
    return path


def runners():
    """The runners' contract (dags/s2d_contract.py): ENTRYPOINT, stage_args, stage_env, last_json."""
    sys.path.insert(0, str(REPO / "dags"))
    try:
        import s2d_contract
    finally:
        sys.path.pop(0)
    return s2d_contract


# ---------------------------------------------------------------- Dockerfiles


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf.endswith("\\"):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        buf = f"{buf[:-1]} {line.strip()}" if buf.endswith("\\") else line.strip()
        if buf and not buf.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def final_stage(instrs):
    """The instructions of the last build stage (what the image is)."""
    start = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[start:]


def env_of(instrs) -> dict[str, str]:
    """ENV key=value pairs of the final stage, ${VAR} references left as they are."""
    env = {}
    for k, rest in final_stage(instrs):
        if k == "ENV":
            for m in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
                env[m.group(1)] = m.group(2).strip('"')
    return env


def exec_form(instrs, name: str) -> list[str]:
    values = [rest for k, rest in final_stage(instrs) if k == name]
    assert values, f"no {name}"
    return json.loads(values[-1])  # the exec (JSON) form: no shell in between


@pytest.mark.parametrize("name", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_hadolint_finds_nothing(name):
    proc = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKER / name)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_hadolint_ignores_are_explained():
    for path in DOCKER.glob("*.Dockerfile"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                before = lines[i - 1].strip() if i else ""
                assert before.startswith("#") and "hadolint" not in before, f"{path.name}:{i + 1}: say why above the ignore"


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nUSER root\n")
    proc = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3014", "DL3008"):  # latest tag, no -y, unpinned apt package
        assert rule in proc.stdout


@pytest.mark.parametrize("name", STAGE_DOCKERFILES)
def test_stage_image_contract(name):
    """Same entrypoint as every runner, non-root, the multi-GPU settings the stage command reads."""
    r = runners()
    instrs = dockerfile(DOCKER / name)
    assert exec_form(instrs, "ENTRYPOINT") == list(r.ENTRYPOINT)
    env = env_of(instrs)
    assert env["S2D_GPUS"] == "1" and env["S2D_ACCELERATE_CONFIG"] == "/app/infra/accelerate/deepspeed_zero3.yaml"
    assert env["PATH"].startswith("/opt/venv/bin:") and env["PYTHONUNBUFFERED"] == "1"
    assert ("COPY", "infra/accelerate/ /app/infra/accelerate/") in final_stage(instrs)
    user = [rest for k, rest in final_stage(instrs) if k == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()  # numeric: runAsNonRoot can check it
    # the same contract in every stage image
    ref = dockerfile(DOCKER / STAGE_DOCKERFILES[0])
    assert exec_form(instrs, "ENTRYPOINT") == exec_form(ref, "ENTRYPOINT")
    assert {k: v for k, v in env.items() if k.startswith("S2D_")} == {
        k: v for k, v in env_of(ref).items() if k.startswith("S2D_")
    }


@pytest.mark.parametrize("path", sorted(DOCKER.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    instrs = dockerfile(path)
    args = {}
    for k, rest in instrs:
        if k == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    for k, rest in instrs:
        if k == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
            if image in {"build"}:
                continue
            assert ":" in image and not image.endswith(":latest"), f"{path.name}: FROM {image} is not pinned"


def test_vllm_image_keeps_vllm_torch():
    """vLLM owns torch/transformers/tokenizers; the stage package goes in without dependencies."""
    text = (DOCKER / "vllm.Dockerfile").read_text()
    assert 'pip install --no-cache-dir --no-deps .' in text
    assert "remaining_deps.py torch transformers tokenizers" in text
    sys.path.insert(0, str(DOCKER))
    try:
        from remaining_deps import remaining
    finally:
        sys.path.pop(0)
    rest = remaining(REPO / "pyproject.toml", {"torch", "transformers", "tokenizers"})
    assert rest and not any(re.match(r"(torch|transformers|tokenizers)\b", d) for d in rest)
    assert any(d.startswith("mlflow") for d in rest) and any(d.startswith("accelerate") for d in rest)


def test_dockerignore_is_an_allow_list():
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[0] == "*"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    # everything the Dockerfiles COPY from the context is let in, nothing more than that
    copied = set()
    for path in DOCKER.glob("*.Dockerfile"):
        for k, rest in dockerfile(path):
            if k == "COPY" and "--from=" not in rest:
                copied.update(a.rstrip("/") for a in rest.split()[:-1] if not a.startswith("--"))
    outside = {c for c in copied if not any(c == a or c.startswith(a + "/") for a in allowed)}  # a folder lets in its files
    assert not outside, outside
    assert not any(a.startswith((".venv", "runs", "infra/.env", ".git")) for a in allowed)


# ---------------------------------------------------------------- compose


def check_jsonschema(*args):
    return subprocess.run([tool("check-jsonschema"), *args], capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_spec():
    proc = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(INFRA / "compose.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path):
    doc = yaml.safe_load((INFRA / "compose.yaml").read_text())
    doc["services"]["mlflow"]["helthcheck"] = doc["services"]["mlflow"].pop("healthcheck")  # misspelt key
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    proc = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(bad))
    assert proc.returncode != 0 and "helthcheck" in proc.stdout


def compose():
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_stack_shape():
    doc = compose()
    svc = doc["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer"} <= set(svc)
    one_shot = {"minio-init", "airflow-init"}
    for name, s in svc.items():
        image = s["image"]
        assert re.search(r":[^:}]+(}|$)", image) and "latest" not in image, f"{name}: unpinned image {image}"
        if name not in one_shot:
            assert "healthcheck" in s, f"{name} has no health check"
        for dep, cond in (s.get("depends_on") or {}).items():
            want = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert cond["condition"] == want, f"{name} -> {dep}"
    env = svc["airflow-scheduler"]["environment"]
    assert env["S2D_RUNNER"] == "docker" and env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert "/var/run/docker.sock:/var/run/docker.sock" in svc["airflow-scheduler"]["volumes"]
    # stage containers join the stack's network by its fixed name, where minio and mlflow resolve
    assert doc["networks"]["s2d"]["name"] == env["S2D_DOCKER_NETWORK"] == "${S2D_DOCKER_NETWORK:-s2d}"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert json.loads(env["AIRFLOW_CONN_S2D_S3"].replace("${AWS_DEFAULT_REGION:-us-east-1}", "us-east-1"))["conn_type"] == "aws"
    assert "airflow pools set gpu" in svc["airflow-init"]["command"][0]
    # the MinIO root account never reaches Airflow or the stages
    assert not any("MINIO_ROOT" in v for v in map(str, env.values()))


def test_env_example_names_every_variable_and_env_is_ignored():
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), used - set(example)
    if (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO).returncode == 0
        example_ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env.example"], cwd=REPO).returncode == 0
        assert ignored and not example_ignored


def test_minio_init_uses_the_shipped_policies():
    script = (INFRA / "minio" / "init.sh").read_text()
    assert "/policies/minio-$name-policy.json" in script
    for name in ("stage", "mlflow"):
        assert (INFRA / "s3" / f"minio-{name}-policy.json").exists()


# ---------------------------------------------------------------- S3 policies


@pytest.mark.parametrize("name", sorted(p.name for p in (INFRA / "s3").glob("*.json")))
def test_s3_policies_are_least_privilege(name):
    policy = json.loads((INFRA / "s3" / name).read_text())
    assert policy["Version"] == "2012-10-17"
    prefix = "mlflow/" if "mlflow" in name else "runs/"
    actions = set()
    for st in policy["Statement"]:
        if st["Effect"] == "Deny":
            continue
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        assert not any("*" in a for a in acts), f"{name}: wildcard action"
        actions.update(acts)
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        for res in resources:
            if res == "arn:aws:s3:::S2D_BUCKET":  # bucket-level actions only under the prefix
                assert st["Condition"]["StringLike"]["s3:prefix"] == [f"{prefix}*"]
            else:
                assert res == f"arn:aws:s3:::S2D_BUCKET/{prefix}*", res
    # what stages/storage.py's S3Store calls: list, head/get, put (+multipart), delete
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"} <= actions
    if "bucket-policy" in name:
        assert all("Principal" in st for st in policy["Statement"])
        assert any(st["Effect"] == "Deny" and st["Condition"]["Bool"]["aws:SecureTransport"] == "false"
                   for st in policy["Statement"])


# ---------------------------------------------------------------- Kubernetes


def k8s_docs():
    for path in sorted([*K8S.glob("manifests/*.yaml"), K8S / "secrets.example.yaml"]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def test_kubernetes_manifests_match_the_api_schemas():
    import kubernetes_validate

    kinds = []
    for name, doc in k8s_docs():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)  # the chart's minimum Kubernetes
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        kinds.append(doc["kind"])
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "StatefulSet", "Deployment", "Job"} <= set(kinds)


def test_kubernetes_validation_rejects_a_broken_manifest():
    import kubernetes_validate

    doc = next(d for _, d in k8s_docs() if d["kind"] == "Deployment")
    bad = copy.deepcopy(doc)
    bad["spec"]["template"]["spec"]["containers"][0]["imagee"] = bad["spec"]["template"]["spec"]["containers"][0].pop("image")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)
    bad = copy.deepcopy(doc)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def airflow_values():
    return yaml.safe_load((K8S / "helm" / "airflow-values.yaml").read_text())


def values_schema():
    return json.loads((K8S / "schemas" / "airflow-values.schema.json").read_text())


def test_helm_values_match_the_schema():
    import jsonschema

    jsonschema.Draft7Validator.check_schema(values_schema())
    jsonschema.Draft7Validator(values_schema()).validate(airflow_values())
    proc = check_jsonschema("--schemafile", str(K8S / "schemas" / "airflow-values.schema.json"),
                            str(K8S / "helm" / "airflow-values.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("mutate, where", [
    (lambda v: v.update(executer="KubernetesExecutor"), "executer"),          # misspelt top-level key
    (lambda v: v["workers"]["serviceAccount"].update(nam="x"), "nam"),        # misspelt nested key
    (lambda v: v.update(executor="SequentialExecutor"), "executor"),          # not a chart executor here
    (lambda v: v["env"].append({"name": "S2D_X", "value": 3}), "value"),     # env values are strings
    (lambda v: v["scheduler"].update(replicas="1"), "replicas"),             # wrong type
])
def test_helm_values_validation_rejects_mistakes(mutate, where):
    import jsonschema

    values = airflow_values()
    mutate(values)
    with pytest.raises(jsonschema.ValidationError) as e:
        jsonschema.Draft7Validator(values_schema()).validate(values)
    assert where in str(e.value)


def test_cluster_files_agree_with_each_other_and_the_runner():
    """Names the kubernetes runner uses exist in the manifests; RBAC binds the chart's worker account."""
    values = airflow_values()
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["S2D_RUNNER"] == "kubernetes" and env["S2D_IMAGE"].startswith("ghcr.io/")
    assert values["executor"] == "KubernetesExecutor"
    docs = [d for _, d in k8s_docs()]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    ns = env["S2D_K8S_NAMESPACE"]
    assert ("Namespace", ns) in by
    assert by[("ServiceAccount", env["S2D_K8S_SERVICE_ACCOUNT"])]["metadata"]["namespace"] == ns
    assert by[("Secret", env["S2D_K8S_SECRET"])]["metadata"]["namespace"] == ns
    binding = by[("RoleBinding", "s2d-pod-launcher")]
    assert binding["metadata"]["namespace"] == ns
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": values["workers"]["serviceAccount"]["name"],
                                    "namespace": "airflow"}]
    rules = by[("Role", binding["roleRef"]["name"])]["rules"]
    assert {"pods", "pods/log", "pods/exec"} <= {res for rule in rules for res in rule["resources"]}
    assert not any("secrets" in rule["resources"] or "*" in rule["verbs"] for rule in rules)
    assert ("Secret", values["data"]["metadataSecretName"]) in by and ("Secret", values["fernetKeySecretName"]) in by
    # the runner reads these settings: they are real settings of the DAG's modules (dags/s2d_*.py)
    src = "".join(p.read_text() for p in sorted((REPO / "dags").glob("s2d_*.py")))
    for key in env:
        if key.startswith("S2D_") and key not in {"S2D_RUNNER", "S2D_GPU_POOL", "S2D_STAGE_TIMEOUT_HOURS", "S2D_ARTIFACT_ROOT"}:
            assert f'"{key[4:].lower()}"' in src, f"{key} is not a runner setting"


# ---------------------------------------------------------------- the stage command, as the container runs it


def test_stage_command_runs_as_the_cpu_container_would(tmp_path):
    """The CPU image's ENTRYPOINT + the DAG's arguments, with the image's ENV (and nothing inherited
    from this shell but where `python` is), in an empty working directory: `validate`, then the
    `bootstrap` stage of the tiny preset publishing its manifest."""
    r = runners()
    instrs = dockerfile(DOCKER / "stages-cpu.Dockerfile")
    entrypoint = exec_form(instrs, "ENTRYPOINT")
    image_env = env_of(instrs)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    env = {k: v for k, v in image_env.items() if k != "PATH"}
    # the image's PATH puts its venv first; here the venv is this interpreter's
    env["PATH"] = image_env["PATH"].replace("/opt/venv/bin", str(BIN)).replace("$PATH", "/usr/bin:/bin")
    env["HF_HOME"] = str(home / ".cache" / "huggingface")
    env.update(HOME=str(home), TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db")  # the runners forward these when set
    # the image has the package installed in its venv; here this checkout stands in for it (the same
    # files; `make install` also installs it, editable)
    env["PYTHONPATH"] = str(REPO)
    env.update(r.stage_env("bootstrap"))
    assert Path(shutil.which(entrypoint[0], path=env["PATH"])).parent == BIN  # `python` is this venv's

    def run(args, timeout):
        proc = subprocess.run([*entrypoint, *args], env=env, cwd=work, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return r.last_json(proc.stdout)

    out = run(["validate", "--config", "tiny"], 60)
    assert out == {"valid": True, "name": "tiny", "warnings": []}

    params = {
        "preset": "tiny",
        "teacher": None,
        "student": None,
        "stages": ["teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl"],
        "baseline": True,
        "seed": 0,
        "steps": {},
        "artifact_root": None,
        # the contract is under test here, not training: the fewest steps the stage accepts
        "overrides": [*TEST_OVERRIDES, "bootstrap.teacher_steps=1", "bootstrap.student_steps=1", "eval.problems=4"],
    }
    root = str(work / "runs" / "r1")
    args = r.stage_args("bootstrap", params, root)  # exactly what every runner sends
    out = run(args, 300)
    assert out["stage"] == "bootstrap" and out["skipped"] is False and out["uri"] == f"{root}/bootstrap"
    manifest = json.loads((Path(root) / "bootstrap" / "manifest.json").read_text())
    assert manifest["outputs"] and all((Path(root) / "bootstrap" / f).exists() for f in manifest["files"])
