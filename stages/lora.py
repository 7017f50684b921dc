"""LoRA adapters (PEFT) on the models of any stage: ``models.<role>.lora`` (docs/lora.md).

A stage that trains a role whose ``lora`` is set trains an adapter on its input model: the base is loaded
once and frozen, PEFT injects the adapter's layers into it in place (the model object the stage holds is
still the Hugging Face model, so every engine, loss and hook works on it unchanged), the optimizer sees
only the adapter's weights, and the resume states hold only them.

A published adapter is a folder (``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer)
plus an ``adapters`` entry in its stage's manifest naming its base: the base's URI and the digest of the
manifest that published it (a content digest for a plain folder). Any stage accepts such a folder as an
input: the base is loaded (recursively: a base may itself be an adapter), its digest checked against the
record, and the adapter applied; nobody merges by hand. With ``publish_merged`` the stage also publishes
the merged full checkpoint as its ``merged`` output.

How an adapter input meets a stage:

- a frozen role (the teacher of 2a/2b, evaluation): base + adapter, merged in memory (vLLM engines load
  the base and the adapter instead, see :func:`source_of`);
- a trained role whose ``lora`` has the adapter's structure (r, alpha, target modules): the adapter is
  trained further on the same base, so a student's 2a -> 2b -> 3 chain stays one adapter on one base;
- a trained role with another ``lora``: the input adapter is merged and a new adapter trained on the
  result (its base is then the input adapter, a chain the loader follows);
- a trained role without ``lora``: merged, full weights trained.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import artifacts, storage
from .config import InputError, LoraSpec

log = logging.getLogger("stages")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED = "merged"  # the output name of the merged checkpoint


class AdapterInputError(InputError):
    """An adapter input that cannot be used as given (its base changed, its base is missing, bad targets)."""


@dataclass
class Adapter:
    """What a model carries while it trains an adapter (``model._s2d_adapter``)."""

    peft: object  # the PeftModel wrapper: saving and merging go through it
    spec: LoraSpec
    base_uri: str  # the base checkpoint the adapter applies to
    base_digest: str
    base_path: str | None  # a local folder holding the base weights (vLLM loads it); None: merged in memory
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter weights at the start (GRPO's reference)
    continued_from: str | None = None  # the adapter input trained further, if any


def adapter_of(model) -> Adapter | None:
    return model.__dict__.get("_s2d_adapter")


def source_of(model) -> dict | None:
    """``{"base": folder, "adapter": folder}`` for a frozen model loaded as base + adapter (merged in memory):
    what a vLLM engine loads instead of the merged weights."""
    return model.__dict__.get("_s2d_lora_source")


def _tag(model, name: str, value) -> None:
    object.__setattr__(model, name, value)  # not a submodule: nn.Module's __setattr__ would register a PeftModel


# ---------------------------------------------------------------- adapter artifacts


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(str(path).removeprefix("file://")) / ADAPTER_CONFIG).exists()


def adapter_entry(uri: str) -> dict | None:
    """The manifest's ``adapters`` entry of a published output (None for a full checkpoint or an unpublished folder)."""
    if storage.uri_kind(uri) == "hub":
        return None
    found = artifacts.find_manifest(uri)
    if found is None:
        return None
    stage_uri, manifest = found
    name = uri.rstrip("/")[len(stage_uri) :].strip("/")
    entry = (manifest.get("adapters") or {}).get(name)
    return {**entry, "uri": uri.rstrip("/"), "digest": artifacts.manifest_digest(stage_uri)} if entry else None


def base_digest(uri: str) -> str:
    """The identity of a base checkpoint: the digest of the manifest that published it; for a plain local
    folder, a digest of its files' contents; for a hub id, the id (not verifiable)."""
    if storage.uri_kind(uri) == "hub":
        return f"hub:{uri}"
    found = artifacts.find_manifest(uri)
    if found is not None:
        return artifacts.manifest_digest(found[0])
    path = Path(uri.removeprefix("file://"))
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}:{storage.sha256_file(f)}\n".encode())
        return "files:" + h.hexdigest()[:16]
    return f"external:{uri}"


def check_adapter_base(entry: dict, role: str, base_override: str | None = None) -> str:
    """The base URI to load an adapter input on, after checking its digest against the adapter's record.
    Raises :class:`AdapterInputError` (one line) when the base is missing or is not the one it was trained on."""
    recorded = entry["base"]
    base = base_override or recorded["uri"]
    if storage.uri_kind(base) == "local" and not Path(base.removeprefix("file://")).exists():
        raise AdapterInputError(f"{role} {entry['uri']}: an adapter whose base {base} does not exist "
                                f"(set models.{role}.adapter_base to where it lives now)")
    if recorded["digest"].startswith("hub:"):
        return base
    try:
        have = base_digest(base)
    except storage.ArtifactError as e:
        raise AdapterInputError(f"{role} {entry['uri']}: its base {base} is unreadable: {e}") from None
    if have != recorded["digest"]:
        raise AdapterInputError(f"{role} {entry['uri']}: an adapter trained on base digest {recorded['digest']}, "
                                f"but the base at {base} has digest {have} (republished or another model); "
                                f"pass the base it was trained on (models.{role}.adapter_base)")
    return base


def check_targets(spec: LoraSpec, model_path: str, role: str, trust_remote_code: bool = False) -> None:
    """Before any weight loads: every ``target_modules`` name matches a module of the model (built on the
    meta device from its config). Raises :class:`AdapterInputError`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.target_modules == ["all-linear"]:
        return
    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = [t for t in spec.target_modules if t not in names and not any(n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise AdapterInputError(f"models.{role}.lora.target_modules: {missing} not in the {role} model "
                                f"({cfg.model_type}); its linear modules: {linear}")


# ---------------------------------------------------------------- making and loading adapters


def peft_config(spec: LoraSpec, base_uri: str):
    from peft import LoraConfig

    targets = "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_uri)


def attach_new(model, spec: LoraSpec, role: str, base_uri: str, digest: str, base_path: str | None, seed: int = 0):
    """Inject a fresh adapter (its B matrices zero: the model computes what the base does) and freeze the base.
    Its A matrices are drawn from ``seed`` (not the global generator): a rerun starts from the same adapter."""
    from peft import get_peft_model

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pm = get_peft_model(model, peft_config(spec, base_uri))
    except ValueError as e:
        raise AdapterInputError(f"models.{role}.lora: {' '.join(str(e).split())[:300]}") from None
    _finish(model, pm, spec, base_uri, digest, base_path)
    return model


def attach_trained(model, adapter_path: Path, trainable: bool):
    """Apply a published adapter to ``model`` in place; returns the PeftModel wrapper."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable)


def _finish(model, pm, spec, base_uri, digest, base_path, continued_from=None) -> None:
    params = dict(model.named_parameters())  # names as the model the stage holds has them (not the wrapper's)
    initial = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    _tag(model, "_s2d_adapter", Adapter(pm, spec, base_uri, digest, base_path, initial, continued_from))
    n = sum(p.numel() for p in initial.values())
    log.info("LoRA r=%d on %s: %d trainable of %d parameters (%.2f%%)", spec.r, base_uri, n,
             sum(p.numel() for p in params.values()), 100 * n / max(1, sum(p.numel() for p in params.values())))


def merge_in_place(model, pm) -> None:
    """Fold the adapter into the base weights of ``model`` and remove the adapter layers (in place)."""
    pm.merge_and_unload()
    model.__dict__.pop("_s2d_adapter", None)
    model.requires_grad_(True)  # as a plain checkpoint loads


def load(run, uri: str, role: str, load_full, trained: bool):
    """(model, tokenizer) for an input URI that is a published adapter, else None. ``load_full(uri, role,
    trained=False)`` loads its base (which may itself be an adapter: this recurses through it); ``trained``:
    whether this stage trains the role."""
    entry = adapter_entry(uri)
    if entry is None:
        return None
    spec_role = getattr(run.cfg.models, role, None)
    base_uri = check_adapter_base(entry, role, spec_role.adapter_base if spec_role else None)
    model, tok = load_full(base_uri, role, trained=False)
    path = artifacts.fetch(uri)
    lora = spec_role.lora if spec_role else None
    # a folder of the base weights for vLLM engines: the base's own, or (a base merged in memory) saved here
    base_path = None if source_of(model) or model.__dict__.get("_s2d_merged") else _local_folder(base_uri)
    if base_path is None and run.cfg.sampling.engine == "vllm":
        from . import models

        base_path = str(run.work / "merged-base" / role)
        models.save(model, tok, base_path)
    if trained and lora is not None and entry.get("lora") == lora.structure():
        pm = attach_trained(model, path, trainable=True)  # trained further on the same base
        _finish(model, pm, lora, base_uri, entry["base"]["digest"], base_path, continued_from=uri)
        return model, tok
    pm = attach_trained(model, path, trainable=False)
    merge_in_place(model, pm)
    if trained and lora is not None:  # a new adapter on (base + input adapter): its base is the input adapter
        folder = None
        if run.cfg.sampling.engine == "vllm":  # vLLM loads the merged base from a folder
            from . import models

            folder = str(run.work / "merged-base" / f"{role}-input")
            models.save(model, tok, folder)
        return attach_new(model, lora, role, uri, entry["digest"], folder, run.lora_seed(role)), tok
    _tag(model, "_s2d_merged", True)
    # what a vLLM engine loads for this frozen model (a source the base carried is not this model's)
    _tag(model, "_s2d_lora_source", {"base": base_path, "adapter": str(path), "name": f"s2d-{entry['digest']}",
                                     "r": entry["lora"]["r"]} if not trained and base_path is not None else None)
    model.requires_grad_(trained)
    return model, tok


def _local_folder(uri: str) -> str | None:
    if storage.uri_kind(uri) == "hub":
        return uri  # vLLM resolves hub ids itself
    found = artifacts.find_manifest(uri)
    return str(artifacts.fetch(uri)) if found else uri.removeprefix("file://")


# ---------------------------------------------------------------- training state, reference policy


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The adapter's weights by parameter name (what a resume state holds)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params))[:3], sorted(set(params) - set(state))[:3]
        raise ValueError(f"adapter state does not fit this model (unexpected {extra}, missing {missing})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(f"adapter tensor {n}: {tuple(state[n].shape)}, the model has {tuple(p.shape)}")
            p.copy_(state[n].to(p.device, p.dtype))


class Reference:
    """The initial policy of a LoRA-trained model without a second copy of the base: the adapter's initial
    weights are swapped in for the block (a fresh adapter's are the base itself)."""

    def __init__(self, model):
        self.model, self.adapter = model, adapter_of(model)

    def __enter__(self):
        self.saved = trainable_state(self.model)
        self.saved = {n: t.clone() for n, t in self.saved.items()}
        load_trainable_state(self.model, self.adapter.initial)
        return self.model

    def __exit__(self, *exc):
        load_trainable_state(self.model, self.saved)


# ---------------------------------------------------------------- publishing


def save_adapter(model, tokenizer, path: Path) -> int:
    """The adapter folder (config, weights, and the tokenizer unless None); returns the weights' size in bytes."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    a = adapter_of(model)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(a.peft).items()}
    save_file(state, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    a.peft.peft_config["default"].save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return (path / ADAPTER_WEIGHTS).stat().st_size


def publish_outputs(model, tokenizer, out: Path, name: str, save_full) -> tuple[dict, dict]:
    """Write a LoRA-trained model's outputs under ``out``: the adapter as ``name`` and, with ``publish_merged``,
    the merged checkpoint as ``merged`` (the model is merged in place: call last). Returns (extra outputs
    name -> folder, the manifest's ``adapters`` entry for ``name``)."""
    import time

    a = adapter_of(model)
    t0 = time.perf_counter()
    size = save_adapter(model, tokenizer, out / name)
    entry = {"base": {"uri": a.base_uri, "digest": a.base_digest}, "lora": a.spec.structure(),
             "dropout": a.spec.dropout, "adapter_bytes": size, "adapter_save_s": round(time.perf_counter() - t0, 3),
             "trainable_params": sum(t.numel() for t in a.initial.values()), "continued_from": a.continued_from,
             "merged": None}
    extra = {}
    if a.spec.publish_merged:
        t0 = time.perf_counter()
        merge_in_place(model, a.peft)
        save_full(model, tokenizer, out / MERGED)
        entry["merged"] = MERGED
        entry["merged_save_s"] = round(time.perf_counter() - t0, 3)
        extra[MERGED] = MERGED
    return extra, entry


def clear(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def preflight(cfg, stage: str, role: str, uri: str) -> None:
    """Before any model loads (``python -m stages <stage>``): an adapter input's base is there with the digest it
    was trained on, and a role the stage trains with ``lora`` has every target module. One-line errors."""
    from .registry import STAGES

    role = {"base_student": "student", "final_student": "student"}.get(role, role)
    spec = getattr(cfg.models, role, None)
    entry = adapter_entry(uri)
    while entry is not None:  # down the chain to the full checkpoint at its root
        uri = check_adapter_base(entry, role, spec.adapter_base if spec else None)
        entry = adapter_entry(uri)
    st = STAGES.get(stage.split("/")[0])
    if spec is None or spec.lora is None or st is None or st.trains != role:
        return
    path = uri
    if storage.uri_kind(uri) != "hub" and artifacts.find_manifest(uri) is not None:
        path = str(artifacts.fetch(uri, only=lambda rel: rel.rsplit("/", 1)[-1] == "config.json"))
    check_targets(spec.lora, path.removeprefix("file://"), role, spec.trust_remote_code)
