"""The papers' ablations as options: LiLoRA's Table 2 rows and BranchLoRA's components, each
checked against its definition by hand."""

import pytest
import torch
import torch.nn.functional as F
from test_adapters import randomise, tiny_config, tiny_llava

from minimcit.adapters import SharedALinear
from minimcit.methods import make_method, parameter_report


def test_lilora_share_a_only_is_a_full_b_per_task_on_the_shared_a():
    model = tiny_llava()
    m = make_method("lilora", model, r=4, lora_alpha=8, share_a_only=True, verbose=False)
    m.start_task(0)
    m.start_task(1)
    layer = m.layers[0]
    assert isinstance(layer, SharedALinear) and [tuple(b.shape) for b in layer.task_B] == [(layer.out_features, 4)] * 2
    randomise([layer.lora_A, *layer.task_B])
    x = torch.randn(3, layer.in_features)
    for t in (0, 1):
        m.use_task(t)
        hand = x @ layer.weight.T + layer.bias + 2.0 * x @ layer.lora_A.T @ layer.task_B[t].T  # s = 8 / 4
        torch.testing.assert_close(layer(x), hand)
    assert not layer.task_B[0].requires_grad and layer.task_B[1].requires_grad and layer.lora_A.requires_grad
    assert m.step_loss(1) is None  # no basis, so no L_reg
    # TP/EP: per task a full (out, r) B against LiLoRA's B~ (out, r~) A~ (r~, r) + phi
    full = parameter_report(tiny_config(), "lilora", 2, r=4, share_a_only=True)
    outs = sum(lay.out_features for lay in m.layers)
    assert full["per_task"] == outs * 4


def test_lilora_fixed_alpha_mixes_basis_and_task_part_by_hand():
    m = make_method("lilora", tiny_llava(), r=4, lora_alpha=4, fixed_alpha=0.5, verbose=False)
    m.start_task(0)
    layer = m.layers[0]
    assert len(layer.phi) == 0  # nothing to learn
    randomise([layer.lora_A, layer.lora_B0, *layer.task_A, *layer.task_B])
    x = torch.randn(3, layer.in_features)
    a = x @ layer.lora_A.T
    hand = x @ layer.weight.T + layer.bias + 0.5 * a @ layer.lora_B0.T + 0.5 * a @ layer.task_A[0].T @ layer.task_B[0].T
    torch.testing.assert_close(layer(x), hand)
    for alpha in (0.0, 1.0):
        m1 = make_method("lilora", tiny_llava(), r=4, lora_alpha=4, fixed_alpha=alpha, verbose=False)
        m1.start_task(0)
        assert m1.layers[0].fusion(0).item() == alpha
    with pytest.raises(ValueError, match="--fixed-alpha must be in"):
        make_method("lilora", tiny_llava(), r=4, fixed_alpha=1.5, verbose=False)


def test_branchlora_without_tuning_freezing_keeps_every_branch_trainable():
    m = make_method("branchlora", tiny_llava(), r=8, lora_alpha=16, num_branches=4, tuning_freezing=False,
                    use_selector=False, verbose=False)
    m.start_task(0)
    m.end_task(0)
    assert all(b.requires_grad for layer in m.layers for b in layer.lora_B)
    on = make_method("branchlora", tiny_llava(), r=8, lora_alpha=16, num_branches=4, use_selector=False,
                     verbose=False)
    on.start_task(0)
    on.end_task(0)
    assert all(sum(b.requires_grad for b in layer.lora_B) == 2 for layer in on.layers)  # N - k = 2 left


def test_branchlora_shared_router_is_one_router_trained_on_every_task():
    model = tiny_llava()
    m = make_method("branchlora", model, r=8, lora_alpha=16, num_branches=4, shared_router=True,
                    use_selector=False, verbose=False)
    m.start_task(0)
    m.end_task(0)
    m.start_task(1)
    layer = m.layers[0]
    assert len(layer.routers) == 1 and layer.routers[0].requires_grad
    randomise([layer.routers[0]])
    x = torch.randn(1, 3, layer.in_features)
    m.use_task(0)
    g0 = layer.gates(x)
    m.use_task(1)
    torch.testing.assert_close(layer.gates(x), g0)  # the same router whatever the task
    per_task = make_method("branchlora", tiny_llava(), r=8, lora_alpha=16, num_branches=4, use_selector=False,
                           verbose=False)
    per_task.start_task(0)
    per_task.start_task(1)
    assert len(per_task.layers[0].routers) == 2 and not per_task.layers[0].routers[0].requires_grad


def test_branchlora_dense_shared_router_is_moelora_on_one_shared_a():
    """The cumulative ablation's "+ shared A" row (top-k = N, one shared router): by hand,
    y = W0 x + s sum_n softmax(R x)_n B_n (A x), every branch weighted, one A for all."""
    m = make_method("branchlora", tiny_llava(), r=8, lora_alpha=16, num_branches=4, top_k=4, shared_router=True,
                    tuning_freezing=False, use_selector=False, verbose=False)
    m.start_task(0)
    layer = m.layers[0]
    randomise([layer.lora_A, layer.routers[0], *layer.lora_B])
    x = torch.randn(2, 3, layer.in_features)
    g = (x @ layer.routers[0].T).softmax(-1)  # (2, 3, 4) dense
    a = x @ layer.lora_A.T  # (2, 3, 2)
    hand = F.linear(x, layer.weight, layer.bias) + 2.0 * sum(g[..., n:n + 1] * (a @ layer.lora_B[n].T) for n in range(4))
    torch.testing.assert_close(layer(x), hand)
    m.end_task(0)
    m.start_task(1)
    assert all(b.requires_grad for b in layer.lora_B) and len(layer.routers) == 1 and layer.routers[0].requires_grad


def test_drift_of_a_shared_a_from_the_checkpoints(tmp_path):
    """benchmarks/drift.py: ||A_k - A_1|| / ||A_1|| over the layers' shared A (per-task lists left out)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.drift import drift

    (tmp_path / "checkpoints").mkdir()
    a1 = {"l0.lora_A": torch.ones(2, 2), "l1.lora_A": torch.ones(1, 2), "l0.lora_A.0": torch.ones(3)}
    steps = [a1, {**a1, "l0.lora_A": 2 * torch.ones(2, 2)}, {**a1, "l1.lora_A": -torch.ones(1, 2)}]
    for k, adapters in enumerate(steps, 1):
        torch.save({"adapters": adapters}, tmp_path / "checkpoints" / f"after_stage_{k}.pt")
    d = drift(tmp_path)
    # after stage 2: |dA| = 2 (four entries moved by 1) over ||A_1|| = sqrt(6); after 3: l1 moved by 2 in two entries
    assert d["stages"] == pytest.approx([2 / 6 ** 0.5, (2 * 2 ** 0.5) / 6 ** 0.5])
    assert d["max_layer"] == pytest.approx(2.0) and d["cos"] == pytest.approx((-1.0, 1.0)) and d["layers"] == 2
    torch.save({"adapters": {"l0.lora_A.0": torch.ones(3)}}, tmp_path / "checkpoints" / "after_stage_1.pt")
    for k in (2, 3):
        (tmp_path / "checkpoints" / f"after_stage_{k}.pt").unlink()
    assert drift(tmp_path) is None  # DirLoRA-like: no shared A


def test_paper_table_orderings_by_hand():
    """paper_tables.ordering: a pair is kept / reversed when our means differ, in / against the
    paper's direction, by more than two of the larger sd; otherwise not told apart."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.paper_tables import Row, ordering

    rows = [Row("a", "x", (), (80.0, None, None, None)), Row("b", "x", (), (50.0, None, None, None)),
            Row("c", "x", (), (40.0, None, None, None)), Row("d", "x"), Row("e", "x", (), (10.0, None, None, None))]
    ap = lambda *v: {s: {"summary": {"AP": x}} for s, x in enumerate(v)}  # noqa: E731
    # a: mean 30, sd 1; b: mean 20, sd 1; c: mean 21, sd 2; e: one seed only (left out)
    results = {"a": ap(29, 30, 31), "b": ap(19, 20, 21), "c": ap(19, 21, 23), "d": ap(1, 2), "e": ap(5)}
    got = ordering(rows, results)
    assert got["kept"] == ["a > b (+10.0 against 2 sd 2.0)", "a > c (+9.0 against 2 sd 4.0)"]
    assert got["not told apart"] == ["b > c (-1.0 against 2 sd 4.0)"] and got["reversed"] == []
    got = ordering(rows, {**results, "b": ap(39, 40, 41)})  # b now 40 ± 1 above a's 30 ± 1
    assert got["reversed"] == ["a > b (-10.0 against 2 sd 2.0)"]
