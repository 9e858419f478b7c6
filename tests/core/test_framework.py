"""Key tables, drop lists and the strictness checks of a plan; parity metrics."""

from __future__ import annotations

import pytest
import torch

from enc.converters.base import (
    Activation,
    DropList,
    KeyTable,
    Plan,
    apply_table,
    check_plan,
    copy,
    permute_rope,
    transpose,
)
from enc.errors import MappingError
from enc.io.lazy import from_tensor
from enc.parity import THRESHOLDS, compare, make_probes, measure

TABLE = KeyTable({
    "enc/layer_{}/kernel": ("layers.{}.weight", transpose),
    "enc/layer_{}/bias": ("layers.{}.bias", copy),
    "g_{}/i_{}/w": ("groups.{}.inner.{}.w", copy),
})
DROP = DropList({r"/adam_[mv]$": "optimizer slot", r"^global_step$": "step counter"})


def _src(**named):
    return {k.replace("__", "/"): from_tensor(v, k.replace("__", "/")) for k, v in named.items()}


def test_table_maps_indices_and_transposes():
    k = torch.arange(6.0).view(2, 3)
    src = {"enc/layer_0/kernel": from_tensor(k, "enc/layer_0/kernel"),
           "enc/layer_11/bias": from_tensor(torch.ones(3), "enc/layer_11/bias"),
           "g_2/i_3/w": from_tensor(torch.zeros(1), "g_2/i_3/w"),
           "enc/layer_0/kernel/adam_m": from_tensor(k, "x"), "global_step": from_tensor(torch.tensor(5), "y")}
    plan = apply_table(src, TABLE, DROP, path=None)
    assert sorted(plan.tensors) == ["groups.2.inner.3.w", "layers.0.weight", "layers.11.bias"]
    w = plan.tensors["layers.0.weight"]
    assert w.shape == (3, 2) and w.recipe == "transpose"
    assert torch.equal(w.load(), k.t())
    assert plan.dropped == {"enc/layer_0/kernel/adam_m": "optimizer slot", "global_step": "step counter"}


def test_unknown_source_key_is_an_error():
    src = {"enc/layer_0/kernel": from_tensor(torch.zeros(2, 2)), "enc/mystery": from_tensor(torch.zeros(1))}
    with pytest.raises(MappingError, match="enc/mystery"):
        apply_table(src, TABLE, DROP, path=None)


def test_check_plan_missing_and_extra_and_unconsumed():
    t = from_tensor(torch.zeros(1), "a")
    plan = Plan({"x": t})
    check_plan(plan, ["a"], {"x"}, None)
    with pytest.raises(MappingError, match="lack 1 tensor"):
        check_plan(plan, ["a"], {"x", "y"}, None)
    with pytest.raises(MappingError, match="does not have"):
        check_plan(plan, ["a"], set(), None)
    with pytest.raises(MappingError, match="left unprocessed: b"):
        check_plan(plan, ["a", "b"], {"x"}, None)


def test_permute_rope_matches_the_reference_formula():
    n_heads, head_dim, dim = 2, 8, 16
    w = torch.arange(n_heads * head_dim * dim, dtype=torch.float32).view(n_heads * head_dim, dim)
    out = permute_rope(n_heads)(from_tensor(w)).load()
    # HF's convert_mistral_weights_to_hf: view(n, d/2, 2, dim).transpose(1, 2).reshape(dim1, dim)
    ref = w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)
    assert torch.equal(out, ref)
    # rows 0,2,4,6 (the real parts) of head 0 come first
    assert torch.equal(out[:4], w[[0, 2, 4, 6]])


def test_measure_metrics_exact_values():
    ref = Activation("h", torch.tensor([[[3.0, 4.0], [1.0, 0.0]]]), mask=torch.tensor([[True, False]]))
    out = Activation("h", torch.tensor([[[3.0, 4.5], [9.0, 9.0]]]))
    row = measure(ref, out, THRESHOLDS[torch.float32])
    assert row.max_abs == pytest.approx(0.5)  # the padded position is ignored
    assert row.rel == pytest.approx(0.5 / 4.0)
    assert row.nmse == pytest.approx(0.25 / 25.0)
    assert row.cos == pytest.approx((9 + 18) / (5 * (9 + 20.25) ** 0.5))
    assert not row.passed and "nmse" in row.why


def test_logit_agreement_and_verdict():
    a = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]])
    b = a.clone()
    b[0, 1, 1] = 6.0  # argmax flips at position 1
    ref = iter([Activation("logits", a, "logits", torch.ones(1, 2, dtype=torch.bool))])
    out = iter([Activation("logits", b, "logits")])
    rep = compare(ref, out, torch.bfloat16)
    row = rep.rows[0]
    assert row.top1 == 0.5 and row.top5 == 1.0
    assert not rep.passed and rep.first_failure.name == "logits"


def test_out_of_step_streams_raise():
    ref = iter([Activation("layer.0", torch.zeros(1, 1, 2))])
    out = iter([Activation("layer.1", torch.zeros(1, 1, 2))])
    with pytest.raises(RuntimeError, match="out of step"):
        compare(ref, out, torch.float32)


def test_make_probes_shapes_padding_and_segments():
    (p,) = make_probes(100, 512, lengths=(10, 4), low=5, cls_id=2, sep_id=3, pad_id=0, type_vocab_size=2)
    assert p.input_ids.shape == (2, 10)
    assert p.attention_mask.tolist()[1] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert p.input_ids[0, 0] == 2 and p.input_ids[0, 9] == 3 and p.input_ids[0, 4] == 3
    assert p.token_type_ids[0].tolist() == [0] * 5 + [1] * 5
    assert p.input_ids[1, 4:].eq(0).all()
    (q,) = make_probes(100, 512, lengths=(10, 4), low=5, cls_id=2, sep_id=3, pad_id=0, type_vocab_size=2)
    assert torch.equal(p.input_ids, q.input_ids)  # seeded
