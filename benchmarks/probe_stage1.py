"""What MiniCoIN's stage-1 base has learned, and what its vision tower can learn.

    python benchmarks/probe_stage1.py base ~/.cache/minimcit/minicoin-base-default-*   # shape/colour accuracy of a base
    python benchmarks/probe_stage1.py vision --steps 2000 --lr 3e-4                     # the CLIP tower alone, supervised

`base` captions 80 unseen one-object and 80 two-object scenes and checks the first shape and
colour word of each caption. `vision` trains the default preset's CLIP tower from scratch, with
a linear head on mean patch features, on 6-way shape classification: an upper bound for what
stage 1 could teach it in the same number of steps.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimcit.data import Collator, Sample  # noqa: E402
from minimcit.minicoin import COLOURS, PRESETS, SHAPES, gen_gqa, gen_imagenet  # noqa: E402
from minimcit.model import CLIPVisionTower, Llava, VisionConfig  # noqa: E402
from minimcit.processing import LlavaPrompt, TextTokenizer, preprocess_image  # noqa: E402


def first(words, vocab):
    return next((w.strip(".") for w in words.split() if w.strip(".") in vocab), None)


def probe_base(path: Path):
    model = Llava.from_pretrained(path).eval()
    c = model.config
    tok = TextTokenizer(path)
    col = Collator(tok, LlavaPrompt(c.num_image_tokens, c.image_token_index, c.vision.image_size, plain=True))
    rng = np.random.default_rng(77)
    for gen in (gen_imagenet, gen_gqa):
        items = [gen(rng, c.vision.image_size) for _ in range(80)]
        b = col([Sample("probe", "", "", image=i.image) for i in items], prompt_only=True)
        out = model.generate(b["input_ids"], b["pixel_values"], b["attention_mask"], max_new_tokens=30,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        caps = [tok.decode(o) for o in out]
        shape = np.mean([first(i.caption, SHAPES) == first(o, SHAPES) for i, o in zip(items, caps)])
        colour = np.mean([first(i.caption, COLOURS) == first(o, COLOURS) for i, o in zip(items, caps)])
        print(f"{gen.__name__}: first shape right {shape:.2f}, first colour right {colour:.2f}")


def probe_vision(steps: int, lr: float, seed: int = 0):
    spec = PRESETS["default"].vision
    rng = np.random.default_rng(seed)

    def data(n):
        items = [gen_imagenet(rng, spec["image_size"]) for _ in range(n)]
        return (torch.stack([preprocess_image(i.image, spec["image_size"]) for i in items]),
                torch.tensor([SHAPES.index(i.answer) for i in items]))

    (xtr, ytr), (xte, yte) = data(3000), data(300)
    torch.manual_seed(seed)
    tower = CLIPVisionTower(VisionConfig(**spec))
    with torch.no_grad():
        for p in tower.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
    head = torch.nn.Linear(spec["hidden_size"], len(SHAPES))
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (32,))
        loss = torch.nn.functional.cross_entropy(head(tower(xtr[idx], -2)[:, 1:].mean(1)), ytr[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        acc = (head(tower(xte, -2)[:, 1:].mean(1)).argmax(-1) == yte).float().mean().item()
    print(f"vision tower alone, {steps} steps at lr {lr}: shape accuracy {acc:.2f} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("base").add_argument("path", type=Path)
    v = sub.add_parser("vision")
    v.add_argument("--steps", type=int, default=2000)
    v.add_argument("--lr", type=float, default=3e-4)
    a = p.parse_args()
    if a.cmd == "base":
        probe_base(a.path)
    else:
        probe_vision(a.steps, a.lr)
