"""Each adapter equation and rule of SPEC §2, checked by hand, by an explicit loop, or against peft."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minimcit import adapters
from minimcit.adapters import BranchLoRALinear, LiLoRALinear, LoRALinear, MoELoRALinear
from minimcit.methods import METHODS, make_method, parameter_report
from minimcit.model import Llava, LlavaConfig, TextConfig, Tokens, VisionConfig
from minimcit.selector import TaskSelector


def tiny_config(**text):
    return LlavaConfig(
        vision=VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14),
        text=TextConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2), **text}),
        image_token_index=63)


def tiny_llava(seed=0):
    """A tiny random base to adapt, frozen as run.py freezes the base before building a method."""
    torch.manual_seed(seed)
    return Llava(tiny_config()).eval().requires_grad_(False)


def batch(seed=1, n=2, text=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, text + 4), generator=g)
    ids[:, 1:5] = 63  # 4 image tokens
    instruction = torch.zeros_like(ids, dtype=torch.bool)
    instruction[:, 5:8] = True  # the three tokens after the image stand for the question
    return {"input_ids": ids, "pixel_values": torch.randn(n, 3, 28, 28, generator=g),
            "attention_mask": torch.ones_like(ids), "instruction_mask": instruction, "labels": ids.clone()}


def randomise(params, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def linear(i=16, o=12, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


# --------------------------------------------------------------------------- LoRA


def test_lora_is_identity_at_init_and_keeps_keys():
    model = tiny_llava()
    b = batch()
    with torch.no_grad():
        before = model(b["input_ids"], b["pixel_values"])
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    m = make_method("seqlora", model, r=8, lora_alpha=16, verbose=False)
    m.start_task(0)
    with torch.no_grad():
        torch.testing.assert_close(model(b["input_ids"], b["pixel_values"]), before, rtol=0, atol=0)
    after = model.state_dict()
    for k, v in keys.items():  # every base key still there, same tensor
        assert torch.equal(after[k], v), k
    assert set(after) - set(keys) == {f"{n}.lora_{ab}.0" for n in m.names for ab in "AB"}


def test_lora_merge_and_unmerge_keep_outputs_with_nonzero_B():
    layer = LoRALinear(linear(), r=4, alpha=8)
    layer.add_task()
    randomise([layer.lora_B[0]])
    x = torch.randn(5, 16)
    want = layer(x)
    assert not torch.allclose(want, F.linear(x, layer.weight, layer.bias))  # B really acts
    layer.merge()
    torch.testing.assert_close(layer(x), want)
    layer.unmerge()
    torch.testing.assert_close(layer(x), want)


def test_lora_equals_peft_on_same_weights():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10))
    ours = LoRALinear(base[0], r=4, alpha=8)
    ours.add_task()
    randomise([ours.lora_A[0], ours.lora_B[0]])
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"]),
                                          nn.Sequential(nn.Linear(16, 12)))
    with torch.no_grad():
        theirs[0].base_layer.weight.copy_(base[0].weight)
        theirs[0].base_layer.bias.copy_(base[0].bias)
        theirs[0].lora_A["default"].weight.copy_(ours.lora_A[0])
        theirs[0].lora_B["default"].weight.copy_(ours.lora_B[0])
    x = torch.randn(7, 16)
    torch.testing.assert_close(ours(x), theirs(x))


def test_dirlora_adds_a_pair_per_task_and_freezes_the_old_one():
    layer = LoRALinear(linear(), r=4, alpha=8)
    layer.add_task()
    layer.add_task()
    assert [p.requires_grad for p in (*layer.lora_A, *layer.lora_B)] == [False, True, False, True]


# --------------------------------------------------------------------------- MoELoRA


def test_moelora_equals_explicit_sum_over_experts():
    layer = MoELoRALinear(linear(), r=8, alpha=16, num_experts=4)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert abs(layer.lora_A.std().item() - 0.01) < 0.003  # A_n ~ N(0, 0.01)
    randomise([layer.lora_A, layer.lora_B, layer.router])
    x = torch.randn(3, 5, 16)
    g = (x @ layer.router.T).softmax(-1)  # (3, 5, N)
    want = F.linear(x, layer.weight, layer.bias)
    for n in range(4):
        A_n, B_n = layer.lora_A[2 * n:2 * n + 2], layer.lora_B[:, 2 * n:2 * n + 2]  # rank r/N = 2
        want = want + (16 / 8) * g[..., n:n + 1] * (x @ A_n.T @ B_n.T)
    torch.testing.assert_close(layer(x), want)


# --------------------------------------------------------------------------- BranchLoRA


def branch_layer(N=4, k=2, r=8, route="token"):
    layer = BranchLoRALinear(linear(), r=r, alpha=2 * r, num_branches=N, top_k=k, route=route)
    layer.add_task()
    randomise([layer.lora_A, *layer.lora_B, layer.routers[0]])
    return layer


def test_branchlora_computes_A_x_once(monkeypatch):
    layer = branch_layer()
    calls = []
    real = F.linear
    monkeypatch.setattr(adapters.F, "linear", lambda x, w, b=None: calls.append(w) or real(x, w, b))
    layer(torch.randn(2, 5, 16))
    assert sum(w is layer.lora_A for w in calls) == 1


def test_branchlora_exactly_k_nonzero_gates_per_token():
    layer = branch_layer(N=6, k=2)
    g = layer.gates(torch.randn(3, 7, 16))
    assert ((g != 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 7))


def test_branchlora_equals_explicit_top_k_sum():
    layer = branch_layer(N=4, k=2)
    x = torch.randn(2, 3, 16)
    logits = x @ layer.routers[0].T
    want = F.linear(x, layer.weight, layer.bias)
    for b in range(2):
        for t in range(3):
            top = logits[b, t].topk(2)
            for g_n, n in zip(top.values.softmax(-1), top.indices):
                want[b, t] += layer.scaling * g_n * (layer.lora_B[n] @ (layer.lora_A @ x[b, t]))
    torch.testing.assert_close(layer(x), want)


def test_branchlora_end_task_freezes_k_most_used_tunable_branches():
    layer = branch_layer(N=4, k=2)
    layer.train()
    with torch.no_grad():  # route every token to branches 1 and 3, branch 3 heavier
        layer.routers[0].zero_()
        layer.routers[0][1, 0], layer.routers[0][3, 0] = 1.0, 2.0
    x = torch.randn(4, 5, 16).abs()  # x[..., 0] > 0: logits 0, x0, 0, 2 x0
    layer(x)  # a training forward counts its gates
    assert layer.gate_tokens.item() == pytest.approx(20)
    assert layer.freeze_most_used() == [3, 1]
    assert [b.requires_grad for b in layer.lora_B] == [True, False, True, False]

    # frozen branches get no gradient, an optimiser step leaves them, and they still act
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    frozen = [layer.lora_B[n].clone() for n in (1, 3)]
    layer(x).pow(2).sum().backward()
    opt.step()
    assert layer.lora_B[1].grad is None and layer.lora_B[3].grad is None
    assert torch.equal(layer.lora_B[1], frozen[0]) and torch.equal(layer.lora_B[3], frozen[1])
    with torch.no_grad():
        before = layer(x)
        layer.lora_B[3] += 1.0
        assert not torch.allclose(layer(x), before)  # a frozen branch still contributes

    # next task: the k most used among the *tunable* ones (0 and 2) are frozen, whatever 1 and 3 did
    layer.add_task()
    with torch.no_grad():
        layer.routers[1].zero_()
        layer.routers[1][2, 0], layer.routers[1][3, 0] = 1.0, 2.0
    layer(x)
    assert layer.freeze_most_used() == [2, 0]
    assert not any(b.requires_grad for b in layer.lora_B)


def test_branchlora_new_router_per_task_old_router_unchanged_by_training():
    model = tiny_llava()
    m = make_method("branchlora", model, r=8, lora_alpha=16, num_branches=4, verbose=False)
    m.start_task(0)
    m.end_task(0)
    m.start_task(1)
    layer = m.layers[0]
    assert len(layer.routers) == 2 and not layer.routers[0].requires_grad and layer.routers[1].requires_grad
    old, new = layer.routers[0].clone(), layer.routers[1].clone()
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    b = batch()
    for _ in range(2):
        loss, n = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
        (loss / n + m.extra_loss(b, 1)).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.routers[0], old)
    assert not torch.equal(layer.routers[1], new)


def test_branchlora_sequence_routing_one_decision_per_sequence_kept_while_generating():
    layer = branch_layer(route="sequence")
    prompt = Tokens(mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())
    x = torch.randn(2, 4, 16)
    g = layer.gates(x, prompt)
    want = F.linear((x[0, :3].mean(0)), layer.routers[0])  # row 0: mean over its real tokens only
    assert set(torch.nonzero(g[0, 0]).flatten().tolist()) == set(want.topk(2).indices.tolist())
    assert g.shape == (2, 1, 4)
    step = Tokens(decoding=True, memory=prompt.memory)  # a decode step keeps the prompt's decision
    torch.testing.assert_close(layer.gates(torch.randn(2, 1, 16), step), g)
    other = layer.gates(torch.randn(2, 1, 16), Tokens())  # a new call with no prompt behind it routes afresh
    assert not torch.equal(other, g)


def test_branchlora_counts_gates_over_real_tokens_of_training_forwards_only():
    layer = branch_layer()
    x = torch.randn(2, 4, 16)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    layer.eval()
    layer(x, Tokens(mask=mask))
    assert layer.gate_tokens.item() == 0  # evaluation counts nothing
    layer.train()
    layer(x, Tokens(mask=mask))
    want = (layer.gates(x) * mask[..., None]).flatten(0, 1).sum(0)  # (N,) over the 5 real tokens
    torch.testing.assert_close(layer.gate_mass, want)
    assert layer.gate_tokens.item() == pytest.approx(5)
    tokens = Tokens(mask=mask)
    with tokens.recompute():  # gradient checkpointing's second forward counts nothing
        layer(x, tokens)
    assert layer.gate_tokens.item() == pytest.approx(5)


def test_l_align_by_hand():
    sel = TaskSelector(2, 3)
    sel.add_task()
    with torch.no_grad():
        sel.keys_img[0].copy_(torch.tensor([1.0, 1.0]))
        sel.keys_txt[0].copy_(torch.tensor([0.0, 0.0, 2.0]))
    e_img = torch.tensor([[1.0, 0.0], [3.0, 3.0]])  # cos = 1/sqrt2, 1
    e_txt = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # cos = 0, 1/sqrt2
    want = (1 - 1 / math.sqrt(2)) + 0 + 1 + (1 - 1 / math.sqrt(2))
    assert sel.align_loss(e_img, e_txt, 0).item() == pytest.approx(want, abs=1e-6)


def test_selector_picks_the_right_task_on_separable_embeddings():
    torch.manual_seed(0)
    centres_img, centres_txt = torch.randn(3, 8), torch.randn(3, 6)

    def sample(t, n):
        return centres_img[t] + 0.3 * torch.randn(n, 8), centres_txt[t] + 0.3 * torch.randn(n, 6)

    sel = TaskSelector(8, 6)
    for t in range(3):
        sel.add_task()
        opt = torch.optim.Adam([p for p in sel.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            sel.align_loss(*sample(t, 16), t).backward()
            opt.step()
    tests = [sample(t, 50) for t in range(3)]
    picked = torch.cat([sel.select(*tests[t]) for t in range(3)])
    assert torch.equal(picked, torch.arange(3).repeat_interleave(50))


# --------------------------------------------------------------------------- LiLoRA


def lilora_layer(tasks=1, r=6, r_task=3, seed=0):
    layer = LiLoRALinear(linear(seed=seed), r=r, alpha=2 * r, r_task=r_task)
    for _ in range(tasks):
        layer.add_task()
    return layer


def test_eq5_fusion_starts_as_sigmoid_of_standard_normal():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    phis = []
    for _ in range(400):
        layer = LiLoRALinear(base, r=6, alpha=12, r_task=3)
        layer.add_task()
        phis.append(layer.phi[0].detach())
    phis = torch.stack(phis)
    assert abs(phis.mean().item()) < 0.15 and abs(phis.std().item() - 1) < 0.1  # phi ~ N(0, 1)
    layer = lilora_layer()
    alpha = layer.fusion(0)
    assert 0 < alpha.item() < 1 and alpha.item() == pytest.approx(1 / (1 + math.exp(-layer.phi[0].item())))
    assert layer.phi[0].requires_grad
    # init: B0 and B~ zeros, so the layer starts as W0
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_eq6_delta_weight_is_the_layers_effective_weight():
    layer = lilora_layer(tasks=2)
    randomise([layer.lora_A, layer.lora_B0, *layer.task_A, *layer.task_B, *layer.phi])
    x = torch.randn(5, 16)
    for t in range(2):
        layer.task = t
        a = torch.sigmoid(layer.phi[t])
        hand = layer.scaling * (a * layer.lora_B0 + (1 - a) * layer.task_B[t] @ layer.task_A[t]) @ layer.lora_A
        torch.testing.assert_close(layer.delta_weight(), hand)
        torch.testing.assert_close(layer(x) - F.linear(x, layer.weight, layer.bias), x @ hand.T)


def test_eq7_eq8_regulariser_by_hand():
    layer = LiLoRALinear(nn.Linear(2, 2), r=2, alpha=2, r_task=1)
    layer.add_task()
    with torch.no_grad():
        layer.task_B[0].copy_(torch.tensor([[1.0], [0.0]]))
        layer.task_A[0].copy_(torch.tensor([[1.0, 0.0]]))  # B~0 A~0 = [[1, 0], [0, 0]]
        layer.lora_B0.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    layer.add_task()  # snapshot B0^{t-1}
    assert torch.equal(layer.B0_prev, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with torch.no_grad():
        layer.lora_B0 += torch.tensor([[1.0, 0.0], [0.0, -2.0]])  # ||B0 - B0_prev||^2 = 1 + 4 = 5
    # zero case: B~1 starts at zero, so cos = 0 and L_reg = 5
    assert layer.reg_loss().item() == pytest.approx(5.0)
    with torch.no_grad():
        layer.task_B[1].copy_(torch.tensor([[1.0], [1.0]]))
        layer.task_A[1].copy_(torch.tensor([[1.0, 0.0]]))  # B~1 A~1 = [[1, 0], [1, 0]]: cos = 1/sqrt2
    assert layer.reg_loss().item() == pytest.approx((1 - 1 / math.sqrt(2)) * 5.0)
    # sim_t carries no gradient: only B0 receives one
    layer.reg_loss().backward()
    assert layer.task_B[1].grad is None and layer.lora_B0.grad is not None


def lilora_model(tasks=2):
    model = tiny_llava()
    m = make_method("lilora", model, r=8, lora_alpha=16, verbose=False)
    for t in range(tasks):
        m.start_task(t)
        randomise([p for p in m.adapter_parameters() if p.requires_grad], seed=t, std=0.2)
        if t < tasks - 1:
            m.end_task(t)
    return model, m


def test_lilora_gradients_reach_exactly_the_current_tasks_parameters():
    model, m = lilora_model(tasks=2)
    b = batch()
    loss, n = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    (loss / n + m.step_loss(1)).backward()
    for layer in m.layers:
        for name, p in [("A", layer.lora_A), ("B0", layer.lora_B0), ("B~1", layer.task_B[1]),
                        ("A~1", layer.task_A[1]), ("phi1", layer.phi[1])]:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        for name, p in [("B~0", layer.task_B[0]), ("A~0", layer.task_A[0]), ("phi0", layer.phi[0]),
                        ("W0", layer.weight)]:
            assert p.grad is None, name
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_lilora_earlier_task_changes_only_through_A_and_B0():
    model, m = lilora_model(tasks=1)
    b = batch()
    with torch.no_grad():
        task0 = model(b["input_ids"], b["pixel_values"])
    shared = [(layer.lora_A.clone(), layer.lora_B0.clone()) for layer in m.layers]
    m.end_task(0)
    m.start_task(1)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=0.05)
    for _ in range(3):
        loss, n = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
        (loss / n + m.step_loss(1)).backward()
        opt.step()
        opt.zero_grad()
    m.use_task(0)
    with torch.no_grad():
        assert not torch.allclose(model(b["input_ids"], b["pixel_values"]), task0)  # A and B0 moved
        for layer, (A, B0) in zip(m.layers, shared):
            layer.lora_A.copy_(A)
            layer.lora_B0.copy_(B0)
        torch.testing.assert_close(model(b["input_ids"], b["pixel_values"]), task0, rtol=0, atol=0)


def test_lilora_merged_model_gives_identical_logits():
    model, m = lilora_model(tasks=2)
    b = batch()
    for t in (0, 1):
        m.use_task(t)
        with torch.no_grad():
            want = model(b["input_ids"], b["pixel_values"])
            m.merge(t)
            got = model(b["input_ids"], b["pixel_values"])
            m.unmerge()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lilora_freeze_basis_after_first_task():
    model = tiny_llava()
    m = make_method("lilora", model, r=8, lora_alpha=16, freeze_basis_after_first_task=True, verbose=False)
    m.start_task(0)
    assert m.layers[0].lora_B0.requires_grad
    m.start_task(1)
    assert not m.layers[0].lora_B0.requires_grad and m.layers[0].lora_A.requires_grad


@pytest.mark.parametrize("share_a_only", [False, True])
def test_lilora_freeze_a_after_first_task(share_a_only):
    m = make_method("lilora", tiny_llava(), r=8, lora_alpha=16, freeze_a_after_first_task=True,
                    share_a_only=share_a_only, verbose=False)
    m.start_task(0)
    assert m.layers[0].lora_A.requires_grad
    m.start_task(1)
    trainable = {id(p) for p in m.trainable_parameters()}
    assert all(id(layer.lora_A) not in trainable and id(layer.task_B[1]) in trainable for layer in m.layers)


# --------------------------------------------------------------------------- placement and counts


def test_placement_by_full_name_and_summary(capsys):
    model = tiny_llava()
    m = make_method("lilora", model, r=8, lora_alpha=16)
    assert "lilora: wrapped 8 linears (down_proj x2, gate_proj x2, linear_1 x1, linear_2 x1, up_proj x2)" in capsys.readouterr().out
    assert all(n.startswith(("language_model.layers.", "multi_modal_projector.")) for n in m.names)
    m2 = make_method("moelora", tiny_llava(), r=8, lora_alpha=16, verbose=False)
    assert len(m2.names) == 2 * 7 and not any("vision_tower" in n or "projector" in n for n in m2.names)
    with pytest.raises(ValueError, match="matches --target"):
        make_method("seqlora", tiny_llava(), target=r"nothing\.here", verbose=False)
    with pytest.raises(ValueError, match="unknown method 'si'"):
        make_method("si", tiny_llava())


def test_parameter_counts_equal_closed_form():
    cfg = tiny_config()
    C, I, L, Cv = 32, 48, 2, 24
    r, N = 8, 4
    kv = cfg.text.num_key_value_heads * (C // cfg.text.num_attention_heads)  # 16
    shapes_llm = [(C, C), (C, kv), (C, kv), (C, C), (C, I), (C, I), (I, C)]  # (in, out) q k v o gate up down
    shapes_ffp = [(C, I), (C, I), (I, C)]
    proj = [(Cv, C), (C, C)]
    lora = lambda shapes: sum(r * (i + o) for i, o in shapes)  # noqa: E731
    hp = dict(r=r, lora_alpha=2 * r)

    rep = parameter_report(cfg, "seqlora", 3, **hp)
    assert (rep["trainable"], rep["total_added"], rep["per_task"]) == (L * lora(shapes_llm),) * 2 + (0,)
    rep = parameter_report(cfg, "dirlora", 3, target="ffn+projector", **hp)
    per = L * lora(shapes_ffp) + lora(proj)
    assert (rep["trainable"], rep["total_added"], rep["per_task"]) == (per, 3 * per, per)
    rep = parameter_report(cfg, "moelora", 3, num_experts=N, **hp)
    moe = L * sum(r * (i + o) + N * i for i, o in shapes_llm)
    assert (rep["trainable"], rep["total_added"], rep["per_task"]) == (moe, moe, 0)
    rep = parameter_report(cfg, "branchlora", 3, num_branches=N, **hp)
    rb = r // N
    shared = L * sum(rb * i + N * o * rb for i, o in shapes_llm)
    router = L * sum(N * i for i, _ in shapes_llm)
    keys = Cv + C
    assert rep["trainable"] == shared + router + keys
    assert rep["per_task"] == router + keys
    assert rep["total_added"] == shared + 3 * (router + keys)
    rep = parameter_report(cfg, "lilora", 3, **hp)
    rt = r // 2
    all_lin = [*[s for s in shapes_ffp for _ in range(L)], *proj]
    shared = sum(r * (i + o) for i, o in all_lin)
    task = sum(o * rt + rt * r + 1 for i, o in all_lin)
    assert (rep["trainable"], rep["total_added"], rep["per_task"]) == (shared + task, shared + 3 * task, task)


def test_selector_reads_the_mean_clip_patch_feature_and_the_instruction_span():
    """e_img by hand from the vision tower's layer LLaVA reads (CLS dropped), e_txt the mean
    embedding of exactly the tokens the collator marks; L_align and the selection use them."""
    from minimcit.selector import sample_embeddings

    model = tiny_llava()
    m = make_method("branchlora", model, r=8, lora_alpha=16, num_branches=4, verbose=False)
    m.start_task(0)
    b = batch()
    e_img, e_txt = sample_embeddings(model, b["input_ids"], b["pixel_values"], b["instruction_mask"])
    with torch.no_grad():
        hidden = model.vision_tower(b["pixel_values"], model.config.vision_feature_layer)  # (B, 1 + 4, Cv)
        emb = model.language_model.embed_tokens(b["input_ids"][:, 5:8])  # (B, 3, C)
    torch.testing.assert_close(e_img, hidden[:, 1:].mean(1))
    torch.testing.assert_close(e_txt, emb.mean(1))
    torch.testing.assert_close(m.extra_loss(b, 0), m.selector.align_loss(e_img, e_txt, 0))
    assert m.select_tasks(b).tolist() == [0, 0]  # one task so far


def test_rank_must_split_evenly_across_experts_and_branches():
    for name, key in (("moelora", "num_experts"), ("branchlora", "num_branches")):
        with pytest.raises(ValueError, match=f"--r 10 must split evenly into --{key.replace('_', '-')} 4"):
            make_method(name, tiny_llava(), r=10, lora_alpha=20, verbose=False, **{key: 4})
    m = make_method("branchlora", tiny_llava(), r=12, lora_alpha=24, num_branches=4, verbose=False)
    m.start_task(0)
    assert m.layers[0].lora_A.shape == (3, 32) and m.layers[0].scaling == 2.0  # r_b = 12 / 4, s = alpha / r
    with pytest.raises(ValueError, match=r"--top-k must be between 1 and --num-branches \(4\), got 5"):
        make_method("branchlora", tiny_llava(), r=8, lora_alpha=16, num_branches=4, top_k=5, verbose=False)


def test_stages_are_data_joint_is_one_stage_of_every_task():
    for name in sorted(METHODS):
        m = make_method(name, tiny_llava(), r=8, lora_alpha=16, num_branches=4, verbose=False) if name == "branchlora" \
            else make_method(name, tiny_llava(), r=8, lora_alpha=16, verbose=False)
        want = [[0, 1, 2]] if name == "joint" else [[0], [1], [2]]
        assert m.stages(3) == want, name


def test_adapter_dropout_acts_on_the_adapter_input_while_training_only():
    """LoRA: y = W0 x + s B A drop(x), as peft's lora_dropout; MoELoRA draws one mask per expert, as
    CoIN's MoELoRA keeps a dropout per expert; eval mode and p = 0 leave the input alone."""
    m = make_method("seqlora", tiny_llava(), r=4, lora_alpha=8, dropout=0.5, verbose=False)
    m.start_task(0)
    layer = m.layers[0]
    randomise([layer.lora_A[0], layer.lora_B[0]])
    x = torch.randn(2, 3, layer.in_features)
    layer.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    kept = F.dropout(x, 0.5)  # the same mask, drawn by hand
    want = F.linear(x, layer.weight, layer.bias) + layer.scaling * kept @ layer.lora_A[0].T @ layer.lora_B[0].T
    torch.testing.assert_close(got, want)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias)
                               + layer.scaling * x @ layer.lora_A[0].T @ layer.lora_B[0].T)

    moe = make_method("moelora", tiny_llava(), r=8, lora_alpha=16, num_experts=4, dropout=0.5, verbose=False)
    layer = moe.layers[0]
    randomise([layer.lora_A, layer.lora_B, layer.router])
    layer.train()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)  # the masks, drawn by hand: the call's seed, then one mask per expert
    masks = list(adapters.expert_masks(x.detach(), 4, 0.5, int(torch.randint(2**62, ()))))
    assert not torch.equal(masks[0], masks[1]) and {0.0, 2.0} == set(masks[0].unique().tolist())
    g = (x @ layer.router.T).softmax(-1)
    want = F.linear(x, layer.weight, layer.bias)
    for n in range(4):  # CoIN's MoELoRA: expert n reads its own dropped copy of x
        A_n, B_n = layer.lora_A[2 * n:2 * n + 2], layer.lora_B[:, 2 * n:2 * n + 2]
        want = want + layer.scaling * g[..., n:n + 1] * ((x * masks[n]) @ A_n.T @ B_n.T)
    torch.testing.assert_close(got, want)
    # The backward draws the masks again instead of holding N dropped copies: the same gradients.
    up = torch.randn_like(got)
    ours = torch.autograd.grad(got, [x, layer.lora_A, layer.lora_B, layer.router], up)
    theirs = torch.autograd.grad(want, [x, layer.lora_A, layer.lora_B, layer.router], up)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="dropout must be in"):
        make_method("seqlora", tiny_llava(), r=4, lora_alpha=8, dropout=1.0, verbose=False)


@pytest.mark.parametrize("name,hp", [("seqlora", {}), ("moelora", {"num_experts": 4}), ("branchlora", {"num_branches": 4}),
                                     ("lilora", {}), ("olora", {})])
def test_bf16_layer_equals_the_fp32_update_within_bf16_rounding(name, hp):
    """Under autocast the layer adds h B^T into the bf16 base output in one GEMM, from x as it comes
    (no fp32 copy). Against the update computed in fp32 from x.float() and added after a cast,
    outputs and adapter gradients agree within bf16 rounding: 2^-6 of the largest value (bf16 keeps
    8 significant bits; the two paths round at different places)."""
    model = tiny_llava()
    m = make_method(name, model, r=8, lora_alpha=16, verbose=False, **hp)
    m.start_task(0)
    layer = m.layers[0]
    randomise(m.adapter_parameters(), seed=2, std=0.3)
    layer.weight.data, layer.bias = layer.weight.data.bfloat16(), None
    x = torch.randn(2, 5, layer.in_features).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        ours = layer(x)
    own = [p for p in layer.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(ours.float().square().sum(), own)
    with torch.autocast("cpu", enabled=False):
        ref = (F.linear(x, layer.weight).float() + F.linear(*layer.update(x.float()))).bfloat16()  # W0 x + h B^T
    ref_grads = torch.autograd.grad(ref.float().square().sum(), own)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=2**-6 * ref.float().abs().max().item())
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=2**-6 * b.abs().max().item())


def test_parameter_counts_at_the_13b_shape_equal_closed_form():
    """benchmarks/param_table.py's LLaVA-1.5-13B shape (40 layers, 5120 wide, MLP 13824): MoELoRA and
    BranchLoRA's task-1 trainable counts by hand, r=128, N=8."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.param_table import LLAVA_13B

    C, I, L, r, N = 5120, 13824, 40, 128, 8
    shapes = [(C, C)] * 4 + [(C, I), (C, I), (I, C)]  # (in, out) q k v o gate up down
    moe = L * sum(r * (i + o) + N * i for i, o in shapes)
    assert parameter_report(LLAVA_13B, "moelora", 8)["trainable"] == moe == 514_949_120
    branch = L * sum(r // N * i + o * r + N * i for i, o in shapes) + 1024 + C  # trunk, branches, router, keys
    assert parameter_report(LLAVA_13B, "branchlora", 8)["trainable"] == branch
