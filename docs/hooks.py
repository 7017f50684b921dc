"""MkDocs hook (``hooks:`` in mkdocs.yml): the reference pages, generated from the code at every build.

    mkdocs build --strict -d site        # make docs

- ``reference/config.md``: every key of the config schema (``stages/config.py``), found by walking the
  pydantic models' ``model_fields`` from ``Config`` down, with its type, default and description; then the
  values of every shipped preset (``stages/configs/*.yaml``) that differ from the defaults.
- ``reference/cli.md``: ``python -m stages --help`` (a parser builder's help, and each subcommand's, when
  ``stages/cli.py`` has one), the commands and the exit codes.

Nothing is written to ``docs/``: the pages exist only in the build. ``tests/test_docs.py`` checks that every
field has a description and builds the site.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import annotated_types
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the stages package of this checkout, installed or not
    sys.path.insert(0, str(ROOT))

# Guide pages for the schema's sections (links from the reference back to the prose)
GUIDES = {
    "task": ("Tasks", "../tasks.md"),
    "models": ("Running stages: inputs", "../running-stages.md#inputs-outputs-skip-and-resume"),
    "bootstrap": ("Tasks: writing a task plugin", "../tasks.md#writing-a-task-plugin"),
    "sampling": ("GPU path: rollout engines", "../gpu.md#rollout-engines"),
    "teacher": ("Teacher service", "../teacher-service.md"),
    "teacher_data": ("Teacher service: stored teacher data", "../teacher-service.md#stage-2a-from-stored-teacher-data"),
    "teacher_rl": ("The math", "../math.md#losses"),
    "kl_warmup": ("The math", "../math.md#losses"),
    "onpolicy_distill": ("The math", "../math.md#losses"),
    "student_rl": ("The math", "../math.md#losses"),
    "direct_grpo": ("Running stages: ablations", "../running-stages.md#ablations"),
    "eval": ("Tasks: the paper's evaluation protocol", "../tasks.md#the-papers-evaluation-protocol"),
    "promote": ("From a run to a deployed student", "../promotion.md#the-gate"),
    "cost": ("What a stage cost", "../promotion.md#what-a-stage-cost"),
    "workflow": ("Running stages: ablations", "../running-stages.md#ablations"),
    "tracking": ("Tracking", "../tracking.md"),
    "train": ("GPU path: training efficiency", "../gpu.md#training-efficiency"),
}


# --- the configuration ---------------------------------------------------------------------------

class Key(typing.NamedTuple):
    path: str  # dotted, as --set takes it; <name> stands for a key the user chooses
    field: object  # pydantic FieldInfo
    default: object  # the effective default at this path (a section's default may override its class's)
    has_default: bool


def _models_in(ann) -> list[tuple[type[BaseModel], str]]:
    """The pydantic models a field's type holds, each with the path segment that reaches its fields."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [(ann, "")]
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return [m for a in args for m in _models_in(a)]
    if origin is dict and len(args) == 2:
        return [(m, f".<name>{seg}") for m, seg in _models_in(args[1])]
    if origin in (list, tuple) and args:
        return [(m, f"[]{seg}") for m, seg in _models_in(args[0])]
    return []


def walk(model: type[BaseModel], prefix: str = "", instance: BaseModel | None = None):
    """Every field of ``model`` and of the models inside it, depth first, as :class:`Key`."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if instance is not None:
            default, has = getattr(instance, name), True
        elif field.is_required():
            default, has = None, False
        else:
            default, has = field.get_default(call_default_factory=True), True
        yield Key(path, field, default, has)
        for sub, seg in _models_in(field.annotation):
            yield from walk(sub, f"{path}{seg}.", default if isinstance(default, sub) else None)


def fields_without_description() -> list[str]:
    from stages.config import Config

    return [k.path for k in walk(Config) if not (k.field.description or "").strip()]


def type_name(ann) -> str:
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


BOUNDS = ((annotated_types.Gt, "> ", "gt"), (annotated_types.Ge, ">= ", "ge"), (annotated_types.Lt, "< ", "lt"),
          (annotated_types.Le, "<= ", "le"), (annotated_types.MinLen, "length >= ", "min_length"))


def bounds(field) -> str:
    """The field's constraints (``Field(gt=0, le=1)``) as ``> 0, <= 1``."""
    return ", ".join(f"{sign}{getattr(m, attr)}" for m in field.metadata for cls, sign, attr in BOUNDS if isinstance(m, cls))


def value_text(value) -> str:
    """A value as it would be written in YAML (strings as JSON strings, so newlines show)."""
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, (dict, list)):
        value = json.loads(json.dumps(value, default=lambda v: v.model_dump() if isinstance(v, BaseModel) else str(v)))
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("\n...").strip()


def code(text: str) -> str:
    """Inline code that is safe in a table cell (a ``|`` would split the cell)."""
    return f"<code>{html.escape(text).replace('|', '&#124;')}</code>"


def cell(markdown: str) -> str:
    """Markdown for a table cell: ``|`` and ``<`` escaped outside code spans; code spans with a pipe as HTML."""
    parts = re.split(r"(`[^`]*`)", " ".join(markdown.split()))
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(code(part[1:-1]) if "|" in part else part)
        else:
            out.append(html.escape(part, quote=False).replace("|", "&#124;"))
    return "".join(out)


def config_reference() -> str:
    from stages.config import PRESETS, Config, load_config

    keys = list(walk(Config))
    lines = [
        "# Configuration reference",
        "",
        "Generated from `stages/config.py` and `stages/configs/*.yaml` at every build of this site "
        "(`docs/hooks.py`): every key a config file or `--set key.path=value` may set. "
        "How configs work: [Configs](../configs.md).",
        "",
        "Keys are dotted paths as `--set` takes them; `<name>` is a key you choose (a split or an evaluation "
        "set's name). A *section* holds the keys below it. Unknown keys are errors.",
        "",
    ]
    sections = [k for k in keys if "." not in k.path and _models_in(k.field.annotation)]
    top = [k for k in keys if "." not in k.path and not _models_in(k.field.annotation)]
    lines += ["## Top-level keys {#top-level}", "", *table(top)]
    for sec in sections:
        rows = [k for k in keys if k.path.startswith(sec.path + ".") or k.path.startswith(sec.path + "[")]
        lines += [f"## `{sec.path}` {{#{sec.path}}}", "", cell(sec.field.description or "")]
        if sec.path in GUIDES:
            title, href = GUIDES[sec.path]
            lines[-1] += f" Guide: [{title}]({href})."
        lines += ["", *table(rows)]
    lines += presets_section(PRESETS, load_config, keys)
    return "\n".join(lines) + "\n"


def table(keys: list[Key]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for k in keys:
        kind = type_name(k.field.annotation)
        if bounds(k.field):
            kind += f", {bounds(k.field)}"
        default = value_text(k.default) if k.has_default else "required"
        rows.append(f"| {code(k.path)} | {code(kind)} | {code(default)} | {cell(k.field.description or '')} |")
    return rows + [""]


def leaves(value, prefix: str = "") -> dict[str, object]:
    """A config's values by dotted path; models and dicts of models are walked, anything else is a value."""
    if isinstance(value, BaseModel):
        out = {}
        for name in type(value).model_fields:
            out.update(leaves(getattr(value, name), f"{prefix}{name}."))
        return out
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        # one entry per key (task.data.<split>), written as its non-default fields
        return {f"{prefix}{name}": v.model_dump(exclude_defaults=True) for name, v in value.items()}
    return {prefix.rstrip("."): value}


def presets_section(presets: Path, load_config, keys: list[Key]) -> list[str]:
    files = sorted(presets.glob("*.yaml"), key=lambda f: (f.stem != "tiny", f.stem))  # the embedded default first
    configs = {f.stem: load_config(f.stem) for f in files}
    values = {name: leaves(cfg) for name, cfg in configs.items()}
    defaults = {k.path: k.default for k in keys if k.has_default and not isinstance(k.default, BaseModel)}
    order = {k.path: i for i, k in enumerate(keys)}

    def schema_order(path: str) -> int:  # task.data.eval sorts where task.data is
        parts = path.split(".")
        return next(order[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in order)

    paths = sorted(dict.fromkeys(p for v in values.values() for p in v), key=schema_order)
    shown = [p for p in paths if any(v.get(p, defaults.get(p)) != defaults.get(p, object()) for v in values.values())]
    out = [
        "## Presets {#presets}",
        "",
        f"The shipped presets (`stages/configs/`), loaded and validated as `--config <name>` loads them. The table "
        f"lists the {len(shown)} keys where some preset differs from the schema's default (– : not set by that "
        f"preset, whose default applies); every other key takes its default in every preset.",
        "",
        "| key | default | " + " | ".join(f"`{n}`" for n in configs) + " |",
        "|---|---|" + "---|" * len(configs),
    ]
    for p in shown:
        d = code(value_text(defaults[p])) if p in defaults else "–"
        cells = [code(value_text(v[p])) if p in v else "–" for v in values.values()]
        out.append(f"| {code(p)} | {d} | " + " | ".join(cells) + " |")
    out.append("")
    for f in files:
        command = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("# ")), "")
        out += [f"### `{f.stem}` {{#preset-{f.stem}}}", "", f"`stages/configs/{f.name}`" + (f": `{command}`" if command else ""),
                "", f'??? note "{f.name}"', "", "    ```yaml",
                *[f"    {ln}".rstrip() for ln in f.read_text().rstrip().splitlines()], "    ```", ""]
    return out


# --- the CLI -------------------------------------------------------------------------------------

TOOLS = {  # the commands that are not stages of the table (stages are described by stages/registry.py)
    "workflow": "every planned stage in order, then the report",
    "validate": "check the config, this host and the task's data; loads no model",
    "plan": "the stage order and inputs; opens (or finds) the MLflow parent run",
    "report": "the summary table from the manifests; registers the final models",
    "close-runs": "end the root's MLflow runs still RUNNING (the DAG's teardown)",
}
EXIT_CODES = [
    ("0", "done: the stage is published (or was already), or the command finished"),
    ("1", "a failure that is not the user's (one line on stderr; `--debug` adds the traceback)"),
    ("2", "a user error, found before any model loads: config, flag, input, data"),
    ("99", "`--if-planned` and the config switches this stage off (orchestrators: skipped)"),
    ("130", "interrupted (Ctrl-C); nothing published, the last resume state kept"),
    ("143", "terminated (SIGTERM); nothing published, the last resume state kept"),
]


def _parser(mod) -> argparse.ArgumentParser | None:
    for name in ("build_parser", "make_parser", "get_parser", "parser"):
        fn = getattr(mod, name, None)
        if callable(fn):
            try:
                p = fn()
            except TypeError:
                continue
            if isinstance(p, argparse.ArgumentParser):
                return p
    return None


def cli_reference() -> str:
    import stages.cli as cli
    from stages.registry import STAGES

    parser = _parser(cli)
    helps: list[tuple[str, str]] = []
    if parser is not None:
        os.environ.setdefault("COLUMNS", "100")
        helps.append(("python -m stages --help", parser.format_help()))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps += [(f"python -m stages {n} --help", p.format_help()) for n, p in action.choices.items()]
    else:  # no parser builder: the help as the command prints it
        env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-m", "stages", "--help"], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=True, timeout=120).stdout
        helps.append(("python -m stages --help", out))
    commands = getattr(cli, "COMMANDS", tuple(STAGES) + tuple(TOOLS))
    lines = [
        "# CLI reference",
        "",
        "Generated from `stages/cli.py` at every build of this site (`docs/hooks.py`). Every stage is one "
        "command; the same command runs as a subprocess, in a container, in a pod or on Ray workers "
        "([Running stages](../running-stages.md)).",
        "",
        "## Commands",
        "",
        "| command | kind | what |",
        "|---|---|---|",
    ]
    for c in commands:
        stage = STAGES.get(c)
        kind = stage.kind if stage else "tool"
        what = (stage.paper or "") if stage else TOOLS.get(c, "")
        if stage and stage.kind == "tool":
            what = what or "scores a checkpoint on every set in `eval.sets` (`--model`, `--label`)"
        lines.append(f"| `{c}` | {kind} | {cell(what)} |")
    lines += ["", "## Help", ""]
    for title, text in helps:
        lines += [f"`{title}`", "", "```text", text.rstrip(), "```", ""]
    lines += ["## Exit codes", "", "| code | meaning |", "|---|---|"]
    lines += [f"| {c} | {m} |" for c, m in EXIT_CODES]
    return "\n".join(lines) + "\n"


# --- the hook ------------------------------------------------------------------------------------

def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, text in (("reference/config.md", config_reference()), ("reference/cli.md", cli_reference())):
        files.append(File.generated(config, uri, content=text))
    return files
