"""Replay, EWC, LwF, O-LoRA and DoRA against hand-computed values (SPEC §2, classic baselines)
and, for DoRA, against peft on the same weights."""

import math

import pytest
import torch
from torch import nn
from test_adapters import batch, randomise, tiny_llava

from minimcit.baselines import EWC, LwF, OLoRA, OLoRALinear, Replay
from minimcit.methods import make_method, parameter_report
from minimcit.minicoin import minicoin
from minimcit.model import Llava


class One(nn.Module):
    """y = w0 x: one Linear(1, 1), so an r=1 LoRA on it has exactly two parameters, a and b."""

    def __init__(self, w0=1.0):
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.fill_(w0)


def two_parameter_ewc(a=0.5, b=2.0, **kw):
    model = One()
    m = EWC(model, r=1, lora_alpha=1, target="lin", verbose=False, **kw)  # s = alpha / r = 1
    m.start_task(0)
    layer = m.layers[0]
    with torch.no_grad():
        layer.lora_A[0].fill_(a)
        layer.lora_B[0].fill_(b)
    return model, m, layer


def squared_error_losses(model, xs, y=0.0):
    def losses(n):
        for x in xs[:n]:
            yield (y - model.lin(torch.tensor([[x]]))).pow(2).sum()
    return losses


# --------------------------------------------------------------------------- EWC


def test_ewc_fisher_and_penalty_by_hand_on_two_parameters():
    model, m, layer = two_parameter_ewc(ewc_lambda=3.0, fisher_samples=2)
    # y = w0 x + b a x with w0 = 1, a = 0.5, b = 2; L = (0 - y)^2 = (2x)^2.
    # dL/da = 2 y b x = 2 (2x)(2) x = 8x^2;  dL/db = 2 y a x = 2 (2x)(0.5) x = 2x^2.
    # x = 1: (8, 2); x = 2: (32, 8).  F_a = (64 + 1024) / 2 = 544;  F_b = (4 + 64) / 2 = 34.
    m.end_task(0, squared_error_losses(model, [1.0, 2.0]))
    assert layer.fisher_A.item() == pytest.approx(544.0) and layer.fisher_B.item() == pytest.approx(34.0)
    assert (layer.star_A.item(), layer.star_B.item()) == (0.5, 2.0)

    m.start_task(1)
    with torch.no_grad():
        layer.lora_A[0].fill_(0.7)  # moved by 0.2
        layer.lora_B[0].fill_(1.5)  # moved by -0.5
    # lambda/2 (F_a 0.2^2 + F_b 0.5^2) = 1.5 (544 * 0.04 + 34 * 0.25) = 1.5 * 30.26 = 45.39
    assert m.step_loss(1).item() == pytest.approx(45.39, rel=1e-5)

    # Online: F_2 at (a, b) = (0.7, 1.5) on x = 1: y = 1 + 1.05 = 2.05;
    # dL/da = 2 * 2.05 * 1.5 = 6.15, dL/db = 2 * 2.05 * 0.7 = 2.87; F <- F + F_2.
    m.end_task(1, squared_error_losses(model, [1.0, 2.0][:1]))
    assert layer.fisher_A.item() == pytest.approx(544.0 + 6.15 ** 2, rel=1e-5)
    assert layer.fisher_B.item() == pytest.approx(34.0 + 2.87 ** 2, rel=1e-5)
    assert layer.star_A.item() == pytest.approx(0.7) and layer.star_B.item() == pytest.approx(1.5)
    assert m.step_loss(2).item() == 0.0  # theta = theta*


def test_ewc_has_no_penalty_on_the_first_task_and_needs_samples():
    _, m, _ = two_parameter_ewc()
    assert m.step_loss(0) is None
    with pytest.raises(ValueError, match="Fisher"):
        m.end_task(0)


# --------------------------------------------------------------------------- LwF


def test_lwf_loss_by_hand_on_fixed_logits(monkeypatch):
    m = LwF(tiny_llava(), r=4, lora_alpha=8, verbose=False, lwf_lambda=1.5, temperature=2.0)
    m.start_task(0)
    m.start_task(1)
    # Teacher z = (0, 0) -> p_t = (1/2, 1/2). Student z = (2 ln 3, 0) -> z / T = (ln 3, 0) -> p_s = (3/4, 1/4).
    # KL(p_t || p_s) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); loss = lambda T^2 KL = 1.5 * 4 * 1/2 ln(4/3).
    monkeypatch.setattr(m, "teacher_logits", lambda b: torch.zeros(3, 2))
    student = torch.tensor([[2 * math.log(3), 0.0]] * 3)
    assert m.extra_loss({}, 1, student).item() == pytest.approx(3 * math.log(4 / 3), rel=1e-6)


def test_lwf_is_zero_when_teacher_equals_student_and_the_teacher_is_frozen():
    model = tiny_llava()
    m = LwF(model, r=4, lora_alpha=8, verbose=False)
    m.start_task(0)
    randomise(m.trainable_parameters(), std=0.1)
    assert m.extra_loss(batch(), 0, torch.zeros(1, 64)) is None  # no teacher on the first task
    m.start_task(1)
    b = batch()
    model.eval()
    student, _ = model.answer_logits(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    assert m.extra_loss(b, 1, student).item() == pytest.approx(0.0, abs=1e-6)
    layer = m.layers[0]
    assert layer.lora_A[0].requires_grad and not layer.lora_A[1].requires_grad
    torch.testing.assert_close(layer.lora_A[0], layer.lora_A[1])
    assert all(layer.task == 0 for layer in m.layers)  # the student is back in place


# --------------------------------------------------------------------------- O-LoRA


def test_olora_orthogonality_term_by_hand_and_the_sum_of_every_pair():
    base = nn.Linear(2, 2)
    layer = OLoRALinear(base, r=1, alpha=1)
    layer.add_task()
    layer.add_task()
    with torch.no_grad():
        layer.lora_A[0].copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_A[1].copy_(torch.tensor([[3.0, 4.0]]))
        layer.lora_B[0].copy_(torch.tensor([[1.0], [2.0]]))
        layer.lora_B[1].copy_(torch.tensor([[-1.0], [0.5]]))
    assert layer.orthogonality().item() == 9.0  # ||A_0 A_1^T||_F^2 = (1*3 + 0*4)^2
    x = torch.tensor([[2.0, 1.0]])
    # y = W0 x + b + B_0 (A_0 x) + B_1 (A_1 x) = W0 x + b + (1, 2) * 2 + (-1, 0.5) * 10
    expected = base(x) + torch.tensor([[2.0 - 10.0, 4.0 + 5.0]])
    torch.testing.assert_close(layer(x), expected)
    assert not layer.lora_A[0].requires_grad and layer.lora_A[1].requires_grad


def test_olora_loss_weights_and_earlier_loras_untouched_by_training():
    model = tiny_llava()
    m = OLoRA(model, r=4, lora_alpha=8, verbose=False, olora_lambda1=0.5, olora_lambda2=0.25)
    m.start_task(0)
    randomise(m.trainable_parameters(), seed=1, std=0.2)
    # On the first task only the L2 term: l2 * sum ||A_0||^2 + ||B_0||^2
    l2 = sum(layer.lora_A[0].pow(2).sum() + layer.lora_B[0].pow(2).sum() for layer in m.layers)
    torch.testing.assert_close(m.step_loss(0), 0.25 * l2)
    m.start_task(1)
    randomise(m.trainable_parameters(), seed=2, std=0.2)
    old = [(layer.lora_A[0].clone(), layer.lora_B[0].clone()) for layer in m.layers]
    expected = (0.5 * sum((layer.lora_A[0] @ layer.lora_A[1].T).pow(2).sum() for layer in m.layers)
                + 0.25 * sum(layer.lora_A[1].pow(2).sum() + layer.lora_B[1].pow(2).sum() for layer in m.layers))
    torch.testing.assert_close(m.step_loss(1), expected)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        b = batch()
        loss_sum, n = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
        (loss_sum / n + m.step_loss(1)).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(a, layer.lora_A[0]) and torch.equal(bb, layer.lora_B[0])
               for (a, bb), layer in zip(old, m.layers))
    assert not m.task_specific  # every pair is on: no task identity needed


def test_olora_refuses_dora():
    with pytest.raises(ValueError, match="dora"):
        OLoRA(tiny_llava(), r=4, verbose=False, dora=True)


# --------------------------------------------------------------------------- Replay


def test_replay_memory_is_the_share_asked_from_training_data_and_reproducible():
    tasks = minicoin("minicoin", "smoke", 0, n_train=250, n_test=20)
    m = Replay(tiny_llava(), r=4, verbose=False, replay_share=0.02)
    mem = m.memory(tasks[0].train, 0, seed=3)
    assert len(mem) == round(0.02 * 250) == 5
    assert all(s in tasks[0].train for s in mem)
    test_items = {(s.question, s.id) for s in tasks[0].test}
    assert not any((s.question, s.id) in test_items for s in mem)
    again = Replay(tiny_llava(), r=4, verbose=False, replay_share=0.02)  # a resumed run: a new object
    assert again.memory(tasks[0].train, 0, seed=3) == mem
    assert m.memory(tasks[0].train, 0, seed=4) != mem  # drawn from the seed
    stage2 = m.train_samples([2], tasks, seed=3)
    assert stage2[:250] == tasks[2].train
    assert stage2[250:] == m.memory(tasks[0].train, 0, 3) + m.memory(tasks[1].train, 1, 3)
    assert m.train_samples([0], tasks, seed=3) == tasks[0].train


# --------------------------------------------------------------------------- DoRA against peft


def test_dora_equals_peft_forward_and_merged_weight():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 9)

    torch.manual_seed(0)
    ours_model, theirs_model = Net(), Net()
    theirs_model.load_state_dict(ours_model.state_dict())
    m = make_method("seqlora", ours_model, r=4, lora_alpha=8, target="lin", dora=True, verbose=False)
    m.start_task(0)
    layer = m.layers[0]
    theirs = peft.get_peft_model(theirs_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                                               use_dora=True, lora_dropout=0.0))
    plin = theirs.base_model.model.lin
    torch.testing.assert_close(layer.lora_magnitude[0], plin.lora_magnitude_vector["default"].weight)  # ||W0||
    randomise([layer.lora_A[0], layer.lora_B[0]], seed=5, std=0.4)  # non-zero B
    with torch.no_grad():
        layer.lora_magnitude[0].mul_(torch.linspace(0.5, 1.5, 9))
        plin.lora_A["default"].weight.copy_(layer.lora_A[0])
        plin.lora_B["default"].weight.copy_(layer.lora_B[0])
        plin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude[0])
    x = torch.randn(5, 12)
    ours_model.eval(), theirs.eval()
    ours = ours_model.lin(x)
    torch.testing.assert_close(ours, plin(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, nn.functional.linear(x, layer.weight, layer.bias), atol=1e-3)  # DoRA acts
    merged = theirs.merge_and_unload().lin.weight
    m.merge(0)
    torch.testing.assert_close(layer.weight, merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_model.lin(x), ours, atol=1e-5, rtol=1e-5)  # same outputs after merge


def test_dora_is_counted_and_trained_and_dirlora_gets_a_magnitude_per_task():
    from test_adapters import tiny_config
    plain = parameter_report(tiny_config(), "dirlora", 2, r=4)
    dora = parameter_report(tiny_config(), "dirlora", 2, r=4, dora=True)
    out_features = sum(m.out_features for n, m in Llava(tiny_config()).named_modules()
                       if isinstance(m, nn.Linear) and n.startswith("language_model.layers"))
    assert dora["trainable"] - plain["trainable"] == out_features  # one m (out,) per wrapped layer
    assert dora["per_task"] - plain["per_task"] == out_features


def test_ewc_with_dora_anchors_the_magnitude_too():
    model = One(w0=2.0)
    m = EWC(model, r=1, lora_alpha=1, target="lin", verbose=False, dora=True)
    m.start_task(0)
    layer = m.layers[0]
    assert [p is layer.lora_magnitude[0] for p, _, _ in m.pairs()] == [False, False, True]
    m.end_task(0, squared_error_losses(model, [1.0]))
    assert layer.star_magnitude.item() == pytest.approx(2.0)  # m = ||W0|| = 2
    m.start_task(1)
    with torch.no_grad():
        layer.lora_magnitude[0].fill_(3.0)
    expected = m.ewc_lambda / 2 * layer.fisher_magnitude.item() * 1.0 ** 2
    assert layer.fisher_magnitude.item() > 0 and m.step_loss(1).item() == pytest.approx(expected, rel=1e-6)
