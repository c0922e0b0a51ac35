"""Every ```python block in docs/*.md runs; docs/api.md is what docs/gen_api.py writes.

Blocks of one page share a namespace and run in order, so a later block may use names
from an earlier one. A failure names the page and the block number (from 1).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import traceback

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
PAGES = sorted(DOCS.glob("*.md"))


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def test_fence_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x\n"]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    # Anything an example writes by accident lands in a temporary folder.
    monkeypatch.chdir(tmp_path)
    if "MPLBACKEND" not in os.environ:
        monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(blocks, 1):
        code = compile(block, f"docs/{page.name} (python block {i})", "exec")
        try:
            exec(code, namespace)  # our own docs, not user input
        except BaseException as exc:  # noqa: BLE001 - report which block, then fail
            pytest.fail(
                f"docs/{page.name}, python block {i} of {len(blocks)} raised "
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}\n--- block ---\n{block}"
            )


def test_api_md_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    committed = (DOCS / "api.md").read_text(encoding="utf-8")
    assert gen_api.render() == committed, "docs/api.md is stale: run `python docs/gen_api.py`"


def test_nav_lists_every_page():
    nav = (DOCS.parent / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert re.search(rf":\s*{re.escape(page.name)}\s*$", nav, re.M), f"{page.name} is not in mkdocs.yml's nav"
