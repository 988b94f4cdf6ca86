"""Gradient checkpointing changes memory only (SPEC §6): for every method and routing option the
same training micro-step gives the same gradients and the same method statistics with and
without it. The batch is right-padded, so a layer recomputed without the padding mask (per-
sequence routing, gate statistics) would show."""

import pytest
import torch
from test_adapters import batch, randomise, tiny_llava

from minimcit.methods import make_method
from minimcit.train import micro_step, step_loss

CASES = {
    "seqlora": {}, "dirlora": {}, "joint": {}, "moelora": dict(num_experts=4),
    "branchlora": dict(num_branches=4), "branchlora-sequence": dict(num_branches=4, route="sequence"),
    "lilora": {}, "replay": {}, "ewc": {}, "lwf": {}, "olora": {}, "seqlora-dora": dict(dora=True),
    "dirlora-selector": dict(use_selector=True), "smolora": {},
}


def padded_batch():
    b = batch(n=3, text=8)
    b["attention_mask"][1, -3:] = 0  # right padding, as the collator pads for training
    b["attention_mask"][2, -5:] = 0
    b["labels"][b["attention_mask"] == 0] = -100
    b["labels"][:, :6] = -100  # the prompt carries no loss
    return b


def one_step(name, hp, checkpointing):
    model = tiny_llava()
    torch.manual_seed(0)
    m = make_method(name.split("-")[0], model, r=8, lora_alpha=16, verbose=False, dropout=0.1, **hp)
    m.start_task(0)
    if name.startswith(("lwf", "olora", "lilora", "dirlora", "ewc", "branchlora")):
        m.end_task(0, lambda n: iter(()))  # a second task: the teacher, the orthogonality, L_reg, a new router
        m.start_task(1)
    randomise([p for p in m.adapter_parameters()], seed=3, std=0.2)
    model.train()
    b = padded_batch()
    n_tokens = int((b["labels"][:, 1:] != -100).sum())
    torch.manual_seed(1)  # adapter dropout draws the same masks in both runs
    loss = micro_step(model, m, b, n_tokens, 1, m.num_tasks - 1, "cpu", checkpointing=checkpointing)
    step_loss(m, m.num_tasks - 1, 1.0)
    grads = {n: p.grad for n, p in m.adapter_tensors().items() if getattr(p, "grad", None) is not None}
    stats = [s.clone() for s in m.statistics()]
    return loss, grads, stats


@pytest.mark.parametrize("name", CASES)
def test_checkpointing_gives_the_same_gradients(name):
    loss, grads, stats = one_step(name, CASES[name], False)
    loss_ckpt, grads_ckpt, stats_ckpt = one_step(name, CASES[name], True)
    assert grads and grads.keys() == grads_ckpt.keys()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-6, atol=1e-7, msg=n)
    for s, s_ckpt in zip(stats, stats_ckpt):  # BranchLoRA's gates: counted once, not again in the recompute
        torch.testing.assert_close(s_ckpt, s, rtol=0, atol=0)
