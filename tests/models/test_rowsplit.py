"""enc.models.rowsplit: row-split matrix-vector products equal torch.mv bit for bit; generate's tokens stay
transformers' tokens with the split on."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from enc.models import rowsplit


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(rowsplit, "_BLOCK_BYTES", 512)  # the minimum 16-row blocks for every width used here
    monkeypatch.setattr(rowsplit, "_helper_wanted", lambda: True)  # split even when the test machine is busy


def _mat(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g), torch.randn(cols, generator=g)


@pytest.mark.parametrize("rows,cols", [(1000, 8), (37, 300), (4099, 64)])
def test_matvec_equals_mv_and_linear_bitwise(small_blocks, rows, cols):
    w, x = _mat(rows, cols)
    before = torch.get_num_threads()
    with torch.inference_mode(), rowsplit.decode_threads() as on:
        assert on and rowsplit.active() and torch.get_num_threads() == 1
        got = rowsplit.matvec(w, x)
        want_mv = torch.mv(w, x)
        want_lin = F.linear(x[None], w)[0]
    assert torch.get_num_threads() == before and not rowsplit.active()
    assert len(rowsplit._blocks(rows, cols * 4)) > 1
    assert torch.equal(got, want_mv) and torch.equal(got, want_lin)


def test_matvec_outside_inference_mode_and_outside_the_context(small_blocks):
    w, x = _mat(333, 8, seed=1)
    with rowsplit.decode_threads():
        got = rowsplit.matvec(w, x)  # the helper follows the caller's (non-)inference mode
    assert torch.equal(got, torch.mv(w, x))
    assert torch.equal(rowsplit.matvec(w, x), torch.mv(w, x))  # inactive: plain torch.mv


def test_caller_finishes_blocks_the_helper_took_but_did_not_deliver():
    w, x = _mat(64, 8, seed=2)
    y = torch.full((64,), float("nan"))
    job = rowsplit._Job(w, x, y, [(0, 16), (16, 32), (32, 48), (48, 64)])
    job.next = 2  # the "helper" took blocks 0 and 1 and was descheduled before delivering them
    job.run()
    assert job.delivered == [True] * 4 and torch.equal(y, torch.mv(w, x))
    job.help()  # a helper waking up late finds nothing left and writes nothing
    assert torch.equal(y, torch.mv(w, x))


def test_one_decode_at_a_time_holds_the_helper():
    seen = []
    with rowsplit.decode_threads() as outer:
        with rowsplit.decode_threads() as nested:
            seen.append(nested)
        t = threading.Thread(target=lambda: seen.append(rowsplit.decode_threads().__enter__()))
        t.start()
        t.join()
    assert outer is True and seen == [False, False]
    with rowsplit.decode_threads() as again:
        assert again is True


def test_mistral_fp32_decode_uses_the_split_and_keeps_transformers_tokens(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from enc.generation import Settings, generate
    from enc.models.mistral import from_pretrained
    from tests.helpers.mistral_writer import tiny_hf

    monkeypatch.setattr(rowsplit, "_BLOCK_BYTES", 16 * 64 * 4)  # hidden 64: 16-row blocks, many per product
    monkeypatch.setattr(rowsplit, "_helper_wanted", lambda: True)
    calls = []
    real = rowsplit.matvec
    monkeypatch.setattr(rowsplit, "matvec", lambda w, x: calls.append(w.shape) or real(w, x))
    hf = tiny_hf(vocab=300, seed=5, sliding_window=12)
    hf.save_pretrained(tmp_path)
    prompt = [1, 17, 250, 3, 99, 42]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    ours = from_pretrained(tmp_path)
    assert not ours.lm_fast.onednn  # float32 stays plain, split by rows in decode
    before = torch.get_num_threads()
    res = generate(ours, None, prompt, Settings(max_new_tokens=20, temp=0, stop_ids=[]))
    assert res.token_ids == want
    assert torch.get_num_threads() == before
    # 19 one-token steps x (2 layers x [qkv, o, gate_up, down] + lm_head)
    assert len(calls) == 19 * 9 and (300, 64) in calls


def test_helper_joins_only_while_the_other_processes_leave_cores_free():
    assert rowsplit.helper_joins(busy_delta=1.9, own_delta=1.8, wall=1.0, cpus=2)  # others 0.1 core
    assert not rowsplit.helper_joins(busy_delta=2.0, own_delta=0.9, wall=1.0, cpus=2)  # others 1.1 cores
    assert not rowsplit.helper_joins(busy_delta=1.5, own_delta=0.0, wall=2.0, cpus=2)  # others 0.75: 1.25 free
    assert rowsplit.helper_joins(busy_delta=1.48, own_delta=0.0, wall=2.0, cpus=2)
    assert rowsplit.helper_joins(busy_delta=40.0, own_delta=2.0, wall=1.0, cpus=64)


def test_poll_switches_the_helper_off_and_on(monkeypatch):
    busy, own, clock = [100.0], [10.0], [1000.0]
    monkeypatch.setattr(rowsplit, "_busy_seconds", lambda: busy[0])
    monkeypatch.setattr(rowsplit.os, "times", lambda: type("T", (), {"user": own[0], "system": 0.0})())
    monkeypatch.setattr(rowsplit.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(rowsplit.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(rowsplit, "_poll", {"at": 0.0, "busy": 0.0, "own": 0.0, "helper": True})
    assert rowsplit._helper_wanted()  # first reading: a baseline, both threads
    clock[0] += 1.0
    busy[0] += 2.0
    own[0] += 0.8  # the other processes took 1.2 cores
    assert not rowsplit._helper_wanted()
    busy[0] += 5.0  # within _POLL_S of the last reading: no new decision
    clock[0] += rowsplit._POLL_S / 2
    assert not rowsplit._helper_wanted()
    clock[0] += 1.0
    own[0] += 1.5
    busy[0] += 1.6 - 5.0  # undo the unseen 5.0; over the window: 1.6 busy, 1.5 of it ours
    assert rowsplit._helper_wanted()


@pytest.mark.parametrize("rows,row_bytes", [(6144, 16384), (28672, 16384), (4096, 57344), (32000, 16384),
                                            (100, 16384), (17, 4), (5000, 4)])
def test_blocks_cover_every_row_once_and_shrink_at_the_end(rows, row_bytes):
    b = rowsplit._blocks(rows, row_bytes)
    assert b[0][0] == 0 and b[-1][1] == rows and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    sizes = [r1 - r0 for r0, r1 in b]
    big = max(16, rowsplit._BLOCK_BYTES // row_bytes)
    assert max(sizes) <= big and all(x >= y for x, y in zip(sizes[:-1], sizes[1:-1], strict=False))
    if rows >= 8 * big:  # the last blocks are at most a quarter of the big ones
        assert sizes[0] == big and max(sizes[-3:]) <= max(16, big // 4)


def test_helper_thread_stops_cleanly_after_its_block(monkeypatch):
    h = rowsplit._Helper()
    w, x = _mat(64, 8, seed=3)
    y = torch.full((64,), float("nan"))
    job = rowsplit._Job(w, x, y, [(0, 16), (16, 32), (32, 48), (48, 64)])
    h.submit(job)
    job.run()  # the caller finishes whatever the helper did not deliver
    h.stop()
    assert not h.thread.is_alive() and torch.equal(y, torch.mv(w, x))
    h.stop()  # idempotent (atexit may call it again)
