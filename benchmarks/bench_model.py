"""Ours vs transformers on one tiny-but-not-trivial LLaVA, same weights, same batch, one run.

Prints the median time of a training step (forward + loss + backward with the base frozen and
the projector trainable, as in LLaVA's stage 1, so gradients cross the whole LLM; labels on the
text tokens only, each library through its own loss API) and greedy
generation throughput, and the ratio transformers/ours (> 1 means ours is faster).
Timings alternate between the two implementations so machine noise hits both alike.

    python benchmarks/bench_model.py            # CPU, fp32
    python benchmarks/bench_model.py --7b       # GPU, bf16, LLaVA-1.5-7B shape, random weights
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimcit.model import Llava  # noqa: E402


def hf_model(size: str, dtype, device):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if size == "7b":
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
        tc = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
        image_token = 32000
    else:
        vc = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=112, patch_size=14)
        tc = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
        image_token = 7999
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    return model


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--7b", dest="big", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    device = "cuda" if args.big else "cpu"
    dtype = torch.bfloat16 if args.big else torch.float32
    torch.manual_seed(0)
    theirs = hf_model("7b" if args.big else "tiny", dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = Llava.from_pretrained(tmp, dtype=dtype, device=device)
    c = theirs.config
    n_img = (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    print(f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, batch {args.batch}, "
          f"{n_img} image + {args.text_len} text tokens, {dtype}, {device}")

    ids = torch.randint(3, c.image_token_index, (args.batch, n_img + args.text_len), device=device)
    ids[:, 5:5 + n_img] = c.image_token_index
    px = torch.randn(args.batch, 3, c.vision_config.image_size, c.vision_config.image_size, device=device, dtype=dtype)
    labels = ids.masked_fill(ids == c.image_token_index, -100)
    for m, proj in ((ours, ours.multi_modal_projector), (theirs, theirs.model.multi_modal_projector)):
        m.requires_grad_(False)
        proj.requires_grad_(True)

    def step_ours():
        loss_sum, n = ours.loss(ids, px, labels=labels)
        (loss_sum / n).backward()

    def step_theirs():
        theirs(input_ids=ids, pixel_values=px, labels=labels).loss.backward()

    def gen_ours():
        return ours.generate(ids, px, max_new_tokens=args.new_tokens, eos_token_id=None)

    def gen_theirs():
        return theirs.generate(input_ids=ids, pixel_values=px, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False)

    results = {}
    for name, a, b in (("train step (s)", step_ours, step_theirs), ("generate (s)", gen_ours, gen_theirs)):
        timed(a, device), timed(b, device)  # warm-up
        ta, tb = [], []
        for _ in range(args.reps):
            ta.append(timed(a, device)[0])
            tb.append(timed(b, device)[0])
        results[name] = (statistics.median(ta), statistics.median(tb))
    peak = None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30

    print(f"{'':16s} {'ours':>10s} {'transformers':>13s} {'ratio (theirs/ours)':>20s}")
    for name, (a, b) in results.items():
        print(f"{name:16s} {a:10.4f} {b:13.4f} {b / a:20.2f}")
    toks = args.batch * args.new_tokens
    a, b = results["generate (s)"]
    print(f"{'tokens/s':16s} {toks / a:10.1f} {toks / b:13.1f} {(toks / a) / (toks / b):20.2f}")
    if peak is not None:
        print(f"peak GPU memory (both models resident): {peak:.1f} GiB")


if __name__ == "__main__":
    main()
