from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def glue_dir() -> Path:
    return FIXTURES / "glue"


@pytest.fixture
def squad_dir() -> Path:
    return FIXTURES / "squad"
