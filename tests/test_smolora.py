"""SMoLoRA against its own code re-expressed on identical weights (Minato-Zackie/SMoLoRA,
PEFT_SMoLoRA/peft/tuners/smolora.py, SMoLoraLinear.forward L405-481), and what trains."""

import pytest
import torch
import torch.nn.functional as F
from test_adapters import batch, randomise, tiny_llava

from minimcit.adapters import SMoLoRALinear
from minimcit.methods import make_method, parameter_report
from minimcit.model import Tokens


def code_forward(layer, x, ins_emb):
    """smolora.py's forward, line by line, with its experts' Linears as slices of our stacked A and B,
    and `ins_emb` (B, C) standing for current_ins_emb[self.ins_type] (one row there, expanded over the batch)."""
    N, r_e, s = layer.num_experts, layer.r_e, layer.scaling
    A = [layer.lora_A[i * r_e:(i + 1) * r_e] for i in range(N)]  # loraA[i].mlp.weight (r/N, in)
    B = [layer.lora_B[:, i * r_e:(i + 1) * r_e] for i in range(N)]  # loraB[i].mlp.weight (out, r/N)
    result = F.linear(x, layer.weight, layer.bias)
    x_emb = torch.mean(x, dim=1, keepdim=True)
    vu_router = F.linear(x_emb, layer.router_visual)
    top1_vu_router = torch.zeros_like(vu_router)
    _, max_indices = torch.max(vu_router, dim=-1, keepdim=True)
    top1_vu_router.scatter_(-1, max_indices, 1.0)
    if_router = F.linear(ins_emb, layer.router_instruction)  # (B, N/2)
    top1_if_router = torch.zeros_like(if_router)
    _, max_indices = torch.max(if_router, dim=-1, keepdim=True)
    top1_if_router.scatter_(-1, max_indices, 1.0)
    final_router = torch.cat((top1_vu_router, top1_if_router.unsqueeze(1)), dim=-1)
    vu_result, if_result = 0.0, 0.0
    for i in range(N // 2):
        vu_result += F.linear(F.linear(x, A[i]), B[i]) * s * final_router[:, :, i].unsqueeze(-1)
    for i in range(N // 2, N):
        if_result += F.linear(F.linear(x, A[i]), B[i]) * s * final_router[:, :, i].unsqueeze(-1)
    score_A = F.linear(vu_result, layer.mix_visual)
    score_B = F.linear(if_result, layer.mix_instruction)
    attention_weights = F.softmax(torch.cat([score_A, score_B], dim=-1), dim=-1)
    alpha_A, alpha_B = attention_weights[:, :, 0].unsqueeze(-1), attention_weights[:, :, 1].unsqueeze(-1)
    return result + alpha_A * vu_result + alpha_B * if_result


def smolora_layer(seed=0):
    torch.manual_seed(seed)
    layer = SMoLoRALinear(torch.nn.Linear(16, 12), r=8, alpha=16, num_experts=8, instruction_dim=10)
    randomise([layer.lora_B], seed=seed)  # B = 0 at init would hide every routing decision
    return layer


@pytest.mark.parametrize("same_instruction", [True, False])
def test_layer_equals_the_code_on_identical_weights(same_instruction):
    layer = smolora_layer()
    x = torch.randn(6, 5, 16)
    e = torch.randn(1 if same_instruction else 6, 10).expand(6, -1)  # the code: one row for the whole batch
    got = layer(x, Tokens(instruction=e))
    torch.testing.assert_close(got, code_forward(layer, x, e))
    g = layer.routes(x, Tokens(instruction=e))[:, 0]  # (B, N): two experts per row, one from each half
    assert g[:, :4].sum(1).tolist() == [1] * 6 and g[:, 4:].sum(1).tolist() == [1] * 6
    assert len(set(map(tuple, g[:, :4].tolist()))) > 1  # the rows' visual experts differ: the test sees routing


def test_a_hard_top1_sends_no_gradient_to_the_routers_in_the_code():
    """The code marks its routers trainable on task 1, but zeros + scatter(1.0) is a constant: after a
    backward through its forward they hold no gradient, while the experts and w_a, w_b do."""
    layer = smolora_layer()
    for p in (layer.router_visual, layer.router_instruction, layer.lora_A, layer.lora_B, layer.mix_visual):
        p.requires_grad_(True)
    code_forward(layer, torch.randn(3, 5, 16), torch.randn(3, 10)).pow(2).sum().backward()
    assert layer.router_visual.grad is None and layer.router_instruction.grad is None
    assert layer.lora_A.grad.abs().sum() > 0 and layer.mix_visual.grad.abs().sum() > 0
    fresh = smolora_layer()
    assert not fresh.router_visual.requires_grad and not fresh.router_instruction.requires_grad  # frozen from init


def test_init_scaling_and_what_trains_on_every_task():
    model = tiny_llava()
    m = make_method("smolora", model, r=8, lora_alpha=16, verbose=False)
    assert all(n.endswith(("gate_proj", "up_proj", "down_proj", "linear_1", "linear_2")) for n in m.names)
    assert len(m.names) == 2 * 3 + 2  # the FFN of both layers and the projector's two linears
    m.start_task(0)
    layer = m.layers[0]
    assert layer.scaling == 2.0 and layer.r_e == 1  # s = alpha / r with r the total rank; experts of rank r/N
    assert torch.all(layer.lora_B == 0) and 0.005 < layer.lora_A.std() < 0.02  # B zeros, A normal std 0.01
    trainable = {id(p) for p in m.trainable_parameters()}
    m.end_task(0)
    m.start_task(1)
    assert {id(p) for p in m.trainable_parameters()} == trainable  # one set of tensors, trained on every task
    assert all({id(layer.lora_A), id(layer.lora_B), id(layer.mix_visual), id(layer.mix_instruction)} <= trainable
               and id(layer.router_visual) not in trainable for layer in m.layers)
    rep = parameter_report(model.config, "smolora", 3, r=8, lora_alpha=16)
    per_layer = [8 * (la.in_features + la.out_features) + 2 * la.out_features for la in m.layers]
    routers = [4 * la.in_features + 4 * model.config.text.hidden_size for la in m.layers]
    assert (rep["trainable"], rep["total_added"], rep["per_task"]) == (sum(per_layer), sum(per_layer) + sum(routers), 0)
    with pytest.raises(ValueError, match="--num-experts must be even"):
        make_method("smolora", tiny_llava(), r=6, num_experts=3, verbose=False)


def test_the_model_gives_every_layer_its_samples_instruction_and_keeps_the_prompts_expert_when_decoding():
    """e_ins = the mean frozen input embedding of the instruction span (Decision), the projector's
    rows one per image; padding does not move a row's expert; generate's first token = the forward's."""
    model = tiny_llava()
    m = make_method("smolora", model, r=8, lora_alpha=16, verbose=False)
    m.start_task(0)
    randomise([p for layer in m.layers for p in (layer.lora_B, layer.mix_visual)], std=0.5)
    b = batch(n=2)
    e = model.instruction_embedding(b["input_ids"], b["instruction_mask"])
    emb = model.language_model.embed_tokens(b["input_ids"][:, 5:8]).mean(1)
    torch.testing.assert_close(e, emb)
    with pytest.raises(ValueError, match="call the model with instruction_mask"):
        model(b["input_ids"], b["pixel_values"], b["attention_mask"])
    with torch.no_grad():
        logits = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["instruction_mask"])
        # Row 1 alone, left-padded by three tokens: the same logits at its real tokens.
        pad = torch.zeros(1, 3, dtype=torch.long)
        ids = torch.cat([pad, b["input_ids"][1:]], 1)
        mask = torch.cat([pad, b["attention_mask"][1:]], 1)
        inst = torch.cat([pad.bool(), b["instruction_mask"][1:]], 1)
        padded = model(ids, b["pixel_values"][1:], mask, inst)
        torch.testing.assert_close(padded[0, 3:], logits[1], rtol=1e-4, atol=1e-4)
        first = model.generate(ids, b["pixel_values"][1:], mask, max_new_tokens=3, eos_token_id=None,
                               instruction_mask=inst)
    assert first[0, 0] == logits[1, -1].argmax()
    proj = m.layers[-1]  # multi_modal_projector.linear_2: one row per image, its sample's e_ins
    h = torch.randn(2, 4, proj.in_features)
    torch.testing.assert_close(proj(h, Tokens(instruction=e))[1:], proj(h[1:], Tokens(instruction=e[1:])))


def test_a_batch_mixing_text_only_and_image_rows_routes_each_image_by_its_own_sample():
    """pixel_values hold only the image rows' images: the projector's adapters must see those rows'
    instructions, so each row's logits are those it has alone."""
    model = tiny_llava()
    m = make_method("smolora", model, r=8, lora_alpha=16, verbose=False)
    m.start_task(0)
    randomise([p for layer in m.layers for p in (layer.lora_B, layer.mix_visual)], std=0.5)
    b = batch(n=3)
    b["input_ids"][0, 1:5] = 7  # row 0 text-only: its image tokens become text
    px = b["pixel_values"][1:]
    proj = m.layers[-2]  # multi_modal_projector.linear_1
    e = model.instruction_embedding(b["input_ids"], b["instruction_mask"])
    picks = F.linear(e, proj.router_instruction).argmax(-1).tolist()
    assert picks[0] != picks[1] or picks[1] != picks[2]  # the rows' instructions pick different experts
    with torch.no_grad():
        together = model(b["input_ids"], px, b["attention_mask"], b["instruction_mask"])
        for i, images in ((0, None), (1, px[:1]), (2, px[1:])):
            alone = model(b["input_ids"][i:i + 1], images, b["attention_mask"][i:i + 1], b["instruction_mask"][i:i + 1])
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)
