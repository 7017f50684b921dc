"""The trigger form of the DAG (its ``params``): the stage switches and step budgets from the stage table,
help texts naming the deployment's base folder and caps. A module of its own so that the schedule check
(``sparse_to_dense_schedules.py``) validates a schedule's ``conf`` against it without building a DAG."""

from __future__ import annotations

import s2d_policy as policy
import s2d_settings as s
import s2d_table as table
from airflow.sdk import Param

RUN, BUDGETS, MODELS, WHERE, PROMOTION, ADVANCED = ("What to run", "Step budgets", "Models", "Where the artifacts go",
                                                    "Promotion", "Config overrides (advanced)")
PRESET_DISPLAY = {"tiny": "tiny: built-in models, runs on a CPU in minutes",
                  "qwen3-1.7b": "qwen3-1.7b: Qwen3-8B teacher, Qwen3-1.7B student (GPUs)",
                  "llama3.1-8b": "llama3.1-8b: Llama-3.3-70B teacher, Llama-3.1-8B student (GPUs)"}


def budget_params(default: str) -> dict[str, Param]:
    """The step-budget fields, each showing what runs with the form's preset (``default``): its value from
    ``stages/configs/<default>.yaml``, the other presets' in the help. A field left at that value with
    another preset means that preset's own (:func:`s2d_contract.overrides`), so a trigger or a schedule
    that names only a preset runs the preset. The baseline's field stays empty: equal to the workflow's
    student steps, the paper's comparison."""
    shown = table.preset_budgets(default)
    every = {p: table.preset_budgets(p) for p in table.PRESETS}
    cap = f"0 to {policy.cap('max_steps'):,} (setting s2d_max_steps)"
    titles = {"bootstrap_teacher_steps": "0 · Bootstrap: teacher pretraining steps",
              "bootstrap_student_steps": "0 · Bootstrap: student pretraining steps",
              **{f"{n}_steps": table.title(n) for n in table.STEP_STAGES}}
    out = {}
    for field in table.budget_fields():
        if field == "direct_grpo_steps":
            out[field] = Param(None, type=["null", "integer"], minimum=0, title=titles[field] + " (steps)", section=BUDGETS,
                               description="empty: equal to the workflow's student steps (the student stages that run), "
                                           "the equal-budget comparison of the headline. A number sets it anyway: the "
                                           f"headline then says the budgets differ. {cap}")
            continue
        per = " · ".join(f"{p} {every[p][field]}" if every[p][field] is not None else f"{p}: not used" for p in table.PRESETS)
        what = ("the built-in base models' supervised pretraining (presets that build their models)"
                if field.startswith("bootstrap_") else "optimizer steps")
        out[field] = Param(shown[field], type=["null", "integer"], minimum=0, title=titles[field], section=BUDGETS,
                           description=f"{what}. Shown: preset {default}'s ({per}). Left at {shown[field]} with another "
                                       f"preset: that preset's own; empty: the chosen preset's. {cap}"
                           if shown[field] is not None else
                           f"{what}. Presets: {per}; empty: the chosen preset's. {cap}")
    return out


def form_params() -> dict[str, Param]:
    """The trigger form: its stage switches and step budgets from the stage table, its help texts naming
    the deployment's base folder and caps (read from the environment when the DAG is parsed)."""
    workflow = list(table.WORKFLOW)
    default = table.default_preset()
    return {
        "preset": Param(default, type="string", enum=list(table.PRESETS), title="Preset", section=RUN,
                        values_display=PRESET_DISPLAY,
                        description="the configuration the run starts from (stages/configs/<preset>.yaml); the step "
                                    f"budgets below show preset {default}'s (setting S2D_DEFAULT_PRESET)"),
        "stages": Param(workflow, type=["array", "null"], items={"type": "string", "enum": workflow}, uniqueItems=True,
                        minItems=1, examples=workflow, values_display={n: table.title(n) for n in workflow}, title="Stages",
                        section=RUN, description="the workflow's stages; leave one out for the paper's ablations"),
        "baseline": Param(True, type="boolean", title="Also run the direct-GRPO baseline", section=RUN,
                          description="GRPO on the base student with the same labeled data and student step budget"),
        "seed": Param(0, type="integer", minimum=0, title="Seed", section=RUN,
                      description="random seed of every stage (a whole number, 0 or more)"),
        **budget_params(default),
        "teacher": Param(None, type=["null", "string"], maxLength=500, title="Teacher model", section=MODELS,
                         description_md="empty: the preset's. A hub id `<owner>/<name>` under an allowed owner "
                                        "(setting `s2d_allowed_model_prefixes`), `models:/<name>/<version>`, or a "
                                        "published checkpoint under the artifact base"),
        "student": Param(None, type=["null", "string"], maxLength=500, title="Student model", section=MODELS,
                         description_md="empty: the preset's. Same rules as the teacher"),
        "artifact_root": Param(None, type=["null", "string"], maxLength=500, title="Artifact root", section=WHERE,
                               description_md=f"empty: `{s.artifact_base()}/<dag_id>/<run_id>`. A folder under the "
                                              f"artifact base `{s.artifact_base()}` (setting `S2D_ARTIFACT_BASE`; or "
                                              "`s3://<allowed bucket>/<prefix>/...`); reuse a root to resume or skip "
                                              "finished stages"),
        "approval": Param(s.setting("approval", "false") == "true", type="boolean", section=PROMOTION,
                          title="A person approves the promotion",
                          description_md="when the gate passes, the new version becomes `@champion` only after someone "
                                         "approves it in this run's **Required actions** (no answer in "
                                         f"{s.setting('approval_timeout_hours', '72')} h: rejected)"),
        "overrides": Param([], type=["array", "null"], items={"type": "string", "maxLength": policy.MAX_OVERRIDE_CHARS},
                           maxItems=policy.MAX_OVERRIDES, title="Config overrides", section=ADVANCED,
                           description_md="one `key.path=value` per line, checked against the config schema by `plan` "
                                          "(keys: the deployment's allow-list `s2d_allowed_overrides`; code, file, URL "
                                          "and tracking keys only where it names them). Caps: " + policy.caps_text()),
    }


