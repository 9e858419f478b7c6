"""The numpy float32 reference of Mistral / Mixtral parity (converters/mistral_reference_np.py).

It must compute what the torch reference (converters/mistral_reference.py) computes, up to float32
rounding, on every layout the converter reads (bf16/fp16/fp32, tied output, sliding window, stacked
or split experts, tensor-parallel shards), check the source's CRCs as strictly, and draw the probes
make_probes draws without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import enc.converters.mistral_reference_np as rnp
from enc.converters.base import ConvertOptions
from enc.converters.mistral import MistralConverter, _one_thread_while
from enc.converters.mistral_reference import reference_forward
from enc.errors import CorruptCheckpoint
from enc.parity import make_probes
from enc.parity_weights import ChecksumsAhead
from tests.helpers.mistral_writer import tiny_hf, write_release

pytest.importorskip("transformers")


@pytest.mark.parametrize("vocab,max_len,low,bos,seed", [(32000, 32768, 3, 1, 0), (512, 512, 3, 1, 0),
                                                        (512, 10, 3, 1, 0), (4, 64, 3, None, 7),
                                                        (2**24 + 3, 100, 3, 2, 3)])
def test_probe_arrays_are_make_probes(vocab, max_len, low, bos, seed):
    want = make_probes(vocab, max_len, low=low, bos_id=bos, seed=seed)[0]
    ids, mask = rnp.probe_arrays(vocab, max_len, low=low, bos_id=bos, seed=seed)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert np.array_equal(ids, want.input_ids.numpy())
    assert np.array_equal(mask, want.attention_mask.numpy())


def test_probe_arrays_leave_wide_token_ranges_to_torch():
    assert rnp.probe_arrays(2**24 + 4, 100, low=3) is None


def _release(tmp_path: Path, name: str, **kw) -> Path:
    moe = kw.pop("moe", False)
    tied = kw.pop("tied", False)
    window = kw.pop("sliding_window", None)
    model = (tiny_hf(moe=True, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, inter=48, experts=4, top_k=2,
                     vocab=300, rope_theta=1e6) if moe else
             tiny_hf(vocab=300, tied=tied, sliding_window=window))
    return write_release(tmp_path / name, model, tokenizer=None, **kw)


def _both(src: Path) -> tuple[list, list]:
    conv = MistralConverter(src, ConvertOptions())
    probe = conv.probes()[0]
    ref = conv.reference_tensors()
    with torch.inference_mode():
        want = list(reference_forward(ref, conv.params, conv.tied, probe))
    run = rnp.ReferenceRun(ref, conv.params, conv.tied, probe.input_ids.numpy(), probe.attention_mask.numpy())
    got = list(run)
    run.close()
    return want, got


CASES = {
    "bf16": dict(dtype=torch.bfloat16),
    "bf16-window": dict(dtype=torch.bfloat16, sliding_window=7),  # shorter than the 48-token probe
    "fp16": dict(dtype=torch.float16),
    "fp32-tied": dict(dtype=torch.float32, tied=True),
    "bf16-tp2": dict(dtype=torch.bfloat16, tp=2),  # joined shards: no byte recipe, the ordinary load
    "mixtral-bf16": dict(moe=True, dtype=torch.bfloat16),
    "mixtral-stacked": dict(moe=True, dtype=torch.bfloat16, stacked_moe=True),  # expert rows (transposed) of one tensor
    "mixtral-fp32": dict(moe=True, dtype=torch.float32),
}


@pytest.mark.parametrize("case", CASES)
def test_numpy_reference_is_the_torch_reference(tmp_path, monkeypatch, case):
    monkeypatch.setattr(rnp, "BLOCK", 700)  # many blocks per weight, shared by two workers, short last ones
    monkeypatch.setattr(rnp, "WORKERS", 2)
    want, got = _both(_release(tmp_path, case, **CASES[case]))
    assert [a.name for a in want] == [g[0] for g in got]
    for a, (name, kind, t, topk, base) in zip(want, got, strict=True):
        assert (kind, base) == (a.kind, a.base), name
        assert t.dtype == np.float32 and t.shape == tuple(a.tensor.shape), name
        ref = a.tensor.numpy()
        scale = np.abs(ref).max()
        assert scale > 0 and np.abs(t - ref).max() <= 1e-6 * scale, (name, np.abs(t - ref).max() / scale)
        if kind == "router":  # Mixtral: the same experts per token (as sets; near ties are not in these fixtures)
            valid = a.mask.numpy()
            assert topk.dtype == np.int64
            assert np.array_equal(np.sort(topk[valid], 1), np.sort(a.topk.numpy()[valid], 1)), name
        else:
            assert topk is None
    if CASES[case].get("moe"):
        assert any(g[1] == "router" for g in got)


def _flip(raw) -> None:
    """Flip one byte in the middle of a tensor's bytes in its file (its zip CRC no longer matches)."""
    with open(raw.path, "r+b") as f:
        f.seek(raw.offset + raw.nbytes // 2)
        b = f.read(1)
        f.seek(raw.offset + raw.nbytes // 2)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("ahead", [False, True])
def test_a_flipped_byte_stops_the_run_before_anything_computed_from_it(tmp_path, ahead):
    src = _release(tmp_path, "src", dtype=torch.bfloat16)
    conv = MistralConverter(src, ConvertOptions())
    ref = conv.reference_tensors()
    _flip(ref["layers.1.feed_forward.w2.weight"].raw)
    probe = conv.probes()[0]
    checks = ChecksumsAhead(list(ref.values())) if ahead else None
    run = rnp.ReferenceRun(ref, conv.params, conv.tied, probe.input_ids.numpy(), probe.attention_mask.numpy(),
                           checks)
    names = []
    with pytest.raises(CorruptCheckpoint, match="CRC mismatch") as e:
        for item in run:
            names.append(item[0])
    run.close()
    if checks is not None:
        checks.close()
    assert "consolidated.00.pth" in str(e.value)
    assert names == ["embeddings", "layer.0"]  # layer.1 uses the corrupt weight: neither it nor later rows


def test_other_probes_are_recomputed_not_reused(tmp_path):
    src = _release(tmp_path, "src", dtype=torch.bfloat16)
    conv = MistralConverter(src, ConvertOptions())
    conv.verify_ahead()  # a run on the converter's own probes starts here
    assert conv._ref_run is not None
    other = make_probes(conv.params.vocab_size, 64, lengths=(9, 4), low=3, bos_id=1, seed=5)
    with torch.inference_mode():
        got = list(conv.reference_activations(other))
        want = list(reference_forward(conv.reference_tensors(), conv.params, conv.tied, other[0]))
    assert [a.name for a in got] == [a.name for a in want]
    for a, b in zip(got, want, strict=True):
        assert a.tensor.shape == b.tensor.shape == (2, 9, *b.tensor.shape[2:])
        assert torch.allclose(a.tensor, b.tensor, rtol=0, atol=1e-6 * b.tensor.abs().max().item())
        assert torch.equal(a.mask, b.mask) and a.base == b.base and a.kind == b.kind
    assert conv._ref_run is None and conv._active_run is None
    conv.close()


def test_close_stops_a_run_nobody_read(tmp_path):
    src = _release(tmp_path, "src", dtype=torch.bfloat16)
    conv = MistralConverter(src, ConvertOptions())
    conv.verify_ahead()
    run = conv._ref_run
    conv.close()
    assert not run._thread.is_alive() and conv._ref_run is None and conv._checks is None


def test_torch_runs_on_one_thread_while_the_reference_does():
    n = torch.get_num_threads()
    if n < 2:
        pytest.skip("one thread already")
    busy = [True, True, False, False]  # asked before each activation and once at the end
    seen = []

    def acts():
        for _ in range(3):
            seen.append(torch.get_num_threads())
            yield object()

    out = list(_one_thread_while(acts(), lambda: busy.pop(0)))
    assert len(out) == 3 and seen == [1, 1, n] and torch.get_num_threads() == n


def test_bf16_blocks_write_only_high_halves(monkeypatch):
    monkeypatch.setattr(rnp, "BLOCK", 64)
    rng = np.random.default_rng(0)
    lin = rnp._Linear(None)
    h = rng.standard_normal((3, 16), dtype=np.float32)
    for rows, cols in ((10, 16), (7, 16)):  # the same buffer, another shape
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)
        wf = (bits.astype(np.uint32) << 16).view(np.float32)
        got = lin(h, bits, "bfloat16")
        assert np.allclose(got, h @ wf.T, rtol=1e-6, atol=1e-6)
        assert not (lin._local.bf16.view(np.uint16)[0::2]).any()  # the low halves stay zero
