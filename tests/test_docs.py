"""The documentation site: every config key is documented, and the site builds in strict mode.

    python -m pytest tests/test_docs.py -q

The build (``mkdocs build --strict``, what ``make docs`` runs) fails on a broken link or anchor and on a
page missing from the nav; it is skipped only where mkdocs is not installed (the ``docs`` extra).
"""

from __future__ import annotations

import html
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("s2d_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def test_every_config_field_has_a_description():
    missing = hooks.fields_without_description()
    assert not missing, f"add Field(..., description=...) in stages/config.py for: {', '.join(missing)}"


def test_the_reference_walks_into_every_nested_section():
    from stages.config import Config

    paths = {k.path for k in hooks.walk(Config)}
    # a section of a section, a model inside a dict, a model inside an optional
    assert {"teacher_rl.optim.lr", "task.data.<name>.path", "models.student.arch.heads", "sampling.vllm.max_model_len"} <= paths
    assert all(not p.endswith(".") for p in paths)


def test_site_builds_strict_with_generated_reference(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    from stages.cli import COMMANDS
    from stages.config import PRESETS, Config

    config = (site / "reference" / "config.html").read_text()
    missing = [k.path for k in hooks.walk(Config) if f"<code>{html.escape(k.path)}</code>" not in config]
    assert not missing, f"keys missing from the configuration reference: {missing}"
    assert all(f"preset-{p.stem}" in config for p in PRESETS.glob("*.yaml"))
    cli = (site / "reference" / "cli.html").read_text()
    assert "usage: python -m stages" in cli
    assert all(f"<code>{c}</code>" in cli for c in COMMANDS)
