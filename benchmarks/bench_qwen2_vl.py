"""Ours vs transformers + peft on one tiny-but-not-trivial Qwen2-VL: a LoRA training step, same weights,
same batch, one run.

The step is what run.py's is for SeqLoRA: forward, loss on the answer tokens, backward, AdamW, with the
base frozen and LoRA (r 8, alpha 16, no dropout) on the seven linears of every decoder layer. Ours:
minimcit's Qwen2VL (loaded from transformers' save_pretrained) with make_method("seqlora");
theirs: Qwen2VLForConditionalGeneration with peft's LoRA on the same linears. Median of --reps,
alternating so machine noise hits both alike; ratio = theirs / ours (> 1: ours faster). Also the
greedy generation throughput of the two base models, and how far apart their losses are.

    python benchmarks/bench_qwen2_vl.py --reps 7
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimcit.methods import make_method  # noqa: E402
from minimcit.qwen2_vl import ImagePatches, Qwen2VL, image_patches  # noqa: E402

IMAGE, START, END = 7995, 7996, 7997
TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def hf_model():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, bos_token_id=None, eos_token_id=3, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
        vision_config=dict(depth=4, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4),
        image_token_id=IMAGE, video_token_id=7998, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=True)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    theirs = hf_model()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = Qwen2VL.from_pretrained(tmp).eval()
    rng = np.random.default_rng(0)
    sizes = [(112, 112), (84, 140), (140, 84), (112, 112)][:args.batch]  # several grids in one batch
    parts = [image_patches(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for h, w in sizes]
    px = ImagePatches.of(parts)
    g = torch.Generator().manual_seed(0)
    rows = [[5, START, *[IMAGE] * (t * h * w // 4), END,
             *torch.randint(10, 7900, (args.text_len,), generator=g).tolist()] for _, (t, h, w) in parts]
    T = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding, as the training collator does
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        labels[i, len(r) - args.answer_len:len(r)] = ids[i, len(r) - args.answer_len:len(r)]
    n_img = sum(t * h * w // 4 for _, (t, h, w) in parts)
    print(f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, batch {args.batch}: {n_img} image "
          f"tokens ({[g for _, g in parts]} patch grids) + {args.text_len} text tokens each, {args.answer_len} "
          "labelled, fp32, CPU")

    ours.requires_grad_(False)
    method = make_method("seqlora", ours, r=8, lora_alpha=16, dropout=0.0, verbose=False)
    method.start_task(0)
    opt_ours = torch.optim.AdamW(method.parameter_groups(), lr=1e-4)
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
    n_ours = sum(p.numel() for g in opt_ours.param_groups for p in g["params"])
    n_theirs = sum(p.numel() for g in opt_theirs.param_groups for p in g["params"])
    assert n_ours == n_theirs, (n_ours, n_theirs)

    hf_inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=px.patches, image_grid_thw=px.grid_thw,
                     mm_token_type_ids=(ids == IMAGE).int())
    losses = {}

    def step_ours():
        logits, target = ours.answer_logits(ids, px, mask, labels)
        loss = F.cross_entropy(logits, target)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        losses.setdefault("ours", loss.item())

    def step_theirs():
        loss = theirs(**hf_inputs, labels=labels).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        losses.setdefault("theirs", loss.item())

    left = ids.clone()  # generation prompts: the first 40 text tokens, left-padded
    prompt = [r[:len(r) - args.text_len + 40] for r in rows]
    P = max(map(len, prompt))
    left, lmask = torch.zeros(len(prompt), P, dtype=torch.long), torch.zeros(len(prompt), P, dtype=torch.long)
    for i, r in enumerate(prompt):
        left[i, P - len(r):], lmask[i, P - len(r):] = torch.tensor(r), 1

    def gen_ours():
        with torch.no_grad(), method.base_model():
            return ours.generate(left, px, lmask, max_new_tokens=args.new_tokens, eos_token_id=None)

    def gen_theirs():
        with torch.no_grad(), theirs.disable_adapter():
            return theirs.generate(input_ids=left, attention_mask=lmask, pixel_values=px.patches,
                                   image_grid_thw=px.grid_thw, mm_token_type_ids=(left == IMAGE).int(),
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    results = {}
    for name, a, b in (("LoRA step (s)", step_ours, step_theirs), ("generate (s)", gen_ours, gen_theirs)):
        timed(a), timed(b)  # warm-up (the steps' first: AdamW's state)
        ta, tb = [], []
        for _ in range(args.reps):
            ta.append(timed(a)[0])
            tb.append(timed(b)[0])
        results[name] = (statistics.median(ta), statistics.median(tb))
    print(f"first-step loss: ours {losses['ours']:.6f}, theirs {losses['theirs']:.6f} "
          f"(|diff| {abs(losses['ours'] - losses['theirs']):.1e}); trainable {n_ours / 1e6:.2f}M each")
    print(f"{'':16s} {'ours':>10s} {'theirs':>10s} {'ratio (theirs/ours)':>20s}")
    for name, (a, b) in results.items():
        print(f"{name:16s} {a:10.4f} {b:10.4f} {b / a:20.2f}")


if __name__ == "__main__":
    main()
