"""Shared fixtures: an isolated model cache and small real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """Demo models are trained once per test session into a private cache."""
    if "LAYERSCOPE_CACHE" not in os.environ:
        os.environ["LAYERSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def repo() -> Path:
    return REPO
