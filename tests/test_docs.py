"""The README's settings reference is generated from the dataclasses and must be current.

Regenerate it with ``make readme`` (``UPDATE_README=1 pytest tests/test_docs.py``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from volseg_dask.config import settings_reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- settings-reference:start -->\n)(.*?)(<!-- settings-reference:end -->)", re.S)


def test_settings_reference_is_current():
    text = README.read_text()
    assert BLOCK.search(text), "README.md lost its settings-reference markers"
    expected = BLOCK.sub(lambda m: m.group(1) + settings_reference_markdown() + "\n" + m.group(3), text)
    if os.environ.get("UPDATE_README") == "1":
        README.write_text(expected)
    assert text == expected, "README.md settings reference is stale: run `make readme`"


def test_readme_quick_start_has_the_two_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", quick, re.M)
    assert commands == ["make demo", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
