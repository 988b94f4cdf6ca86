"""Training-step time of BranchLoRA vs MoELoRA, and LiLoRA vs DirLoRA, at equal settings, one run.

Each pair wraps copies of the same random base model and trains on the same batch: forward,
loss (+ the method's own loss: L_align for BranchLoRA, L_reg for LiLoRA from task 2), backward,
AdamW step. Timings alternate within a pair; medians are printed with the ratio.
Paper (BranchLoRA, LLaVA-1.5-7B, GPU): 51 vs 62 ms/batch, ratio 0.82.

    python benchmarks/bench_adapters.py          # tiny model, CPU, fp32
    python benchmarks/bench_adapters.py --7b     # LLaVA-1.5-7B shape, random weights, GPU, bf16 autocast
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimcit.methods import make_method  # noqa: E402
from minimcit.model import Llava, LlavaConfig, TextConfig, VisionConfig  # noqa: E402

TINY = LlavaConfig(vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=112, patch_size=14),
                   text=TextConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4),
                   image_token_index=7999)
LLAVA_7B = LlavaConfig(vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14),
                       text=TextConfig(vocab_size=32064, rms_norm_eps=1e-5))


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--7b", dest="big", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    cfg, device = (LLAVA_7B, "cuda") if args.big else (TINY, "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        base = Llava(cfg).to(torch.bfloat16 if args.big else torch.float32).requires_grad_(False)  # as run.py freezes it
    n_img = cfg.num_image_tokens
    ids = torch.randint(3, 7000, (args.batch, n_img + args.text_len), device=device)
    ids[:, 5:5 + n_img] = cfg.image_token_index
    b = {"input_ids": ids, "pixel_values": torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size,
                                                       device=device),
         "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(ids == cfg.image_token_index, -100)}
    print(f"{cfg.text.num_hidden_layers}-layer LLM, hidden {cfg.text.hidden_size}, batch {args.batch} x "
          f"{ids.shape[1]} tokens, r=128, N=8, k=2, {device}")

    def trainer(method, task):
        model = copy.deepcopy(base)  # each method wraps its own copy (7B bf16: 2 x 14 GB on the GPU)
        m = make_method(method, model, verbose=False)
        for t in range(task + 1):
            m.start_task(t)
        opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-4, fused=True)  # as the training loop will

        def step():
            with torch.autocast("cuda", torch.bfloat16, enabled=args.big):
                loss, n = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
                extra = m.extra_loss(b, task)
                (loss / n + (0 if extra is None else extra)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    for (a, b_), task in ((("branchlora", "moelora"), 0), (("lilora", "dirlora"), 1)):
        fa, fb = trainer(a, task), trainer(b_, task)
        timed(fa, device), timed(fb, device)
        ta, tb = zip(*[(timed(fa, device), timed(fb, device)) for _ in range(args.reps)])
        ma, mb = statistics.median(ta), statistics.median(tb)
        print(f"{a:10s} {ma * 1e3:8.1f} ms   {b_:10s} {mb * 1e3:8.1f} ms   ratio {a}/{b_} = {ma / mb:.2f}  "
              f"(task {task + 1})")
    adapter_only(device)


def adapter_only(device, reps=30):
    """One wrapped Linear (512 -> 1376, 512 tokens), forward + backward, minus the frozen base's
    own cost: what the method itself adds, free of the rest of the model."""
    from torch import nn

    from minimcit.adapters import BranchLoRALinear, MoELoRALinear

    torch.manual_seed(0)
    base = nn.Linear(512, 1376, device=device).requires_grad_(False)
    moe = MoELoRALinear(base, 128, 256, 8)
    branch = BranchLoRALinear(base, 128, 256, 8, 2)
    branch.add_task()
    x = torch.randn(1, 512, 512, device=device, requires_grad=True)
    fns = {"base": lambda: base(x).sum().backward(), "moelora": lambda: moe(x).sum().backward(),
           "branchlora": lambda: branch(x).sum().backward()}
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    extra = {k: med[k] - med["base"] for k in ("moelora", "branchlora")}
    print(f"adapter only (one 512->1376 linear, 512 tokens, fwd+bwd over the frozen base): "
          f"moelora +{extra['moelora'] * 1e3:.2f} ms, branchlora +{extra['branchlora'] * 1e3:.2f} ms, "
          f"ratio {extra['branchlora'] / extra['moelora']:.2f}")


if __name__ == "__main__":
    main()
