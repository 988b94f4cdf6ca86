"""Peak memory of Llava.from_pretrained against the size of the model it builds.

Writes a random LLaVA checkpoint of about --gb GB (fp32) in the llava-hf layout, then loads it
in a fresh process, once per dtype, and prints peak resident memory over the process's
baseline divided by the loaded model's bytes. A loader that materialised a second full copy
(state dict + model) would print about 2.0; the target is <= 1.2.

    python benchmarks/bench_load.py --gb 1
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import resource, sys, torch
sys.path.insert(0, {root!r})
from minimcit.model import Llava
torch.ones(1)  # load torch's own memory into the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = Llava.from_pretrained({path!r}, dtype=getattr(torch, {dtype!r}))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for p in m.parameters())
print(f"{{(peak - base) * 1024 / 2**30:.2f}} {{size / 2**30:.2f}}")
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=1.0)
    args = p.parse_args()
    import torch

    from minimcit.checkpoint import save_llava
    from minimcit.model import Llava, LlavaConfig, TextConfig, VisionConfig

    layers = max(1, round(args.gb * 2**30 / 4 / (12 * 1024 * 1024 + 3 * 1024 * 2816)))  # ~params per layer
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=56, patch_size=14),
                      text=TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=layers, num_attention_heads=16))
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            model = Llava(cfg)
        model.to_empty(device="cpu")
        for prm in model.parameters():
            torch.nn.init.normal_(prm, std=0.02)
        save_llava(model, tmp)
        del model
        print(f"checkpoint: {sum(f.stat().st_size for f in Path(tmp).glob('*.safetensors')) / 2**30:.2f} GiB fp32")
        print(f"{'dtype':10s} {'peak over baseline (GiB)':>25s} {'model (GiB)':>12s} {'ratio':>6s}")
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=root, path=tmp, dtype=dtype)],
                                 capture_output=True, text=True, check=True).stdout.split()
            peak, size = float(out[0]), float(out[1])
            print(f"{dtype:10s} {peak:25.2f} {size:12.2f} {peak / size:6.2f}")


if __name__ == "__main__":
    main()
