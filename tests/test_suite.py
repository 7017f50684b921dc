"""The suite's own bookkeeping: every entry of the end-to-end tier names a test that exists."""

from pathlib import Path

from conftest import HEAVY

REPO = Path(__file__).resolve().parents[1]


def test_every_heavy_entry_names_an_existing_file_or_test():
    for node in HEAVY:
        path, _, name = node.partition("::")
        assert (REPO / path).is_file(), node
        assert not name or f"def {name}(" in (REPO / path).read_text(), node
