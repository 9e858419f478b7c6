"""enc.models.hugepages: decode weights copied onto huge-page memory keep every byte; Mistral's prepared
plain weights give the same logits with and without it."""

from __future__ import annotations

import pytest
import torch

from enc.models import hugepages


def _vma_flags(addr: int) -> list[str]:
    """VmFlags of the mapping in /proc/self/smaps that holds ``addr``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return []


def test_copy_and_cat_keep_every_byte(monkeypatch):
    monkeypatch.setenv("ENC_HUGEPAGES", "1")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1100, generator=g)  # 4.3 MiB: above the 4 MiB minimum
    c = hugepages.copy(w)
    assert torch.equal(c, w) and c.is_contiguous()
    assert (c.data_ptr() != w.data_ptr()) == hugepages.available()
    parts = [torch.randn(700, 1100, generator=g), torch.randn(300, 1100, generator=g), w]
    got = hugepages.cat(parts)
    assert got.is_contiguous() and torch.equal(got, torch.cat(parts, 0))
    bf = [p.to(torch.bfloat16) for p in parts]
    assert torch.equal(hugepages.cat(bf), torch.cat(bf, 0))
    small = torch.randn(10, 10, generator=g)
    assert hugepages.copy(small) is small  # not worth a copy
    assert torch.equal(hugepages.cat([small, small]), torch.cat([small, small]))


@pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")
def test_memory_is_advised_for_huge_pages(monkeypatch):
    monkeypatch.setenv("ENC_HUGEPAGES", "1")
    t = hugepages.empty((3 << 20,), torch.float32)  # 12 MiB
    mid = t.data_ptr() + t.numel() * 2  # inside the 2 MiB-aligned interior
    flags = _vma_flags(mid)
    assert "hg" in flags and "nh" not in flags  # MADV_HUGEPAGE on the mapping that holds the tensor


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("ENC_HUGEPAGES", "0")
    w = torch.randn(1024, 1100)
    assert not hugepages.available() and hugepages.copy(w) is w


def test_mistral_plain_weights_on_huge_pages_give_the_same_logits(monkeypatch, tmp_path):
    from enc.models import rowsplit
    from enc.models.mistral import from_pretrained
    from tests.helpers.mistral_writer import tiny_hf

    tiny_hf(vocab=300, seed=7).save_pretrained(tmp_path)
    monkeypatch.setattr(hugepages, "_MIN_BYTES", 0)  # tiny weights: place them all
    on = from_pretrained(tmp_path)
    monkeypatch.setenv("ENC_HUGEPAGES", "0")
    off = from_pretrained(tmp_path)
    a, b = on.model.layers[0].mlp.gate_up.weight, off.model.layers[0].mlp.gate_up.weight
    assert torch.equal(a, b) and a.is_contiguous()
    assert torch.equal(on.lm_fast.weight, off.lm_fast.weight)
    ids = torch.tensor([[1, 17, 250, 3, 99, 42]])
    with torch.inference_mode():
        assert torch.equal(on(ids), off(ids))
        monkeypatch.setattr(rowsplit, "_helper_wanted", lambda: True)
        with rowsplit.decode_threads():
            c1, c2 = on.new_cache(1, 8), off.new_cache(1, 8)
            on(ids, cache=c1, pos=0), off(ids, cache=c2, pos=0)
            step = torch.tensor([[5]])
            assert torch.equal(on(step, cache=c1, pos=6), off(step, cache=c2, pos=6))
