"""The trigger policy: what a person allowed to trigger a run may choose. This module is the security
boundary between the trigger form (or a schedule file, or the REST API's conf) and everything a stage can
reach; every task checks the run's values here first (:func:`refusal`) and a refusal fails the task
without retries, in one line.

Threat model. Whoever may trigger the DAG chooses the form's values: a preset, the stages, seeds, step
budgets, the teacher and student models, the artifact root and ``key=value`` config overrides. A run may
train and evaluate with those choices inside the deployment's limits, and nothing else:

- no value ever reaches a shell (the runners pass the stage's arguments as data: ``s2d_contract``);
- no code is loaded on a trigger's word: ``trust_remote_code``, task plugins (``task.kind``), task data
  files and globs (``task.files``, ``task.data``), plugin options, the teacher server URL and the tracking
  settings are code or egress keys, allowed only where the deployment's allow-list names them;
- models come from the built-in tiny models, hub ids of the hub's id grammar under an allowed owner,
  well-formed ``models:/`` registry names, or checkpoints under the artifact base (local: the real path,
  symlinks followed; S3: the allowed bucket AND prefix);
- artifacts are written only under the artifact base;
- every size that costs time or memory is capped (deployment settings ``max_*``, see :data:`CAPS`), and a
  value is parsed with a bounded YAML parse (size, depth and alias expansion limits) before anything
  walks it;
- error messages quote at most :data:`SHOWN` characters of any value.

Deployment settings: ``allowed_overrides`` (comma-separated key prefixes), ``allowed_model_prefixes``,
``allowed_buckets`` (``bucket`` or ``bucket/prefix``), the caps, ``artifact_base``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import string

import s2d_settings as s
import s2d_table as table

SHOWN = 80  # characters of a value an error message may quote

# Override keys a trigger may set unless the deployment says otherwise (setting ``allowed_overrides``:
# comma-separated key prefixes; the word ``default`` stands for this list, e.g.
# ``default,tracking.experiment``): training and sampling settings, every stage's own section.
DEFAULT_ALLOWED_OVERRIDES = (
    "seed", "dtype", "torch_threads", "logprob_chunk", "train", "checkpoint_every",
    "task.seed", "task.min_digits", "task.max_digits", "task.ops", "task.sizes", "task.prompt_template",
    "models.teacher.source", "models.student.source", "models.teacher.arch", "models.student.arch",
    "models.teacher.lora", "models.student.lora",  # LoRA adapters (docs/lora.md); adapter_base is a path: not by default
    "sampling", *table.TASKS, "eval", "workflow")
# Keys that load code, read files of the worker, send requests to a place of the trigger's choosing, or
# redirect lineage: a trigger may set one only where an allow-list entry names it (or a key under it);
# allowing a section (``task``) does not allow these keys inside it.
CODE_KEYS = ("task.kind", "task.files", "task.data", "task.options", "teacher.url", "tracking")
CODE_SEGMENTS = ("trust_remote_code",)  # at any depth (models.teacher.trust_remote_code, ...)
# model sources a trigger may name (setting ``allowed_model_prefixes``), besides checkpoints under the
# artifact base: the built-in tiny models, registered models, the presets' hub owners
DEFAULT_MODEL_PREFIXES = ("bootstrap", "models:/", "Qwen/", "meta-llama/")

# Caps: setting -> (default, the key paths it bounds (fnmatch patterns), what it bounds). Deployment
# settings ``s2d_<name>``; the form shows them. A trigger's value above a cap is refused.
CAPS: dict[str, tuple[int, tuple[str, ...], str]] = {
    "max_steps": (10_000, ("*.steps", "bootstrap.teacher_steps", "bootstrap.student_steps"), "optimizer steps of a stage"),
    "max_prompts_per_step": (1024, ("*.prompts_per_step", "eval.c2_prompts"), "prompts per step"),
    "max_group_size": (64, ("*.group_size",), "rollouts per prompt (GRPO group size)"),
    "max_batch_size": (4096, ("sampling.batch_size", "bootstrap.batch_size", "bootstrap.student_batch_size",
                              "*.minibatches", "teacher.sequences_per_request"), "sequences per batch"),
    "max_epochs": (16, ("*.epochs",), "optimizer passes over one batch"),
    "max_eval_samples": (64, ("eval.samples",), "samples per evaluation problem (k of avg@k)"),
    "max_new_tokens": (8192, ("sampling.max_new_tokens", "eval.max_new_tokens", "sampling.vllm.max_model_len"),
                       "tokens generated per sequence"),
    "max_split_size": (200_000, ("task.sizes.*", "eval.problems", "teacher_data.prompts", "teacher_data.rows_per_shard"),
                       "problems per task split"),
    "max_top_k": (256, ("teacher_data.top_k",), "teacher log-probs kept per position"),
    "max_logprob_chunk": (8192, ("logprob_chunk",), "positions per log-prob chunk"),
    "max_torch_threads": (256, ("torch_threads",), "CPU threads of a stage"),
    "max_lora_rank": (512, ("models.*.lora.r",), "rank of a LoRA adapter"),
    "max_model_params": (200_000_000, ("models.*.arch",), "parameters of a model built from an arch (estimated)"),
    "max_prompt_template_chars": (2000, ("task.prompt_template",), "characters of the prompt template"),
}
MAX_OVERRIDES = 64  # override lines per trigger (the form's maxItems)
MAX_OVERRIDE_CHARS = 2000  # characters per override line (the form's maxLength)
MAX_VALUE_NODES = 2000  # YAML nodes of one override value, aliases expanded (counted, never built)
MAX_VALUE_DEPTH = 16  # nesting of one override value

KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", re.ASCII)  # stages/config.py's --set key grammar
NAME = re.compile(r"[A-Za-z_][\w-]*", re.ASCII)  # one key inside a section value
# the Hugging Face hub's repo id grammar: <owner>/<name>, letters, digits, '-', '_', '.', no '..' or '--'
# runs, neither part starting or ending with '-' or '.', the name at most 96 characters
HUB_ID = re.compile(r"(?!.*(\.\.|--))[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?/[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?", re.ASCII)
# MLflow registered model: models:/<name>/<version> or models:/<name>@<alias>
MODELS_URI = re.compile(r"models:/[A-Za-z0-9][\w.-]{0,255}(/[1-9][0-9]{0,9}|@[A-Za-z_][\w-]{0,255})", re.ASCII)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PRESET = re.compile(r"(?!.*\.ya?ml$)[A-Za-z0-9][\w.-]{0,63}", re.ASCII)  # a name under stages/configs/, never a path
VOCAB_ESTIMATE = 256  # the tiny models' char vocabulary, rounded up (for max_model_params)


def shown(value, quote: bool = True) -> str:
    """``value`` for an error message: at most :data:`SHOWN` characters, control characters escaped."""
    text = value if isinstance(value, str) else repr(value)
    cut = CONTROL.sub(lambda m: repr(m.group())[1:-1], text[:SHOWN])
    return (f"'{cut}'" if quote else cut) + (f" (…{len(text)} characters)" if len(text) > SHOWN else "")


def cap(name: str) -> int:
    """The deployment's value of a cap (setting ``s2d_<name>``, default from :data:`CAPS`)."""
    return int(s.number(name, CAPS[name][0]))


def cap_for(path: str) -> str | None:
    """The cap that bounds a key path, or None."""
    for name, (_, patterns, _) in CAPS.items():
        if any(fnmatch.fnmatchcase(path, p) for p in patterns):
            return name
    return None


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def code_key(key: str) -> bool:
    """A key that loads code, reads the worker's files, reaches the network or redirects lineage."""
    return any(_under(key, k) for k in CODE_KEYS) or any(seg in key.split(".") for seg in CODE_SEGMENTS)


# ---------------------------------------------------------------- places: artifact roots and model sources


def confine(uri: str, what: str) -> str | None:
    """Why ``uri`` is not a place this deployment lets a trigger write to or read from, or None.
    Local paths must resolve (symlinks and ``..`` followed) strictly under the artifact base; ``s3://``
    URIs must lie strictly under an allowed ``bucket/prefix`` (setting ``allowed_buckets``; default: the
    base's bucket and prefix), without ``.``, ``..`` or empty segments."""
    if CONTROL.search(uri):
        return f"{what} {shown(uri)} contains a control character"
    base = s.artifact_base()
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        segments = key.rstrip("/").split("/")
        if not key.strip("/") or any(seg in ("", ".", "..") for seg in segments):
            return f"{what} {shown(uri)} must name a folder inside the bucket, without '.', '..' or '//'"
        default = (base[5:].strip("/"),) if base.startswith("s3://") else ()
        allowed = s.listed("allowed_buckets", default)
        places = [(entry.partition("/")[0], entry.partition("/")[2].strip("/")) for entry in allowed]
        if not any(bucket == b for b, _ in places):
            return f"{what} {shown(uri)}: bucket {shown(bucket)} is not an allowed bucket (setting s2d_allowed_buckets)"
        key = "/".join(segments)
        if not any(bucket == b and (not prefix or key.startswith(prefix + "/")) for b, prefix in places):
            inside = ", ".join(f"s3://{b}/{p}/" for b, p in places if b == bucket)
            return (
                f"{what} {shown(uri)} is outside the allowed S3 prefix {inside} (settings s2d_artifact_base, s2d_allowed_buckets)"
            )
        return None
    if "://" in uri:
        return f"{what} {shown(uri)} is neither a local path nor s3://"
    if base.startswith("s3://"):
        return f"{what} {shown(uri)} is a local path, but the artifact base is {base} (S2D_ARTIFACT_BASE)"
    if ".." in uri.split("/"):
        return f"{what} {shown(uri)} contains '..'"
    path = os.path.realpath(os.path.join(s.setting("workdir") or os.getcwd(), uri))
    real_base = os.path.realpath(base)
    if not path.startswith(real_base.rstrip("/") + "/"):
        return f"{what} {shown(uri)} is outside the artifact base {real_base} (S2D_ARTIFACT_BASE)"
    return None


def model_refusal(source, what: str) -> str | None:
    """Why a model source may not be loaded by a trigger, or None: an allowed name (``bootstrap``), a
    well-formed ``models:/`` reference (when ``models:/`` is allowed), a hub id of the hub's grammar under
    an allowed owner prefix, or a checkpoint confined like the artifact root."""
    if not isinstance(source, str) or not source:
        return f"{what}: a model source is a non-empty string, got {shown(source)}"
    if CONTROL.search(source):
        return f"{what} {shown(source)} contains a control character"
    prefixes = s.listed("allowed_model_prefixes", DEFAULT_MODEL_PREFIXES)
    if source in prefixes and (HUB_ID.fullmatch(source) or not re.search(r"[/:.\\]", source)):
        return None  # a name the deployment allows as it is (bootstrap, or one exact hub id)
    if source.startswith("models:/"):
        if "models:/" not in prefixes:
            return f"{what} {shown(source)}: registered models are not allowed (setting s2d_allowed_model_prefixes)"
        if not MODELS_URI.fullmatch(source):
            return f"{what} {shown(source)} is not models:/<name>/<version> or models:/<name>@<alias>"
        return None
    if source.startswith(("/", ".")) or "://" in source or source.count("/") != 1:  # a path or URI, not a hub id
        problem = confine(source, what)
        return problem and f"{problem}; allowed model sources: checkpoints under the artifact base, " \
                           "hub ids under s2d_allowed_model_prefixes"
    if not HUB_ID.fullmatch(source):
        return f"{what} {shown(source)} is not a hub id (<owner>/<name>: letters, digits, '-', '_', '.'; no '..')"
    if not any(p.endswith("/") and source.startswith(p) for p in prefixes):
        return f"{what} {shown(source)} is not under an allowed model prefix (setting s2d_allowed_model_prefixes)"
    return None


# ---------------------------------------------------------------- override values: parsed, walked, bounded


def parse_value(raw: str):
    """``raw`` parsed as the stage parses an override value (PyYAML ``safe_load``), after a bounded scan of
    its events: at most :data:`MAX_VALUE_NODES` nodes with every alias counted at its anchor's full size
    (an alias bomb is refused before anything is built) and :data:`MAX_VALUE_DEPTH` levels.
    Returns ``(value, None)`` or ``(None, why)``."""
    import yaml

    sizes: dict[str, int] = {}
    stack: list[list] = [[0, None]]  # open collections: [nodes so far, anchor]
    try:
        for ev in yaml.parse(raw, Loader=yaml.SafeLoader):
            if isinstance(ev, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                stack.append([1, ev.anchor])
                if len(stack) > MAX_VALUE_DEPTH + 1:
                    return None, f"nested deeper than {MAX_VALUE_DEPTH} levels"
                continue
            if isinstance(ev, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                size, anchor = stack.pop()
            elif isinstance(ev, yaml.ScalarEvent):
                size, anchor = 1, ev.anchor
            elif isinstance(ev, yaml.AliasEvent):
                if ev.anchor not in sizes:
                    return None, "an alias to an unknown anchor"
                size, anchor = sizes[ev.anchor], None
            else:
                continue
            if anchor:
                sizes[anchor] = size
            stack[-1][0] += size
            if stack[-1][0] > MAX_VALUE_NODES or size > MAX_VALUE_NODES:
                return None, f"more than {MAX_VALUE_NODES} values once its aliases are expanded"
        return yaml.safe_load(raw), None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark is not None and mark.line == 0 else ""
        return None, f"not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__})"
    except (RecursionError, ValueError, TypeError) as e:
        return None, f"not a value this config accepts ({type(e).__name__})"


def leaves(key: str, value, depth: int = 0):
    """Every key path an override sets, with its value: ``(path, value)``. A mapping sets each of its keys
    (a section value replaces the whole section, so the section's own path is yielded too); a list's
    mappings set keys under the list's path."""
    if isinstance(value, dict):
        yield key, value
        for k, v in value.items():
            if not isinstance(k, str) or not NAME.fullmatch(k):
                yield f"{key}.<{shown(k)}>", None  # refused by the caller: not a key of any section
                continue
            yield from leaves(f"{key}.{k}", v, depth + 1)
    elif isinstance(value, list):
        yield key, value
        for item in value:
            if isinstance(item, (dict, list)):
                yield from ((p, v) for p, v in leaves(key, item, depth + 1) if p != key)
    else:
        yield key, value


def template_refusal(template) -> str | None:
    """A prompt template a trigger may set: a string of at most ``max_prompt_template_chars`` characters
    whose only field is a plain ``{problem}`` (no attribute or index lookups, no format spec or
    conversion: those read attributes of Python objects or pad prompts to any width)."""
    if not isinstance(template, str):
        return f"task.prompt_template must be a string, got {shown(template)}"
    if len(template) > cap("max_prompt_template_chars"):
        return (f"task.prompt_template has {len(template)} characters; at most {cap('max_prompt_template_chars')} "
                "(setting s2d_max_prompt_template_chars)")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return f"task.prompt_template {shown(template)} is not a valid format string"
    for f, spec, conv in fields:
        if f != "problem" or spec or conv:
            field = "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            return f"task.prompt_template: field {shown(field)} is not allowed; the only field is a plain {{problem}}"
    return None


def arch_params(arch: dict) -> int | None:
    """Parameters of a tiny Qwen3-shaped model built from ``arch`` (the char vocabulary rounded up), or None
    when its sizes are not whole numbers."""
    try:
        h, n, i = (int(arch[k]) for k in ("hidden_size", "layers", "intermediate_size"))
    except (KeyError, TypeError, ValueError):
        return None
    return n * (4 * h * h + 3 * h * i) + VOCAB_ESTIMATE * h


def value_refusal(path: str, value) -> str | None:
    """What the schema cannot say about one key path's value: caps, model sources, the prompt template."""
    if path.startswith("models.") and path.endswith(".source") and path.count(".") == 2:
        return model_refusal(value, f"overrides: {shown(path, quote=False)}")
    if path == "task.prompt_template":
        return template_refusal(value)
    name = cap_for(path)
    if name is None:
        return None
    if name == "max_model_params":
        params = arch_params(value) if isinstance(value, dict) else None
        if params is not None and params > cap(name):
            return (f"overrides: {shown(path, quote=False)} builds a model of about {params:,} parameters; at most "
                    f"{cap(name):,} (setting s2d_{name})")
        return None
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, (int, float)):  # the schema would turn "99999" into a number: a capped key takes numbers only
        return f"overrides: {shown(path, quote=False)}={shown(value)} must be a number ({CAPS[name][2]}; setting s2d_{name})"
    if value > cap(name):
        return (f"overrides: {shown(path, quote=False)}={shown(value)} is above the cap {cap(name)} ({CAPS[name][2]}; "
                f"setting s2d_{name})")
    return None


def override_refusal(item, allowed: tuple[str, ...]) -> str | None:
    """Why one ``key.path=value`` override is refused, or None. The value is parsed as the stage parses it
    and every key path it sets is checked: the allow-list, code and egress keys, caps, sources."""
    if not isinstance(item, str):
        return f"overrides: {shown(item)} is not key.path=value"
    if len(item) > MAX_OVERRIDE_CHARS:
        return f"overrides: {shown(item)} is longer than {MAX_OVERRIDE_CHARS} characters"
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not KEY.fullmatch(key):
        return f"overrides: {shown(item)} is not key.path=value"
    value, problem = parse_value(raw)
    if problem:
        return f"overrides: {shown(key, quote=False)}: the value is {problem}"
    paths = list(leaves(key, value))
    if re.fullmatch(r"models\.[^.]+\.arch\..+", key):  # its size is known only from the whole arch
        return f"overrides: {shown(key, quote=False)}: set the whole arch (models.<role>.arch={{hidden_size: ..., layers: ...}})"
    for path, _ in paths:
        if "<" in path:
            return f"overrides: {shown(key, quote=False)}: {path.partition('<')[2][:-1]} is not a key name"
        if code_key(path) and not any(_under(path, p) and code_key(p) for p in allowed):
            return f"overrides: {shown(item)} loads code or reaches beyond the run ({path}); only the deployment may " \
                   "allow it (setting s2d_allowed_overrides, naming the key)"
    for path, leaf in paths:
        if not any(_under(path, p) for p in allowed):
            return f"overrides: {shown(path)} is not an allowed key (setting s2d_allowed_overrides: {', '.join(allowed)})"
        problem = value_refusal(path, leaf)
        if problem:
            return problem
    return None


# ---------------------------------------------------------------- the whole trigger


def refusal(params: dict, form: set[str]) -> str | None:
    """Why a trigger's values are refused, in one line, or None. Types and ranges are the form's schema
    (checked when the run is created); this is what the schema cannot say: the deployment's allow-lists
    and caps, and where artifacts may go."""
    unknown = sorted(set(params) - form)
    if unknown:
        return (f"{shown(', '.join(map(str, unknown)), quote=False)}: not a parameter of this DAG "
                f"(the form's fields: {', '.join(sorted(form))})")
    if not params.get("stages"):
        return "stages: choose at least one stage (leave stages out only for an ablation, never all of them)"
    # the form's schema says these too; checked again because they are written into the stage's command line
    if not isinstance(params.get("preset"), str) or not PRESET.fullmatch(params["preset"]):
        return f"preset {shown(params.get('preset'))} is not a preset name (stages/configs/<name>.yaml)"
    if not isinstance(params["stages"], list) or any(x not in table.WORKFLOW for x in params["stages"]):
        return f"stages {shown(params['stages'])}: choose from {', '.join(table.WORKFLOW)}"
    if params.get("approval") is not None and not isinstance(params["approval"], bool):
        return f"approval {shown(params['approval'])} is not true or false"
    for name in ("seed", *(f"{n}_steps" for n in table.STEP_STAGES)):
        value = params.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"{name} {shown(value)} is not a whole number, 0 or more"
    if params.get("artifact_root"):
        root = params["artifact_root"]
        problem = confine(root.rstrip("/") or "/", "artifact_root") if isinstance(root, str) else "artifact_root: not a string"
        if problem:
            return problem
    for role in ("teacher", "student"):
        if params.get(role):
            # the form's value becomes the override models.<role>.source=<value>, which the stage reads as YAML:
            # what is checked must be what the stage reads
            problem = model_refusal(params[role], role)
            if problem is None and parse_value(params[role]) != (params[role], None):
                problem = f"{role} {shown(params[role])} is not a plain value (YAML reads it as something else)"
            if problem:
                return problem
    for field in table.budget_fields():
        steps = params.get(field)
        if isinstance(steps, int) and steps > cap("max_steps"):
            return f"{field}={steps} is above the cap {cap('max_steps')} (setting s2d_max_steps)"
    items = params.get("overrides") or []
    if not isinstance(items, list):
        return "overrides: a list of key.path=value lines"
    if len(items) > MAX_OVERRIDES:
        return f"overrides: {len(items)} lines; at most {MAX_OVERRIDES}"
    allowed = allowed_overrides()
    for item in items:
        problem = override_refusal(item, allowed)
        if problem:
            return problem
    return None


def allowed_overrides() -> tuple[str, ...]:
    """The deployment's allow-list of override keys (setting ``allowed_overrides``; ``default`` expands to
    :data:`DEFAULT_ALLOWED_OVERRIDES`)."""
    out: list[str] = []
    for entry in s.listed("allowed_overrides", ("default",)):
        out += DEFAULT_ALLOWED_OVERRIDES if entry == "default" else [entry]
    return tuple(out)


def caps_text() -> str:
    """The caps in force, for the form's help text."""
    return "; ".join(f"{what} ≤ {cap(name):,} (`s2d_{name}`)" for name, (_, _, what) in CAPS.items())
