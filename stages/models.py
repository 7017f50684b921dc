"""Models and tokenizers: Hugging Face checkpoint folders in and out, the tiny Qwen3 factory,
and the teacher/student compatibility check."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .config import InputError, ModelSpec, TinyArch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(i) for i in range(32, 127)]
TINY_CONTEXT = 256  # positions of the tiny models (prompt + completion)


class ModelInputError(InputError):
    """A model input that cannot be loaded; the message names the role and the path or hub id."""


class TokenizerMismatch(InputError):
    """Teacher and student do not share a tokenizer; per-token rewards would compare different tokens (a user
    error: one line, exit 2; found from the tokenizer files before any model loads, see :func:`read_tokenizer`)."""


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer (printable ASCII + newline) as a real HF fast tokenizer."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_qwen3(arch: TinyArch, tokenizer, seed: int) -> Qwen3ForCausalLM:
    """Random-init Qwen3-architecture model (same code path as the real Qwen3 checkpoints)."""
    cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.hidden_size // arch.heads,
        max_position_embeddings=TINY_CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def check_source(uri: str, role: str, spec: ModelSpec | None = None) -> None:
    """Before anything loads: a local folder (no manifest) holds a readable model config, and a hub id
    is reachable (in the local cache when the hub is offline). Raises :class:`ModelInputError`."""
    from huggingface_hub import is_offline_mode
    from transformers import AutoConfig

    path = Path(uri.removeprefix("file://"))
    if "://" in uri and not uri.startswith("file://"):
        raise ModelInputError(f"{role} {uri}: not a published artifact (no manifest.json here or one level up) "
                              "and not a local folder or hub id")
    if path.exists():
        if (path / "model" / "config.json").exists() and not (path / "config.json").exists():
            raise ModelInputError(f"{role} {uri}: a stage folder; pass its model folder {path / 'model'}")
        if not (path / "config.json").exists():
            raise ModelInputError(f"{role} {uri}: no config.json: not a Hugging Face checkpoint folder")
    elif is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(uri, "config.json"), str):
            raise ModelInputError(f"{role}: hub id '{uri}' is not in the local cache and the hub is offline "
                                  "(HF_HUB_OFFLINE); download it first or pass a local folder")
    try:
        AutoConfig.from_pretrained(str(path) if path.exists() else uri, trust_remote_code=bool(spec and spec.trust_remote_code))
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, its own dataclass errors
        raise ModelInputError(f"{role} {uri}: not a loadable model config: {_one_line(e)}") from None


def load(path: str | Path, spec: ModelSpec | None = None, dtype: str = "float32", role: str = "model"):
    """Load (model, tokenizer) from a local HF folder or a hub id; any failure names the role and path."""
    if "://" in str(path):  # an unpublished s3:// input must not be handed to the hub loader as an id
        raise ModelInputError(f"{role} {path}: not published (no manifest.json here or one level up)")
    trust = bool(spec and spec.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 - see check_source
        raise ModelInputError(f"{role} {path}: cannot load: {_one_line(e)}") from None
    return model, tok


def save(model, tokenizer, path: str | Path) -> None:
    """Save as a from_pretrained-loadable folder (safetensors + config + tokenizer)."""
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def read_tokenizer(uri: str, spec: ModelSpec | None = None):
    """(tokenizer, output-vocabulary rows from config.json) of a checkpoint WITHOUT its weights: a published
    artifact (only its non-weight files are fetched, checksums verified), a local folder, or a hub id in the
    local cache. None when it cannot be read here (the stage's own loader reports why)."""
    from transformers import AutoConfig

    from . import artifacts, storage

    try:
        kind = storage.uri_kind(uri)
        if kind in ("registry", "unsupported"):
            return None
        found = artifacts.find_manifest(uri) if kind != "hub" else None
        if found:
            path = str(artifacts.fetch(uri, only=lambda rel: not rel.endswith(WEIGHTS)))
        elif kind == "s3":
            return None
        else:
            path = uri.removeprefix("file://")
        trust = bool(spec and spec.trust_remote_code)
        kw = {"trust_remote_code": trust, **({"local_files_only": True} if kind == "hub" else {})}
        tok = AutoTokenizer.from_pretrained(path, **kw)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        mcfg = AutoConfig.from_pretrained(path, **kw)
        rows = getattr(mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg, "vocab_size", None)
        return tok, rows
    except Exception:  # noqa: BLE001 - unreadable here: not a verdict; the loader names the problem later
        return None


def check_compatible(teacher_tok, student_tok, teacher_model=None, student_model=None,
                     vocab_rows: tuple[int | None, int | None] | None = None, names: tuple[str, str] | None = None) -> None:
    """Fail loudly unless both sides tokenize identically and index the same vocabulary (``vocab_rows``: the
    output rows from each config.json, when checking before the models load; ``names``: the checkpoints)."""
    problems = []
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        problems.append(f"vocabularies differ ({len(tv)} vs {len(sv)} entries, {diff} differing token->id pairs)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            problems.append(f"{name}: teacher {getattr(teacher_tok, name)} vs student {getattr(student_tok, name)}")
    if getattr(teacher_tok, "chat_template", None) != getattr(student_tok, "chat_template", None):
        problems.append("chat templates differ")
    if teacher_model is not None and student_model is not None:
        t_rows = teacher_model.get_output_embeddings().weight.shape[0]
        s_rows = student_model.get_output_embeddings().weight.shape[0]
        if t_rows != s_rows:
            problems.append(f"output vocab sizes differ: teacher {t_rows} vs student {s_rows}")
    elif vocab_rows is not None and None not in vocab_rows and vocab_rows[0] != vocab_rows[1]:
        problems.append(f"output vocab sizes (config.json vocab_size) differ: teacher {vocab_rows[0]} vs student {vocab_rows[1]}")
    if problems:
        which = f" ({names[0]} vs {names[1]})" if names else ""
        raise TokenizerMismatch(f"teacher and student must share one tokenizer{which}: " + "; ".join(problems))
