"""safe_torch_load refuses code payloads in any pickle protocol without running them."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from enc.errors import CorruptCheckpoint, UnsafeInput
from enc.io.torch_pickle import safe_torch_load


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_payload_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "payload_ran"
    f = tmp_path / f"evil{protocol}.pt"
    with open(f, "wb") as fh:
        pickle.dump({"weight": Payload(str(marker))}, fh, protocol=protocol)
    with pytest.raises(UnsafeInput, match="refusing to load") as e:
        safe_torch_load(f)
    assert str(f) in e.value.one_line()
    assert not marker.exists()


def test_plain_state_dict_loads_and_truncation_is_corrupt(tmp_path):
    f = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(6.0).view(2, 3)}, f)
    assert torch.equal(safe_torch_load(f)["w"], torch.arange(6.0).view(2, 3))
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CorruptCheckpoint):
        safe_torch_load(bad)
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(b"\x80\x02}q\x00(X\x01\x00")
    with pytest.raises(CorruptCheckpoint):
        safe_torch_load(legacy)
