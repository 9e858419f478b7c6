"""The golden record's recipe: a machine-independent projection, and its size at 7B geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from enc.converters.base import Activation, Probe
from enc.verify import DIMS, RECORD_FILE, SEED, Recorder, _lowbias32, projection, read_record


def _lowbias32_py(x: int) -> int:
    """The published lowbias32 (Wellons, "Prospecting for hash functions"), in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def test_hash_equals_an_independent_implementation():
    xs = [0, 1, 2, 12345, 0xDEADBEEF, 0xFFFFFFFF, 0x80000000]
    got = _lowbias32(np.array(xs, dtype=np.uint32)).tolist()
    assert got == [_lowbias32_py(x) for x in xs]
    assert got[0] == 0 and len(set(got)) == len(xs)


def test_projection_is_fixed_and_independent_of_torch_rng():
    torch.manual_seed(1)
    a = projection(300).clone()
    torch.manual_seed(2)
    torch.rand(1000)
    b = projection(300)
    assert torch.equal(a, b) and a.shape == (300, DIMS) and a.dtype == torch.float64
    # Rademacher: +-1/sqrt(dims), balanced signs; another width gives another matrix
    assert set(a.abs().unique().tolist()) == {1 / DIMS ** 0.5}
    assert abs((a > 0).double().mean().item() - 0.5) < 0.02
    assert not torch.equal(projection(301)[:300], a)
    assert projection(DIMS) is None  # narrow rows are stored as they are


def test_projection_keeps_norms_and_cosines():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4096, generator=g, dtype=torch.float64)
    y = x + 0.05 * torch.randn(200, 4096, generator=g, dtype=torch.float64)
    p = projection(4096)
    ratio = (x @ p).norm(dim=1) / x.norm(dim=1)
    assert 0.7 < ratio.min().item() and ratio.max().item() < 1.3 and abs(ratio.pow(2).mean().item() - 1) < 0.05
    nmse = ((x - y) ** 2).sum() / (x ** 2).sum()
    nmse_p = (((x - y) @ p) ** 2).sum() / ((x @ p) ** 2).sum()
    assert abs(nmse_p / nmse - 1) < 0.1


def test_record_for_a_7b_geometry_is_small(tmp_path):
    """Mistral-7B: 32 layers, hidden 4096, vocab 32000, enc's probes (48, 17, 6 tokens): well under a few MB."""
    ids = torch.zeros(3, 48, dtype=torch.long)
    mask = torch.zeros(3, 48, dtype=torch.long)
    for r, n in enumerate((48, 17, 6)):
        mask[r, :n] = 1
    probe = Probe(ids, mask, None, "batch3x48")

    class Fake:
        name = "fake"

        def probes(self):
            return [probe]

        def reference_activations(self, probes):
            g = torch.Generator().manual_seed(0)
            m = mask.bool()
            yield Activation("embeddings", torch.randn(3, 48, 4096, generator=g), mask=m)
            for i in range(32):
                yield Activation(f"layer.{i}", torch.randn(3, 48, 4096, generator=g), mask=m)
            yield Activation("final_norm", torch.randn(3, 48, 4096, generator=g), mask=m)
            yield Activation("logits", torch.randn(3, 48, 32000, generator=g), "logits", m)

    rec = Recorder(Fake())
    acts = list(rec.reference_activations(rec.probes()))
    (tmp_path / "config.json").write_text("{}")
    path = rec.write(tmp_path, fmt="fake", dtype="bfloat16", parity={"verdict": "pass"})
    assert path.name == RECORD_FILE
    size = path.stat().st_size
    assert 500_000 < size < 1_000_000  # 35 activations x 71 positions x 64 dims x 4 bytes + top-10 logits
    r = read_record(tmp_path)
    assert [e.name for e in r.entries] == [a.name for a in acts]
    assert r.meta["recipe"] == {"projection": "rademacher-lowbias32", "dims": DIMS, "seed": SEED, "topk": 10,
                                "positions": "real (attention-mask) positions only; reference in float32"}
    assert set(r.meta["thresholds"]) == {"float32", "float16", "bfloat16"}
    assert r.meta["tokenizer"] is None  # no tokenizer in this directory
    top = r.tensors["act.0034.topk_idx"]
    want = acts[-1].tensor[mask.bool()].topk(10, dim=1).indices
    assert torch.equal(top, want)
    json.dumps(r.meta)  # plain JSON metadata


# ----------------------------------------------------------------------------- top-1 ties in a replay


def _logits_case(margin: float, noise: float = 0.01, positions: int = 20, features: int = 2000):
    """Reference logits with two leading ids ``margin`` apart at every position (the rest far below);
    the replay adds ``noise`` to every logit and swaps the two leaders' values at half the positions."""
    g = torch.Generator().manual_seed(0)
    ref = 0.1 * torch.randn(positions, features, generator=g, dtype=torch.float64)
    pos = torch.arange(positions)
    a, b = (7 * pos) % features, (7 * pos + 3) % features
    ref[pos, a], ref[pos, b] = 5.0, 5.0 - margin
    got = ref + noise * torch.randn(positions, features, generator=g, dtype=torch.float64)
    r = pos[pos % 2 == 0]
    got[r, a[r]], got[r, b[r]] = got[r, b[r]].clone(), got[r, a[r]].clone()
    return ref, got


def _judge_logits(ref: torch.Tensor, got: torch.Tensor):
    from enc.parity import THRESHOLDS
    from enc.verify import Entry, Record, _judge, fingerprint

    top = ref.topk(10, dim=1)
    rec = Record({}, [], [], {"act.0000.proj": fingerprint(ref).float(), "act.0000.topk_idx": top.indices,
                              "act.0000.topk_val": top.values.float()})
    entry = Entry("logits", "logits", 0, ref.shape[1], ref.shape[0], False)
    return _judge(entry, rec, 0, Activation("logits", got, kind="logits"), THRESHOLDS[torch.bfloat16], 64, SEED)


def test_a_swap_inside_the_replays_noise_is_a_tie_and_passes():
    row = _judge_logits(*_logits_case(margin=0.002))  # a gap far inside the error (noise 0.01 per logit)
    assert row.top1 < 0.8  # plain top-1 would fail this correct replay
    assert row.top1 + row.top1_ties == pytest.approx(1.0)
    assert row.passed, row.why


def test_a_decisive_swap_still_fails_top1():
    row = _judge_logits(*_logits_case(margin=0.3))  # ~20 standard deviations of the error: the reference is sure
    assert row.top1 == pytest.approx(0.5) and row.top1_ties == 0.0
    assert not row.passed and row.why == "top-1 0.500 < 0.8"


def test_a_record_without_topk_values_judges_plain_top1():
    from enc.parity import THRESHOLDS
    from enc.verify import Entry, Record, _judge, fingerprint

    ref, got = _logits_case(margin=0.002)
    rec = Record({}, [], [], {"act.0000.proj": fingerprint(ref).float(),
                              "act.0000.topk_idx": ref.topk(10, dim=1).indices})
    entry = Entry("logits", "logits", 0, ref.shape[1], ref.shape[0], False)
    row = _judge(entry, rec, 0, Activation("logits", got, kind="logits"), THRESHOLDS[torch.bfloat16], 64, SEED)
    assert row.top1_ties is None and row.top1 < 0.8
    assert not row.passed and row.why == f"top-1 {row.top1:.3f} < 0.8"
