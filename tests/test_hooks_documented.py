"""Every hook is documented under a heading that matches its signature (in the hook reference,
``docs/plugins/hooks.md``), and exercised by a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from layerscope.host import hookspecs

REPO = Path(__file__).resolve().parents[1]
HOOK_REFERENCE = REPO / "docs" / "plugins" / "hooks.md"
HOOKS = [(name, f) for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "layerscope_spec")]


def test_there_are_hooks():
    assert {name for name, _ in HOOKS} >= {
        "register_estimators",
        "register_adapters",
        "register_data_sources",
        "register_reporters",
        "before_run",
        "after_batch",
        "after_run",
        "on_run_error",
    }


@pytest.mark.parametrize("name, function", HOOKS)
def test_hook_is_documented_with_its_signature(name, function):
    signature = f"{name}({', '.join(inspect.signature(function).parameters)})"
    headings = re.findall(r"^#+ `([^`]+)`$", HOOK_REFERENCE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert signature in headings, f"{HOOK_REFERENCE.relative_to(REPO)} has no heading `{signature}`"


@pytest.mark.parametrize("name, function", HOOKS)
def test_hook_is_exercised_by_a_test(name, function):
    tests = [p for p in (REPO / "tests").rglob("test_*.py") if p.name != Path(__file__).name]
    assert any(re.search(rf"\b{name}\b", p.read_text()) for p in tests), f"no test uses the hook {name}"
