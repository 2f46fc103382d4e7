"""Shared fixtures. Tests read the real datasets from ../shared/data (next to the project root) or
from $PRMKD_SHARED_DATA; they never use copies committed to the repository."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    env = os.environ.get("PRMKD_SHARED_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "ml-latest-small" / "ratings.csv").exists():
        pytest.fail(f"shared datasets not found at {root} (set PRMKD_SHARED_DATA)")
    return root
