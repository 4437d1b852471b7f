"""docs/failures.md is the table of every bad input and fault the tests exercise, with the message a
user sees. The tests drive it: each test module lists its cases in ``BAD_INPUTS`` (and checks each
message); this test fails when the table and those lists differ.

    python -m tests.test_failure_table      # rewrite docs/failures.md from the tests' lists
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "failures.md"
SOURCES = {  # section title -> test module holding BAD_INPUTS
    "Search and trial flags and configs": "tests.test_bad_inputs",
    "EchoNet-Dynamic CSVs": "tests.test_echonet",
    "Shards and the node cache": "tests.test_shards",
    "Stalled object storage": "tests.test_storage_faults",
    "Untrusted files and diverging training": "tests.test_safety",
    "Kills, lost heads and other Ray instances": "tests.test_resume",
}
HEADER = """# Bad inputs and faults

Every row is exercised by a test (the module named in each section); the message is what the user
sees (stderr, a warning, or the resumed search's output). Faults marked in the last section end with
no trial lost and none counted twice. Regenerate with `python -m tests.test_failure_table`.
"""


def cases() -> dict[str, list[tuple[str, str]]]:
    return {title: list(importlib.import_module(mod).BAD_INPUTS) for title, mod in SOURCES.items()}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    out = [HEADER]
    for title, rows in cases().items():
        out += [f"## {title}", "", f"Tested in `{SOURCES[title].replace('.', '/')}.py`.", "",
                "| input or fault | what the user sees |", "|---|---|"]
        out += [f"| {cell(what)} | `{cell(message)}` |" for what, message in rows]
        out.append("")
    return "\n".join(out)


def test_the_failure_table_lists_exactly_the_tested_cases():
    assert DOC.is_file(), "docs/failures.md is missing: run python -m tests.test_failure_table"
    assert DOC.read_text() == render(), "docs/failures.md is stale: run python -m tests.test_failure_table"
    total = sum(len(rows) for rows in cases().values())
    assert total >= 60  # the hostile-user review tried 62 bad inputs and four faults


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC} ({sum(len(r) for r in cases().values())} cases)", file=sys.stderr)
