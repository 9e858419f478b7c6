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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and stay fast on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
