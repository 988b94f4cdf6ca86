"""What the task selector's own vision pass costs a training step, and so what a hook that
reused the forward's CLIP features could save.

L_align needs e_img, the mean CLIP patch feature. `sample_embeddings` runs the frozen vision
tower for it (no gradient) instead of taking the features the training forward has just
computed through a hook. This prints, in one run, the median time of one BranchLoRA training
step (forward + loss + L_align + backward) and of the selector's extra vision pass alone, and
their ratio; then the same ratio by FLOP count at the LLaVA-1.5-7B shape.

    python benchmarks/bench_selector.py            # MiniCoIN `default` shapes, CPU, fp32
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimcit.methods import make_method  # noqa: E402
from minimcit.minicoin import PRESETS  # noqa: E402
from minimcit.model import Llava, LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from minimcit.selector import sample_embeddings  # noqa: E402


def main(reps: int = 15, batch: int = 16, text_len: int = 60):
    p = PRESETS["default"]
    cfg = LlavaConfig(vision=VisionConfig(**p.vision), text=TextConfig(vocab_size=800, **p.text), image_token_index=799)
    torch.manual_seed(0)
    model = Llava(cfg).requires_grad_(False)  # the base is frozen, as run.py freezes it
    method = make_method("branchlora", model, verbose=False, **p.adapter)
    method.start_task(0)
    n_img = cfg.num_image_tokens
    ids = torch.randint(3, 700, (batch, 1 + n_img + text_len))
    ids[:, 1:1 + n_img] = cfg.image_token_index
    instruction = torch.zeros_like(ids, dtype=torch.bool)
    instruction[:, 1 + n_img:1 + n_img + 20] = True
    labels = ids.clone()
    labels[:, :1 + n_img + 20] = -100
    b = {"input_ids": ids, "pixel_values": torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size),
         "attention_mask": torch.ones_like(ids), "instruction_mask": instruction, "labels": labels}

    def step():
        loss, n = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
        (loss / n + method.extra_loss(b, 0)).backward()
        model.zero_grad(set_to_none=True)

    def vision_pass():
        sample_embeddings(model, b["input_ids"], b["pixel_values"], b["instruction_mask"])

    model.train()
    times = {"step": [], "vision": []}
    for _ in range(reps):
        for name, fn in (("step", step), ("vision", vision_pass)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    s, v = statistics.median(times["step"]), statistics.median(times["vision"])
    print(f"MiniCoIN default, batch {batch}, {n_img} image + {text_len} text tokens, median of {reps}:")
    print(f"  training step {1e3 * s:.1f} ms, selector's vision pass {1e3 * v:.2f} ms, share {100 * v / s:.1f}%")

    # LLaVA-1.5-7B: CLIP ViT-L/14-336 forward (304M parameters, 577 tokens) against a training step
    # of the frozen 6.7B LLM on ~700 tokens (forward 2 N T, backward through activations ~2 N T more).
    clip = 2 * 304e6 * 577
    step7b = 4 * 6.7e9 * 700 + clip  # plus the forward's own vision pass (frozen: no backward through it)
    print(f"LLaVA-1.5-7B by FLOPs: selector's vision pass / training step = {100 * clip / step7b:.1f}%")


if __name__ == "__main__":
    main()
