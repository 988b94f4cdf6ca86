"""Our LLaVA against transformers' LlavaForConditionalGeneration, with weights passing
through our loader from every checkpoint layout."""

import pytest
import torch
from conftest import hf_llava, sample_inputs, write_hf, write_hub, write_original

from minimcit.model import Llava

LAYOUTS = ["v5", "v5-sharded", "hub", "original", "original+bin", "original+safetensors"]


def load(layout, hf_model, tmp_path, **kw):
    """Write hf_model in `layout`, load it with from_pretrained; returns (model, image token id)."""
    if layout.startswith("v5"):
        return Llava.from_pretrained(write_hf(hf_model, tmp_path / "ckpt", shard=layout == "v5-sharded"), **kw), None
    if layout == "hub":
        return Llava.from_pretrained(write_hub(hf_model, tmp_path / "hub"), **kw), None
    projector = layout.partition("+")[2] or "inside"
    llm, clip, proj = write_original(hf_model, tmp_path, projector=projector)
    return Llava.from_pretrained(llm, vision_tower=clip, projector=proj, **kw), -200


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(tiny_name, layout, tmp_path):
    ref = hf_llava(tiny_name)
    ours, image_token = load(layout, ref, tmp_path)
    ids, px = sample_inputs(ref)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px).logits
        our_ids = ids if image_token is None else ids.masked_fill(ids == ref.config.image_token_index, image_token)
        got = ours(our_ids, px)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_sharded_checkpoint_really_has_shards(tmp_path):
    folder = write_hf(hf_llava("gqa"), tmp_path / "ckpt", shard=True)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2


def test_right_padded_batch_matches_per_row(tmp_path):
    """Padding must not change a real token's logits (the causal fast path for right padding)."""
    ref = hf_llava("gqa")
    ours, _ = load("v5", ref, tmp_path)
    ids, px = sample_inputs(ref)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with torch.no_grad():
        batched = ours(ids, px, attention_mask=mask)
        alone = ours(ids[1:, :-4], px[1:])
    torch.testing.assert_close(batched[1, :-4], alone[0])


def test_left_padded_batch_matches_per_row(tmp_path):
    ref = hf_llava("mha")
    ours, _ = load("v5", ref, tmp_path)
    ids, px = sample_inputs(ref)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        batched = ours(ids, px, attention_mask=mask)
        alone = ours(ids[:1, 2:], px[:1])
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[0, 2:], alone[0])


def test_vision_features_match_clip_hidden_states(tiny_name, tmp_path):
    ref = hf_llava(tiny_name)
    ours, _ = load("v5", ref, tmp_path)
    _, px = sample_inputs(ref)
    with torch.no_grad():
        want = ref.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = ours.vision_tower(px, -2)[:, 1:]
        torch.testing.assert_close(got, want)
        projected = torch.stack(ref.model.get_image_features(px).pooler_output)  # list of (P, C) per image
        torch.testing.assert_close(ours.image_features(px), projected)


def test_greedy_generation_matches_transformers(tiny_name, tmp_path):
    """Two prompts of different lengths, left-padded, 16 new tokens, KV cache on both sides."""
    ref = hf_llava(tiny_name)
    ours, _ = load("v5", ref, tmp_path)
    ids, px = sample_inputs(ref, text_len=11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is three tokens shorter: shift it right behind three pads
    ids[1] = torch.cat([torch.zeros(3, dtype=ids.dtype), ids[1, :-3]])
    eos = ref.config.text_config.eos_token_id
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=16,
                            do_sample=False, eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, px, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want), f"\nours {got}\ntransformers {want}"


def test_generation_stops_at_eos_and_pads(tmp_path):
    ref = hf_llava("mha")
    ours, _ = load("v5", ref, tmp_path)
    ids, px = sample_inputs(ref)
    free = ours.generate(ids, px, max_new_tokens=6, eos_token_id=None)
    # Declare row 0's third token the eos: row 0 must stop there and be padded afterwards.
    eos = int(free[0, 2])
    got = ours.generate(ids, px, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(got[0, :first + 1], free[0, :first + 1])
    assert (got[0, first + 1:] == 0).all()
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(got, want)


def test_tied_embeddings_load_and_match(tmp_path):
    ref = hf_llava("mha", tie_word_embeddings=True)
    ref.tie_weights()
    ours, _ = load("v5", ref, tmp_path)
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    ids, px = sample_inputs(ref)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, px), ref(input_ids=ids, pixel_values=px).logits)


def test_loads_into_requested_dtype(tmp_path):
    ref = hf_llava("gqa")
    ours, _ = load("v5", ref, tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in ours.parameters())
    ids, px = sample_inputs(ref)
    with torch.no_grad():
        got = ours(ids, px).float()
        want = ref(input_ids=ids, pixel_values=px).logits
    # bf16 keeps 8 bits of mantissa: close in bulk, not to fp32 tolerance.
    assert (got - want).abs().mean() < 0.05 * want.abs().mean()


def test_save_then_load_round_trip(tmp_path):
    from minimcit.checkpoint import save_llava

    ref = hf_llava("gqa")
    ours, _ = load("v5", ref, tmp_path)
    save_llava(ours, tmp_path / "saved")
    again = Llava.from_pretrained(tmp_path / "saved")
    ids, px = sample_inputs(ref)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, px), ours(ids, px), rtol=0, atol=0)
    # and transformers reads what we wrote
    from transformers import LlavaForConditionalGeneration

    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, pixel_values=px).logits, ref(input_ids=ids, pixel_values=px).logits)


def test_loss_equals_transformers_loss(tmp_path):
    """Summed answer-token cross-entropy / count equals transformers' mean loss with the same labels."""
    ref = hf_llava("gqa")
    ours, _ = load("v5", ref, tmp_path)
    ids, px = sample_inputs(ref)
    labels = ids.clone()
    labels[:, :-4] = -100  # only the last four tokens are "answer"
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, labels=labels).loss
        total, n = ours.loss(ids, px, labels=labels)
    assert n == 2 * 4  # each labelled token is predicted from the position before it
    torch.testing.assert_close(total / n, want)


def test_loaded_weights_are_writable_and_leave_the_file_alone(tmp_path):
    """fp32 weights may be zero-copy views of the safetensors file; an optimiser step on them
    must change the parameter, never the checkpoint on disk."""
    from safetensors.torch import load_file

    folder = write_hf(hf_llava("mha"), tmp_path / "ckpt")
    before = load_file(folder / "model.safetensors")["language_model.model.norm.weight"].clone()
    ours = Llava.from_pretrained(folder)
    with torch.no_grad():
        ours.language_model.norm.weight.add_(1.0)
    assert torch.equal(ours.language_model.norm.weight, before + 1.0)
    assert torch.equal(load_file(folder / "model.safetensors")["language_model.model.norm.weight"], before)


def test_rms_norm_is_llamas_in_fp32_and_within_one_bf16_rounding_of_it():
    """Our RMSNorm (torch's rms_norm: fused on CUDA) against transformers' LlamaRMSNorm: equal bit
    for bit in fp32; in bf16 ours rounds once, after the weight, theirs also before it, so the two
    differ by at most one bf16 step (2^-7 relative) and mostly not at all. Gradients likewise."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from minimcit.model import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 64, generator=g) * 3
    w = 1 + 0.1 * torch.randn(64, generator=g)
    ours, theirs = RMSNorm(64, 1e-6), LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert torch.equal(ours(xa), theirs(xb))
    ours(xa).pow(2).sum().backward()
    theirs(xb).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)

    ours.bfloat16(), theirs.bfloat16()
    a, b = ours(x.bfloat16()).float(), theirs(x.bfloat16()).float()
    assert a.dtype == b.dtype == torch.float32
    assert ((a - b).abs() <= 2 ** -7 * b.abs()).all()
    assert (a == b).float().mean() > 0.5
