from __future__ import annotations

import pytest

from tests.helpers.albert_release import train_spm


@pytest.fixture(scope="session")
def albert_spm(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))
