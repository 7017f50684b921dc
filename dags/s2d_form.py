"""The trigger form of the DAG (its ``params``): the stage switches and step budgets from the stage table,
help texts naming the deployment's base folder and caps. A module of its own so that the schedule check
(``sparse_to_dense_schedules.py``) validates a schedule's ``conf`` against it without building a DAG."""

from __future__ import annotations

import s2d_policy as policy
import s2d_settings as s
import s2d_table as table
from airflow.sdk import Param

RUN, BUDGETS, MODELS, WHERE, ADVANCED = ("What to run", "Step budgets (empty: the preset's)", "Models",
                                         "Where the artifacts go", "Config overrides (advanced)")


def form_params() -> dict[str, Param]:
    """The trigger form: its stage switches and step budgets from the stage table, its help texts naming
    the deployment's base folder and caps (read from the environment when the DAG is parsed)."""
    workflow = list(table.WORKFLOW)
    return {
        "preset": Param("tiny", type="string", enum=["tiny", "qwen3-1.7b", "llama3.1-8b"], title="Preset", section=RUN,
                        values_display={"tiny": "tiny: built-in models, runs on a CPU in minutes",
                                        "qwen3-1.7b": "qwen3-1.7b: Qwen3-8B teacher, Qwen3-1.7B student (GPUs)",
                                        "llama3.1-8b": "llama3.1-8b: Llama-3.3-70B teacher, Llama-3.1-8B student (GPUs)"},
                        description="the configuration the run starts from (stages/configs/<preset>.yaml)"),
        "stages": Param(workflow, type=["array", "null"], items={"type": "string", "enum": workflow}, uniqueItems=True,
                        minItems=1, examples=workflow, values_display={n: table.title(n) for n in workflow}, title="Stages",
                        section=RUN, description="the workflow's stages; leave one out for the paper's ablations"),
        "baseline": Param(True, type="boolean", title="Also run the direct-GRPO baseline", section=RUN,
                          description="GRPO on the base student with the same labeled data and student step budget"),
        "seed": Param(0, type="integer", minimum=0, title="Seed", section=RUN,
                      description="random seed of every stage (a whole number, 0 or more)"),
        **{f"{n}_steps": Param(None, type=["null", "integer"], minimum=0, title=table.title(n), section=BUDGETS,
                               description=f"optimizer steps (0 to {policy.cap('max_steps'):,}, setting s2d_max_steps; "
                                           "empty: the preset's)")
           for n in table.STEP_STAGES},
        "teacher": Param(None, type=["null", "string"], maxLength=500, title="Teacher model", section=MODELS,
                         description_md="empty: the preset's. A hub id `<owner>/<name>` under an allowed owner "
                                        "(setting `s2d_allowed_model_prefixes`), `models:/<name>/<version>`, or a "
                                        "published checkpoint under the artifact base"),
        "student": Param(None, type=["null", "string"], maxLength=500, title="Student model", section=MODELS,
                         description_md="empty: the preset's. Same rules as the teacher"),
        "artifact_root": Param(None, type=["null", "string"], maxLength=500, title="Artifact root", section=WHERE,
                               description_md=f"empty: `{s.artifact_base()}/<dag_id>/<run_id>`. A folder under the "
                                              "artifact base (setting `s2d_artifact_base`; or `s3://<allowed bucket>/"
                                              "<prefix>/...`); reuse a root to resume or skip finished stages"),
        "overrides": Param([], type=["array", "null"], items={"type": "string", "maxLength": policy.MAX_OVERRIDE_CHARS},
                           maxItems=policy.MAX_OVERRIDES, title="Config overrides", section=ADVANCED,
                           description_md="one `key.path=value` per line, checked against the config schema by `plan` "
                                          "(keys: the deployment's allow-list `s2d_allowed_overrides`; code, file, URL "
                                          "and tracking keys only where it names them). Caps: " + policy.caps_text()),
    }


