"""Prompt encoding, one function for sampling, training and evaluation, and the up-front data checks.

Instruct models expect their chat template: with ``task.chat_template: auto`` (default) a prompt is sent as
one user message through the tokenizer's template when it has one (the task's ``prompt_template`` carries
the instruction to put the final answer in ``\\boxed{}``); ``never`` sends the raw text after BOS;
``always`` requires a template.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .task_contract import Problem, TaskError
from .tasks import check_task, needed_splits


def uses_chat_template(tok, mode: str) -> bool:
    has = bool(getattr(tok, "chat_template", None))
    if mode == "always" and not has:
        raise TaskError("task.chat_template: 'always', but the tokenizer has no chat template")
    return has and mode != "never"


def encode(tok, problems: list[Problem], chat_template: str = "auto") -> list[list[int]]:
    """Prompt token ids. The template's text already holds its special tokens (BOS included), so it is
    tokenized without adding more; a raw prompt gets BOS when the tokenizer has one."""
    if uses_chat_template(tok, chat_template):
        texts = [tok.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True,
                                         tokenize=False) for p in problems]
        return tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids = tok([p.prompt for p in problems], add_special_tokens=False)["input_ids"] if problems else []
    if tok.bos_token_id is not None:
        ids = [[tok.bos_token_id] + x for x in ids]
    return ids


def context_window(cfg: Config):
    """(tokenizer, context length, where it comes from) of the base models, read without loading weights;
    None when they cannot be read here (a hub id not in the local cache: checked when the stage loads it)."""
    from .models import TINY_CONTEXT, char_tokenizer

    spec = cfg.models.student
    if spec.source == "bootstrap":
        ctx = TINY_CONTEXT
        tok = char_tokenizer()
    else:
        from transformers import AutoConfig, AutoTokenizer

        local = Path(spec.source).is_dir()
        try:
            kw = {"trust_remote_code": spec.trust_remote_code, "local_files_only": not local or None}
            kw = {k: v for k, v in kw.items() if v is not None}
            tok = AutoTokenizer.from_pretrained(spec.source, **kw)
            mcfg = AutoConfig.from_pretrained(spec.source, **kw)
        except Exception:  # noqa: BLE001 - not readable offline: the stage's own loader reports it
            return None
        ctx = getattr(mcfg, "max_position_embeddings", None)
        if ctx is None:
            return None
    if cfg.sampling.engine == "vllm" and cfg.sampling.vllm.max_model_len:
        ctx = min(ctx, cfg.sampling.vllm.max_model_len)
    return tok, ctx, spec.source


def check_lengths(cfg: Config, task, tok, ctx: int, source: str) -> None:
    """Every prompt, plus the tokens sampled after it, must fit the model's context."""
    gen = max(cfg.sampling.max_new_tokens, cfg.eval.max_new_tokens or 0)
    splits = dict.fromkeys(s for ss in needed_splits(cfg).values() for s in ss)
    for split in splits:
        try:
            problems = task.problems(split)
        except KeyError:  # an optional split the task does not have (check_task has vetted the rest)
            continue
        if not problems:
            continue
        ids = encode(tok, problems, cfg.task.chat_template)
        n, i = max((len(x), i) for i, x in enumerate(ids))
        if n > ctx:
            raise TaskError(f"task: split '{split}' problem {problems[i].id} is {n} prompt tokens, longer than "
                            f"the context of {source} ({ctx})")
        if n + gen > ctx:
            raise TaskError(f"task: split '{split}' problem {problems[i].id}: {n} prompt tokens + max_new_tokens {gen} "
                            f"= {n + gen} exceeds the context of {source} ({ctx}); shorten sampling.max_new_tokens")


def check_representable(cfg: Config, task, tok, source: str) -> None:
    """Refuse text the tokenizer cannot represent: a prompt (template included) or a gold answer that would be
    turned into ``<unk>``. The models would train and be scored on a different problem than the data's (a
    lost '×' or 'π'), and an answer with such a character can never be produced: a wrong result, not a
    crash, so it is an error before any model loads; the fix is in the data or the tokenizer. Tokenizers
    without an unknown token (byte-level BPE: Qwen, Llama) represent every text and are not checked."""
    unk = getattr(tok, "unk_token_id", None)
    if unk is None or unk in (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id):
        return
    splits = dict.fromkeys(s for ss in needed_splits(cfg).values() for s in ss)
    for split in splits:
        try:
            problems = task.problems(split)
        except KeyError:
            continue
        bad = []
        for p in problems:
            for text in (p.prompt, p.answer) if p.answer else (p.prompt,):
                lost = _unknown(tok, text, unk)
                if lost:
                    bad.append((p, lost))
                    break
        if bad:
            p, lost = bad[0]
            chars = ", ".join(repr(c) for c in lost[:5]) + (", ..." if len(lost) > 5 else "")
            raise TaskError(f"task: split '{split}' problem {p.id}: the tokenizer of {source} cannot represent {chars} "
                            f"(it would become {tok.unk_token}; {len(bad)} of {len(problems)} problems in the split): "
                            "clean the data or use a tokenizer that covers it")


def _unknown(tok, text: str, unk: int) -> list[str]:
    """The distinct pieces of ``text`` that encode to the unknown token."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    else:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [c for c in dict.fromkeys(text) if unk in tok(c, add_special_tokens=False)["input_ids"]] if unk in ids else []
    return list(dict.fromkeys(pieces))


def eval_size_warnings(cfg: Config, task) -> list[str]:
    """``eval.problems`` is a cap on each evaluated split (the stages' ``eval`` and every ``eval.sets`` entry);
    a split with fewer problems is scored on all it has. A warning, not an error: one cap serves sets of
    different sizes (AIME 2024 has 30 problems, MATH-500 500), so a cap above a small set is normal, but the
    number the metrics average over must not be a surprise."""
    out = []
    for split in dict.fromkeys(["eval", *cfg.eval.sets]):
        try:
            n = len(task.problems(split))
        except KeyError:
            continue
        if n < cfg.eval.problems:
            out.append(f"eval.problems is {cfg.eval.problems} but split '{split}' has {n} problems: avg@{cfg.eval.samples} "
                       f"and pass@{cfg.eval.samples} there are over {n} problems")
    return out


def preflight(cfg: Config, allow_unavailable: bool = False) -> list[str]:
    """Everything about the task that can be checked without a model: the plugin imports, every split the
    stages read loads and is well formed, every prompt and answer is text the tokenizer represents (no
    ``<unk>``), every prompt fits the context, ``eval.problems`` against the evaluated splits (a warning).
    Raises TaskError; returns warnings.
    ``allow_unavailable`` (validate): data this machine cannot read (hub datasets offline) is a warning."""
    task, warnings = check_task(cfg, allow_unavailable)
    if any("not checked here" in w for w in warnings):
        return warnings
    warnings += eval_size_warnings(cfg, task)
    found = context_window(cfg)
    if found is None:
        return warnings + [f"prompt lengths not checked: the tokenizer/config of {cfg.models.student.source} "
                           "cannot be read here"]
    check_representable(cfg, task, found[0], found[2])
    check_lengths(cfg, task, *found)
    return warnings
