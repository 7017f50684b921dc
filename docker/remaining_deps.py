"""Print the package's requirements (pyproject.toml) without the ones another installer owns.

    python docker/remaining_deps.py torch transformers tokenizers > /tmp/rest.txt

docker/vllm.Dockerfile uses it: vLLM pins its own torch and transformers, so the stage package goes
in with ``--no-deps`` and only these remaining requirements are installed next to vLLM.
"""

import re
import sys
import tomllib
from pathlib import Path


def remaining(pyproject: Path, owned: set[str]) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    name = lambda req: re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    return [d for d in deps if name(d) not in owned]


if __name__ == "__main__":
    owned = {a.lower() for a in sys.argv[1:]}
    print("\n".join(remaining(Path(__file__).resolve().parents[1] / "pyproject.toml", owned)))
