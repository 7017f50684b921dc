"""Whoever may trigger a run can do no more than a run (issue 23, the trigger boundary): each class of
attack checked through the DAG's real code paths. The policy (dags/s2d_policy.py: ``refusal``) on many
members of each class; real DAG runs (``dag.test``) for a selection of them; the real Ray job submission
path, as KubeRay runs it (``sh -c``, then Ray's job supervisor), with hostile values; the local runner's
environment; the docker runner's credential folders and kept containers; credentials inside URIs.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("airflow", reason="the DAG tests need the 'airflow' extra")
from test_dag import DAGS, REPO, _container_call, load_dag  # noqa: E402

PARAMS = {
    "preset": "tiny",
    "teacher": None,
    "student": None,
    "stages": ["teacher_rl", "kl_warmup", "onpolicy_distill", "student_rl"],
    "baseline": True,
    "seed": 0,
    "teacher_rl_steps": None,
    "kl_warmup_steps": None,
    "onpolicy_distill_steps": None,
    "student_rl_steps": None,
    "direct_grpo_steps": None,
    "artifact_root": None,
    "overrides": [],
}
# sections a deployment might allow wholesale: the code and egress keys inside them stay refused
SECTIONS = "task,models,teacher,sampling,eval,workflow,teacher_rl,bootstrap,teacher_data"


@pytest.fixture
def policy(monkeypatch, tmp_path):
    """The policy module with a local artifact base under tmp_path (and a bucket-based variant via env)."""
    for k in list(os.environ):
        if k.startswith("S2D_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("S2D_ARTIFACT_BASE", str(tmp_path / "runs"))
    monkeypatch.setenv("S2D_WORKDIR", str(tmp_path))
    (tmp_path / "runs").mkdir()
    monkeypatch.syspath_prepend(str(DAGS))
    import s2d_policy

    return s2d_policy


def refused(policy, **conf):
    params = {**PARAMS, **conf}
    return policy.refusal(params, set(PARAMS))


def one_line(problem: str) -> bool:
    return problem is not None and "\n" not in problem and len(problem) < 600


# ---------------------------------------------------------------- 2: traversal and the hub's id grammar

BAD_SOURCES = [
    "Qwen/../../x", "Qwen/..", "Qwen/.", "Qwen/./x", "Qwen/a..b", "Qwen/-x", "Qwen/x-", "Qwen/.hidden", "Qwen//x",
    "Qwen/x/../../../etc", "Qwen/x y", "Qwen/x\n", "Qwen/x;rm", "Qwen/a;touch${IFS}/tmp/x;#", "Qwen/$(id)", "Qwen/`id`",
    "Qwen/x@main", "Qwen/" + "a" * 97, "Qwen", "qwen/x", "someone/x", "/etc/models", "../outside", "./../x",
    "{base}/../x", "{base}/ok/../../x", "{base}", "link/x", "file:///etc/passwd", "hf://Qwen/x", "http://evil/x",
    "s3://other-bucket/runs/x", "s3://team/other/x", "s3://team/runsX/x", "s3://team/runs", "s3://team/runs/../x",
    "s3://team/runs//x", "s3://team/runs/./x", "s3://team/runs/x\n",
    "models:/x/../y", "models:/name/0", "models:/name/1/extra", "models:/na me/1", "models:/name@al/ias", "models:/name",
    "models:/name/01", "models:/../x/1", "models:/name@", "",
]
GOOD_SOURCES = ["Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B-Base", "meta-llama/Llama-3.1-8B-Instruct", "bootstrap",
                "models:/s2d-student/3", "models:/s2d-student@champion", "{base}/run1/kl_warmup/model",
                "s3://team/runs/run1/kl_warmup/model"]


def _place(value: str, tmp_path) -> str:
    return value.replace("{base}", str(tmp_path / "runs"))


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_model_sources_outside_the_grammar_or_the_base_are_refused(policy, monkeypatch, tmp_path, source):
    """Every way a model source is named (the form's teacher/student, an override, a section value) is
    checked the same way: hub id grammar under an allowed owner, models:/ well-formed, paths confined."""
    (tmp_path / "link").symlink_to("/etc")
    monkeypatch.setenv("S2D_ALLOWED_BUCKETS", "team/runs")
    source = _place(source, tmp_path)
    for conf in ({"teacher": source}, {"student": source}):
        if source:  # the form sends an empty field as "the preset's"
            assert one_line(refused(policy, **conf)), (conf, refused(policy, **conf))
    quoted = json.dumps(source)  # as YAML: a double-quoted scalar, so the override holds exactly this value
    assert one_line(refused(policy, overrides=[f"models.student.source={quoted}"])), source
    monkeypatch.setenv("S2D_ALLOWED_OVERRIDES", SECTIONS)
    assert one_line(refused(policy, overrides=[f"models={{teacher: {{source: {quoted}}}}}"])), source


@pytest.mark.parametrize("source", GOOD_SOURCES)
def test_model_sources_that_are_allowed(policy, monkeypatch, tmp_path, source):
    monkeypatch.setenv("S2D_ALLOWED_BUCKETS", "team/runs")
    source = _place(source, tmp_path)
    assert refused(policy, teacher=source) is None
    assert refused(policy, overrides=[f"models.student.source={source}"]) is None


@pytest.mark.parametrize("root, said", [
    ("s3://team/other/x", "outside the allowed S3 prefix s3://team/runs/"),  # the bucket is right, the prefix is not
    ("s3://team/runsX/y", "outside the allowed S3 prefix"),
    ("s3://team/runs", "outside the allowed S3 prefix"),
    ("s3://elsewhere/runs/x", "bucket 'elsewhere' is not an allowed bucket"),
    ("s3://team/runs/../x", "without '.', '..' or '//'"),
    ("s3://team/runs/a//b", "without '.', '..' or '//'"),
    ("/tmp/x", "is a local path, but the artifact base is s3://team/runs"),
])
def test_s3_roots_are_confined_to_the_base_bucket_and_prefix(policy, monkeypatch, root, said):
    monkeypatch.setenv("S2D_ARTIFACT_BASE", "s3://team/runs")
    problem = refused(policy, artifact_root=root)
    assert one_line(problem) and said in problem, problem
    assert refused(policy, artifact_root="s3://team/runs/mine") is None
    monkeypatch.setenv("S2D_ALLOWED_BUCKETS", "team/runs,shared")  # a bare bucket allows all of it
    assert refused(policy, artifact_root="s3://shared/any/where") is None


# ---------------------------------------------------------------- 3: section values, escapes, code and egress keys

CODE_OVERRIDES = [
    "task={kind: 'os:getcwd'}", 'task={"kin\\x64": "os:getcwd"}', 'task={"\\u006bind": os:getcwd}', "task={<<: {kind: 'os:x'}}",
    "task={? kind : 'os:x'}", "task: {kind: x}", "task.kind=os:system",
    'models.teacher={"trust_remote_cod\\x65": true}', "models={teacher: {trust_remote_code: yes}}",
    "models.student={source: bootstrap, trust_remote_code: true}", "models.teacher.trust_remote_code=true",
    "task.files={eval: /etc/passwd}", "task.files.eval=/etc/passwd", "task.data={eval: {path: /etc/passwd}}",
    "task.data.eval.path=/etc/*", "task.data.eval={path: 's3://other/x'}", "task={data: {eval: {path: x}}}",
    "task.options={plugin: x}", "task={options: {x: 1}}",
    "teacher.url=http://evil.example", "teacher={url: 'http://evil.example', engine: server}",
    "tracking.enabled=false", "tracking.experiment=someone-elses", "tracking={experiment: x}", "tracking={}",
    "tracking.registered_models={student: prod-model}", "tracking.required=false",
    "task={defaults: &d {kind: 'os:x'}, <<: *d}",
]


@pytest.mark.parametrize("item", CODE_OVERRIDES)
def test_code_and_egress_keys_are_refused_inside_any_value(policy, monkeypatch, item):
    """The value is parsed as the stage parses it and every key path it sets is checked: allowing a whole
    section (a deployment's choice) still does not allow the code and egress keys inside it."""
    monkeypatch.setenv("S2D_ALLOWED_OVERRIDES", SECTIONS)
    problem = refused(policy, overrides=[item])
    assert one_line(problem) and ("loads code or reaches beyond the run" in problem or "is not a key name" in problem
                                  or "not key.path=value" in problem), (item, problem)


def test_code_keys_allowed_only_where_the_deployment_names_them(policy, monkeypatch):
    monkeypatch.setenv("S2D_ALLOWED_OVERRIDES", "task,task.kind,task.data,teacher.url,tracking.experiment")
    assert refused(policy, overrides=["task.kind=my_pkg.tasks:make"]) is None
    assert refused(policy, overrides=["task={kind: 'my_pkg.tasks:make', seed: 3}"]) is None
    assert refused(policy, overrides=["task.data.eval={path: data/eval.jsonl}"]) is None
    assert refused(policy, overrides=["teacher.url=http://teacher:8000"]) is None
    assert refused(policy, overrides=["tracking.experiment=mine"]) is None
    assert "loads code" in refused(policy, overrides=["task.files={eval: x}"])
    assert "loads code" in refused(policy, overrides=["tracking={experiment: mine}"])  # resets the rest of tracking
    assert "loads code" in refused(policy, overrides=["tracking.enabled=false"])


@pytest.mark.parametrize("item, said", [
    ("models.teacher={source: Qwen/x}", "'models.teacher' is not an allowed key"),  # a section replacement
    ("task={seed: 3}", "'task' is not an allowed key"),
    ("device=cuda:7", "'device' is not an allowed key"),
    ("task={1: x}", "is not a key name"),
    ('task.sizes={"a.b": 1}', "is not a key name"),
    ("task.sizes=[{trust_remote_code: 1}]", "loads code"),  # a mapping inside a list
    ("sampling=[1, {trust_remote_code: true}]", "loads code"),
    (" =1", "is not key.path=value"),
    ("a..b=1", "is not key.path=value"),
    ("tаsk.kind=x", "is not key.path=value"),  # a Cyrillic 'а'
])
def test_override_keys(policy, item, said):
    problem = refused(policy, overrides=[item])
    assert one_line(problem) and said in problem, problem


# ---------------------------------------------------------------- 4: caps, bounded parsing, bounded messages

CAPPED = [
    ("teacher_rl.steps=10001", "max_steps"),
    ("teacher_rl={steps: 99999}", "max_steps"),
    ("bootstrap.teacher_steps=1000000", "max_steps"),
    ("teacher_rl.prompts_per_step=100000", "max_prompts_per_step"),
    ("eval.c2_prompts=5000", "max_prompts_per_step"),
    ("student_rl.group_size=10000", "max_group_size"),
    ("sampling.batch_size=1000000", "max_batch_size"),
    ("bootstrap.batch_size=100000", "max_batch_size"),
    ("teacher_rl.minibatches=100000", "max_batch_size"),
    ("teacher_rl.epochs=1000", "max_epochs"),
    ("eval.samples=100000", "max_eval_samples"),
    ("sampling.max_new_tokens=1000000", "max_new_tokens"),
    ("eval.max_new_tokens=100000", "max_new_tokens"),
    ("sampling={vllm: {max_model_len: 10000000}}", "max_new_tokens"),
    ("task.sizes={bootstrap: 100000000}", "max_split_size"),
    ("eval.problems=10000000", "max_split_size"),
    ("teacher_data.top_k=100000", "max_top_k"),
    ("logprob_chunk=10000000", "max_logprob_chunk"),
    ("torch_threads=100000", "max_torch_threads"),
    ("models.student.arch={hidden_size: 8192, layers: 64, heads: 64, kv_heads: 8, intermediate_size: 32768}", "max_model_params"),
    (
        "models.teacher.arch={hidden_size: 4096, layers: 200, heads: 32, kv_heads: 8, intermediate_size: 11008}",
        "max_model_params",
    ),
]


@pytest.mark.parametrize("item, cap", CAPPED)
def test_sizes_above_the_deployment_caps_are_refused(policy, item, cap):
    problem = refused(policy, overrides=[item])
    assert one_line(problem) and f"s2d_{cap}" in problem, problem


@pytest.mark.parametrize(
    "item",
    [
        'teacher_rl.steps="99999999"',
        "teacher_rl.steps='1000000'",
        "sampling={max_new_tokens: '10000000'}",
        "eval.samples=[1000000]",
        "task.sizes={eval: '100000000'}",
    ],
)
def test_capped_keys_take_numbers_only(policy, item):
    """The schema would read "99999999" as a number: a capped key's value must be a number to be compared."""
    problem = refused(policy, overrides=[item])
    assert one_line(problem) and "must be a number" in problem, problem
    assert refused(policy, overrides=["direct_grpo.steps=null", "eval.max_new_tokens=~"]) is None


@pytest.mark.parametrize("source", ["runs/a/model #/../../../etc", "runs/a/b: {trust_remote_code: true}", "runs/a/model\t#x",
                                    "{base}/a/model #c"])
def test_form_model_values_are_what_the_stage_reads(policy, tmp_path, source):
    """The form's teacher/student become `models.<role>.source=<value>`, read as YAML by the stage: a value YAML
    would change (a comment, a mapping, a list) is refused, so the checked value is the loaded one."""
    source = _place(source, tmp_path)
    problem = refused(policy, teacher=source)
    assert one_line(problem), problem
    assert refused(policy, teacher=_place("{base}/a/model", tmp_path)) is None


@pytest.mark.parametrize("conf, said", [
    ({"preset": "/etc/evil.yaml"}, "is not a preset name"), ({"preset": "../x"}, "is not a preset name"),
    ({"preset": "mine.yaml"}, "is not a preset name"), ({"stages": ["teacher_rl]\ntask.kind: x"]}, "choose from"),
    ({"seed": "1; id"}, "not a whole number"), ({"teacher_rl_steps": True}, "not a whole number"),
])
def test_form_fields_written_into_the_command_are_checked_again(policy, conf, said):
    """Values the form's schema checks when a run is created are checked again where they enter the stage's
    arguments (a conf that skipped the schema, e.g. an old serialized run)."""
    problem = refused(policy, **conf)
    assert one_line(problem) and said in problem, problem


def test_caps_are_deployment_settings(policy, monkeypatch):
    assert "s2d_max_steps" in refused(policy, teacher_rl_steps=10_001)
    assert refused(policy, teacher_rl_steps=10_000) is None
    monkeypatch.setenv("S2D_MAX_STEPS", "20000")
    assert refused(policy, teacher_rl_steps=15_000, overrides=["kl_warmup.steps=15000"]) is None
    assert refused(policy, overrides=["models.student.arch={hidden_size: 64, layers: 2, heads: 4, kv_heads: 2, "
                                      "intermediate_size: 128}"]) is None
    assert "whole arch" in refused(policy, overrides=["models.student.arch.layers=1000"])


@pytest.mark.parametrize("template", [
    "Q {problem:>99999999}", "{problem.__class__.__init__}", "{problem[0]}", "{problem!r}", "{problem:{problem}}",
    "{0}", "{}", "{answer}", "{problem", "x" * 1900 + "{problem}",
])
def test_prompt_templates_are_plain(policy, monkeypatch, template):
    monkeypatch.setenv("S2D_MAX_PROMPT_TEMPLATE_CHARS", "1000")
    problem = refused(policy, overrides=[f"task.prompt_template={json.dumps(template)}"])
    assert one_line(problem) and "prompt_template" in problem, problem


def test_a_plain_template_with_shell_text_is_just_text(policy):
    assert refused(policy, overrides=['task.prompt_template="$(id) `id` ;#{problem}\\nAnswer:"']) is None


ALIAS_BOMB = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + [
    f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(8)]) + "]"


@pytest.mark.parametrize("value, said", [
    (ALIAS_BOMB, "once its aliases are expanded"),
    ("[" * 40 + "]" * 40, "nested deeper"),
    ("&a [*a]", "unknown anchor"),
    ("{a: 1", "not valid YAML"),
    ("!!python/object/apply:os.system [id]", "not valid YAML"),
    ("a\n---\nb", "not valid YAML"),
])
def test_values_are_parsed_with_bounds(policy, value, said):
    t0 = time.perf_counter()
    problem = refused(policy, overrides=[f"eval.sets={value}"])
    assert time.perf_counter() - t0 < 2
    assert one_line(problem) and said in problem, problem


def test_messages_never_echo_unbounded_input(policy, monkeypatch, tmp_path):
    long = "x" * 1900
    monkeypatch.setenv("S2D_ALLOWED_OVERRIDES", SECTIONS)
    for conf in ({"teacher": "someone/" + long}, {"artifact_root": "/" + long}, {"overrides": [f"device={long}"]},
                 {"overrides": [f"{long}=1"]}, {"overrides": [f"models.teacher.source=Qwen/{long}"]},
                 {"overrides": [f"task.kind={long}"]}, {"overrides": [long]}, {long: 1},
                 {"overrides": [f"eval.sets={ALIAS_BOMB}"]}, {"overrides": ["teacher_rl.steps=" + "9" * 1000]}):
        problem = policy.refusal({**PARAMS, **conf}, set(PARAMS))
        assert problem and "\n" not in problem and len(problem) < 600, (conf, problem and len(problem))
        assert "x" * (policy.SHOWN + 1) not in problem


def test_the_form_shows_the_caps(monkeypatch):
    dag = load_dag(monkeypatch, S2D_MAX_STEPS="777")
    assert "0 to 777" in dag.params.get_param("teacher_rl_steps").description
    assert "tokens generated per sequence ≤ 8,192 (`s2d_max_new_tokens`)" in json.dumps(
        dag.params.get_param("overrides").schema, ensure_ascii=False)


def test_sizes_that_do_not_fit_the_problem_space(tmp_path):
    """stages/limits.py: 2-digit additions number 4,095; the tiny preset's splits ask for 26,400."""
    from stages import limits

    assert limits.numbers(2, 2) == 90 and limits.arithmetic_problems(2, 2, ["add"]) == 90 * 91 // 2
    assert limits.arithmetic_problems(1, 1, ["add", "mul"]) == 55 + 80
    tiny = {"bootstrap": 20000, "teacher_rl": 1000, "prompts": 4000, "student_rl": 1000, "validation": 200, "eval": 200}
    problem = limits.arithmetic_sizes_problem(2, 2, ["add"], tiny)
    assert problem and "26,400" in problem and "4,095" in problem
    assert limits.arithmetic_sizes_problem(2, 3, ["add"], tiny) is None  # the tiny preset itself
    assert limits.arithmetic_sizes_problem(12, 12, ["add", "mul"], {"bootstrap": 10**6}) is None


# ---------------------------------------------------------------- the boundary in real DAG runs

DAG_RUN_REFUSALS = [  # (conf, what the one-line refusal must say)
    ({"teacher": "Qwen/../../elsewhere"}, "is a local path, but the artifact base is s3://team/runs"),
    ({"teacher": "Qwen/a;touch${IFS}/tmp/x;#"}, "is a local path, but the artifact base is s3://team/runs"),
    ({"student": "s3://team/runs/../other/model"}, "without '.', '..' or '//'"),
    ({"student": "Qwen/x@main"}, "is not a hub id"),
    ({"overrides": ["models.teacher.source=models:/x/../y"]}, "is not models:/<name>/<version>"),
    ({"overrides": ["task={kind: 'os:getcwd'}"]}, "loads code or reaches beyond the run"),
    ({"overrides": ['models.teacher={"trust_remote_cod\\x65": true}']}, "loads code or reaches beyond the run"),
    ({"overrides": ["task.data.eval.path=/etc/*"]}, "loads code or reaches beyond the run"),
    ({"overrides": ["teacher.url=http://evil.example"]}, "loads code or reaches beyond the run"),
    ({"overrides": ["tracking.experiment=someone-elses"]}, "loads code or reaches beyond the run"),
    ({"overrides": ["teacher_rl.steps=10000000"]}, "s2d_max_steps"),
    ({"teacher_rl_steps": 10000000}, "s2d_max_steps"),
    ({"overrides": ["task.prompt_template=Q {problem:>99999999}"]}, "only field is a plain {problem}"),
    ({"overrides": [f"eval.sets={ALIAS_BOMB}"]}, "once its aliases are expanded"),
    ({"artifact_root": "s3://team/other/x"}, "outside the allowed S3 prefix"),
]


def _dag_test_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S2D_", "AIRFLOW"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(DAGS), S2D_WORKDIR=str(tmp_path), S2D_RETRY_DELAY_S="1", **extra)
    migrate = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                             capture_output=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    return env


def _dag_tests(env, confs) -> tuple[list[dict], list[str]]:
    """``dag.test`` of each conf in one process (the real task runner and SQLite); each run's states and log."""
    code = f"""
import json, sys
sys.path.insert(0, {str(DAGS)!r})
from airflow.dag_processing.dagbag import DagBag
for conf in json.loads(sys.argv[1]):
    dag = DagBag(dag_folder={str(DAGS)!r}).dags["sparse_to_dense"]  # fresh: dag.test keeps a run's conf
    dr = dag.test(run_conf=conf)
    states = {{ti.task_id: str(ti.state) for ti in dr.get_task_instances()}}
    print("RESULT " + json.dumps({{"state": str(dr.state), "tasks": states}}), flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(confs)], env=env, capture_output=True, text=True, timeout=900)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert len(results) == len(confs), (proc.stdout + proc.stderr)[-5000:]
    return results, proc.stdout.split("RESULT ")


def test_refusals_of_every_class_through_real_dag_runs(tmp_path):
    """Each class triggered as a DAG run: plan fails with the one-line refusal, without retries; nothing
    else runs; no stage command starts."""
    env = _dag_test_env(tmp_path, S2D_ARTIFACT_BASE="s3://team/runs", S2D_STAGE_PYTHON="/nonexistent/python")
    results, logs = _dag_tests(env, [c for c, _ in DAG_RUN_REFUSALS])
    for (conf, said), res, log in zip(DAG_RUN_REFUSALS, results, logs):
        assert res["state"].endswith("failed") and res["tasks"]["plan"].endswith("failed"), (conf, res)
        assert all(s.endswith("upstream_failed") for t, s in res["tasks"].items() if t not in ("plan", "close-runs")), res
        refusals = [x for x in log.splitlines() if "AirflowFailException: error: " in x]
        assert len(refusals) == 1 and said in refusals[0] and len(refusals[0]) < 800, (conf, refusals or log[-3000:])
    assert "/nonexistent/python" not in "".join(logs)


FAKE_STAGE = '''#!{python}
"""Stands in for the stage environment's python: records what the runner handed it, prints a summary."""
import json, os, sys
args = json.loads(os.environ["S2D_ARGS_JSON"])
with open(os.path.join(os.environ["S2D_TEST_DUMP"], args[0] + ".json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "args": args, "env": dict(os.environ)}}, f)
if args[0] == "plan":
    print(json.dumps({{"root": args[args.index("--root") + 1], "parent_run_id": None, "stages": []}}))
else:
    print(json.dumps({{"stage": args[0], "skipped": False, "final_student": "x", "teacher": "y"}}))
'''


def test_local_runner_passes_arguments_as_data_and_an_allow_listed_environment(tmp_path):
    """A real DAG run with the local runner (every task a real subprocess): the command line is constant,
    the arguments arrive exactly (shell text included) as data, and the stage processes get no Airflow
    secrets (AIRFLOW__*, connections, variables) nor anything else outside the allow-list."""
    from cryptography.fernet import Fernet

    dump = tmp_path / "dump"
    dump.mkdir()
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_STAGE.format(python=sys.executable))
    fake.chmod(0o755)
    marker = tmp_path / "marker"
    template = f"$(touch {marker}) `touch {marker}` ;touch {marker}; # {{problem}}\nAnswer:"
    env = _dag_test_env(tmp_path, S2D_ARTIFACT_BASE=str(tmp_path / "runs"), S2D_STAGE_PYTHON=str(fake),
                        S2D_TEST_DUMP=str(dump), S2D_STAGE_ENV_PASSTHROUGH="EXTRA_OK,CORP_*",
                        AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode(), AIRFLOW_VAR_SOMETHING="var-secret",
                        AIRFLOW_CONN_S2D_S3=json.dumps({"conn_type": "aws", "login": "AKIA-TEST", "password": "conn-secret"}),
                        UNLISTED_SECRET="zzz", EXTRA_OK="1", CORP_PROXY="p")
    env.pop("AWS_ACCESS_KEY_ID", None), env.pop("AWS_SECRET_ACCESS_KEY", None)
    conf = {"overrides": [f"task.prompt_template={json.dumps(template)}"], "teacher_rl_steps": 3}
    (res,), _ = _dag_tests(env, [conf])
    assert res["state"].endswith("success"), res
    records = {p.stem: json.loads(p.read_text()) for p in dump.glob("*.json")}
    assert set(records) == {"plan", "bootstrap", "import", "prune", "teacher_rl", "teacher_data", "kl_warmup",
                            "onpolicy_distill", "student_rl", "direct_grpo", "report", "promote", "close-runs"}
    for name, rec in records.items():
        assert rec["argv"] == ["-m", "stages", "--args-env"], name
        sets = [rec["args"][i + 1] for i, a in enumerate(rec["args"]) if a == "--set"]
        assert f"task.prompt_template={json.dumps(template)}" in sets and "teacher_rl.steps=3" in sets, name
        leaked = [k for k in rec["env"] if k.startswith(("AIRFLOW__", "AIRFLOW_CONN", "AIRFLOW_VAR")) or k == "UNLISTED_SECRET"]
        assert not leaked, (name, leaked)
        assert not any("var-secret" in v for v in rec["env"].values())
        assert rec["env"]["EXTRA_OK"] == "1" and rec["env"]["CORP_PROXY"] == "p" and rec["env"]["S2D_GPUS"]
        assert rec["env"]["AWS_ACCESS_KEY_ID"] == "AKIA-TEST" and rec["env"]["AWS_SECRET_ACCESS_KEY"] == "conn-secret"
        assert rec["env"]["AIRFLOW_CTX_TASK_ID"] == name and rec["env"]["AIRFLOW_CTX_DAG_ID"] == "sparse_to_dense"
    assert not marker.exists()


HOSTILE = ["Qwen/a;touch${{IFS}}{m}1;#", "$(touch {m}2)", "`touch {m}3`", "x\ntouch {m}4\n", "'; touch {m}5; '",
           '"; touch {m}6; "', "$(touch${{IFS}}{m}7)&&touch {m}8|touch {m}9"]


def _template(values: list[str]) -> str:
    """The values as the literal text of a prompt template (braces doubled), then the one field."""
    return " ".join(values).replace("{", "{{").replace("}", "}}") + " {problem}"


def test_stage_command_reads_hostile_arguments_exactly(tmp_path):
    """The real stage CLI through the local runner's command line: arguments as data, read back exactly."""
    m = tmp_path / "m"
    values = [h.format(m=m) for h in HOSTILE]
    root = str(tmp_path / "runs" / "".join(values).replace("/", "_"))
    args = ["plan", "--config", "tiny", "--root", root, "--set", "tracking.enabled=false",
            "--set", f"models.teacher.source={json.dumps(values[0])}",
            "--set", f"task.prompt_template={json.dumps(_template(values))}",
            "--xcom-file", str(tmp_path / values[1])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "S2D_ARGS_JSON": json.dumps(args)}
    proc = subprocess.run([sys.executable, "-m", "stages", "--args-env"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["root"] == root
    assert json.loads((tmp_path / values[1]).read_text())["root"] == root  # the exact path, written by the stage
    assert not list(tmp_path.glob("m[0-9]"))


# ---------------------------------------------------------------- 1: the real Ray job submission path

def _kuberay_submitter(address: str, job_id: str, entrypoint: str) -> str:
    """The shell line KubeRay's K8sJobMode submitter runs with `sh -c` (ray-operator common/job.go
    BuildJobSubmitCommand, without its dashboard wait loop): the entrypoint and the rest joined by spaces."""
    return " ".join(["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then",
                     "ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id, "--", entrypoint,
                     ";", "fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id])


RAY_CLI = """import json, sys
from ray.dashboard.modules.job import cli
if sys.argv[1:3] == ["job", "status"]:
    sys.exit(1)  # not submitted yet: the submitter goes on to submit
if sys.argv[1:3] == ["job", "logs"]:
    sys.exit(0)


class Client:  # where Ray's CLI would POST the job to the dashboard: record what it sends
    def __init__(self, *a, **k):
        pass

    def submit_job(self, *, entrypoint, submission_id, **kw):
        with open({out!r}, "a") as f:
            f.write(json.dumps({{"id": submission_id, "entrypoint": entrypoint}}) + "\\n")
        return submission_id


cli._get_sdk_client = lambda *a, **k: Client()
from ray.scripts.scripts import main
sys.exit(main())
"""

JOB_MANAGER = """import asyncio, json, sys, time
import ray
from ray.dashboard.modules.job.job_manager import JobManager
from ray.job_submission import JobStatus

jobs, logs_dir = json.loads(sys.argv[1]), sys.argv[2]
ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, object_store_memory=100 << 20, configure_logging=False)


async def main():
    manager = JobManager(ray._private.worker.global_worker.gcs_client, logs_dir)  # the dashboard's job module
    out = {}
    for job in jobs:
        await manager.submit_job(entrypoint=job["entrypoint"], submission_id=job["id"])
        deadline = time.time() + 300
        while (status := await manager.get_job_status(job["id"])) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                          JobStatus.STOPPED):
            assert time.time() < deadline, "job did not finish"
            await asyncio.sleep(0.5)
        out[job["id"]] = {"status": str(status), "logs": manager.get_job_logs(job["id"])}
    print("RESULT " + json.dumps(out), flush=True)


asyncio.run(main())
ray.shutdown()
"""


def test_rayjob_entrypoint_never_reaches_a_shell_with_a_value(tmp_path, monkeypatch):
    """The RayJob as the DAG renders it, run the way KubeRay and Ray run it: KubeRay's submitter line through
    `sh -c` (with Ray's own `ray job submit` CLI, its HTTP call to the dashboard recorded), then Ray's job
    manager and supervisor (the dashboard's job module, on a local Ray started with the head container's
    environment, where S2D_ARGS_JSON travels), which run the entrypoint with `shell=True`. Hostile values in
    the arguments: no command of theirs runs, and the stage reads them exactly. A control job shows the
    path does run shell text that is in an entrypoint."""
    monkeypatch.syspath_prepend(str(DAGS))
    import s2d_rayjob as rj

    m = tmp_path / "m"
    values = [h.format(m=m) for h in HOSTILE]
    root = str(tmp_path / "runs" / "".join(values).replace("/", "_"))
    xcom = str(tmp_path / ("x" + values[1]))
    args = ["plan", "--config", "tiny", "--root", root, "--set", "tracking.enabled=false",
            "--set", f"models.teacher.source={json.dumps(values[0])}",
            "--set", f"task.prompt_template={json.dumps(_template(values))}", "--xcom-file", xcom]
    for k in list(os.environ):
        if k.startswith("S2D_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("S2D_GPUS_PER_TASK", "0")
    spec = rj.rayjob_spec("teacher_rl", args, "s2d-test")
    outside = json.dumps({k: v for k, v in spec["spec"].items() if k != "rayClusterSpec"})
    assert not any(v in outside for v in values) and "S2D_ARGS_JSON" not in outside
    head = spec["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_env = {e["name"]: e["value"] for e in head["env"]}

    # 1. KubeRay's submitter: `sh -c` of its line, `ray` being Ray's CLI (the dashboard call recorded)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sent = tmp_path / "submitted.jsonl"
    (bin_dir / "ray").write_text(f"#!{sys.executable}\n" + RAY_CLI.format(out=str(sent)))
    (bin_dir / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for job_id, entrypoint in (("s2d-plan", spec["spec"]["entrypoint"]), ("control", f"true; touch {m}0")):
        line = _kuberay_submitter("http://127.0.0.1:8265", job_id, entrypoint)
        proc = subprocess.run(["/bin/sh", "-c", line], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = [json.loads(x) for x in sent.read_text().splitlines()]
    assert jobs[0] == {"id": "s2d-plan", "entrypoint": "python -m stages --args-env"}

    # 2. Ray's job manager and supervisor on a local Ray whose processes have the head container's environment
    proc = subprocess.run([sys.executable, "-c", JOB_MANAGER, json.dumps(jobs), str(tmp_path / "job-logs")],
                          env={**env, **head_env}, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "RESULT " in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    plan = out["s2d-plan"]
    assert plan["status"].endswith("SUCCEEDED"), plan["logs"][-3000:]
    summary = json.loads([x for x in plan["logs"].splitlines() if x.startswith("{")][-1])
    assert summary["root"] == root  # the exact value, shell text and newlines included
    assert json.loads(Path(xcom).read_text())["root"] == root
    assert not [p.name for p in tmp_path.glob("m[1-9]")]
    assert out["control"]["status"].endswith("SUCCEEDED") and (tmp_path / "m0").exists()  # the path runs a shell


# ---------------------------------------------------------------- 9 and 11: credentials of the container runners


def test_docker_runner_sweeps_credential_folders_of_killed_tasks(monkeypatch, tmp_path):
    pytest.importorskip("airflow.providers.docker")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    dag = load_dag(monkeypatch, "docker", S2D_DOCKER_SECRETS_DIR=str(secrets_dir), AWS_SECRET_ACCESS_KEY="SK",
                   S2D_STAGE_TIMEOUT_HOURS="1")
    old, fresh, other = secrets_dir / "s2d-secrets-killed", secrets_dir / "s2d-secrets-running", secrets_dir / "unrelated"
    for d in (old, fresh, other):
        d.mkdir()
        (d / "0").write_text("[default]\naws_secret_access_key = SK\n")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    seen = _container_call(monkeypatch, dag.task_dict["teacher_rl"], PARAMS, json.dumps({"root": "s3://b/r"}))
    assert not old.exists() and fresh.exists() and other.exists()  # only a killed task's folder, only ours
    mounted = [m["Source"] for m in seen["mounts"]]
    assert mounted and all(not Path(src).exists() for src in mounted)  # this task's own folder: removed after it


@pytest.mark.parametrize("keep", ["never", "success"])
def test_a_container_holding_a_token_is_not_kept(monkeypatch, keep):
    pytest.importorskip("airflow.providers.docker")
    dag = load_dag(monkeypatch, "docker", S2D_DOCKER_AUTO_REMOVE=keep, MLFLOW_TRACKING_TOKEN="tok-123")
    op = dag.task_dict["teacher_rl"]
    seen = _container_call(monkeypatch, op, PARAMS, json.dumps({"root": "s3://b/r"}))
    assert seen["private"] == {"MLFLOW_TRACKING_TOKEN": "tok-123"} and seen["auto_remove"] == "force"
    assert op.auto_remove == keep  # the DAG's operator is unchanged
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    assert _container_call(monkeypatch, op, PARAMS, json.dumps({"root": "s3://b/r"}))["auto_remove"] == keep


@pytest.mark.parametrize("runner", ["docker", "kubernetes", "rayjob"])
def test_credentials_inside_uris_never_reach_a_spec(monkeypatch, runner):
    """A password in MLFLOW_TRACKING_URI (or any URL setting) is not copied into a container's environment,
    a pod or a RayJob: the URI goes without it; docker gets user and password in the mounted MLflow
    credentials file, pods from the Secret."""
    pytest.importorskip("airflow.providers.docker")
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    dag = load_dag(monkeypatch, runner, MLFLOW_TRACKING_URI="https://alice:pa%40ss-w0rd@mlflow.example:5000/x",
                   MLFLOW_S3_ENDPOINT_URL="http://key:s3-s3cret@minio:9000", S2D_TEACHER_URL="http://u:t-s3cret@teacher:8000")
    import s2d_rayjob
    import s2d_runners as r

    if runner == "rayjob":
        spec = s2d_rayjob.rayjob_spec("kl_warmup", ["kl_warmup"], "j")
        text = json.dumps(spec)
        env = {
            e["name"]: e["value"]
            for e in spec["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        }
    elif runner == "kubernetes":
        pod = _container_call(monkeypatch, dag.task_dict["kl_warmup"], PARAMS, json.dumps({"root": "s3://b/r"}))["pod"]
        text = json.dumps(pod.to_dict(), default=str)
        env = {e.name: e.value for e in pod.spec.containers[0].env}
    else:
        seen = _container_call(monkeypatch, dag.task_dict["kl_warmup"], PARAMS, json.dumps({"root": "s3://b/r"}))
        text = json.dumps({k: seen[k] for k in ("command", "env", "labels")}, default=str)
        env = seen["env"]
        files, _ = r.secret_files(r.worker_secrets())
        creds = files["/home/s2d/.mlflow/credentials"]
        assert "mlflow_tracking_username = alice" in creds and "mlflow_tracking_password = pa@ss-w0rd" in creds
    assert not any(x in text for x in ("pa%40ss", "pa@ss", "s3-s3cret", "t-s3cret")), text[:2000]
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000/x" and env["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000" and env["S2D_TEACHER_URL"] == "http://teacher:8000"


def test_split_credentials():
    sys.path.insert(0, str(DAGS))
    import s2d_runners as r

    assert r.split_credentials("http://u:p@h:1/x?y=1") == ("http://h:1/x?y=1", "u", "p")
    assert r.split_credentials("http://[::1]:5000") == ("http://[::1]:5000", None, None)
    assert r.split_credentials("http://u:p%2Fq@[::1]:5000/") == ("http://[::1]:5000/", "u", "p/q")
    assert r.split_credentials("sqlite:///x.db") == ("sqlite:///x.db", None, None)
    assert r.split_credentials("databricks") == ("databricks", None, None)
