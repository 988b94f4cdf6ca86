"""minimcit command line.

The continual run (--method/--tasks) arrives with the training-loop issue; until then
`--demo` exercises the model end to end: a tiny random LLaVA written in the llava-hf layout,
loaded back through from_pretrained, fed a preprocessed image, decoded greedily.
"""

import argparse
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw

from minimcit.checkpoint import save_llava
from minimcit.model import Llava, LlavaConfig, TextConfig, VisionConfig, num_parameters
from minimcit.processing import preprocess_image


def demo(seed: int) -> None:
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                            image_size=112, patch_size=14),
        text=TextConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2),
        image_token_index=2047)
    with tempfile.TemporaryDirectory() as tmp:
        save_llava(Llava(cfg), tmp)
        model = Llava.from_pretrained(tmp).eval()
    print(f"tiny LLaVA: {num_parameters(model) / 1e6:.1f}M parameters, {cfg.num_image_tokens} image tokens")

    img = Image.new("RGB", (160, 90), "white")
    ImageDraw.Draw(img).ellipse((50, 10, 110, 80), fill="red")
    pixels = preprocess_image(img, cfg.vision.image_size)[None]  # (1, 3, 112, 112)
    prompt = torch.randint(3, 2000, (1, 12))
    ids = torch.cat([prompt[:, :4], torch.full((1, cfg.num_image_tokens), cfg.image_token_index), prompt[:, 4:]], 1)
    t0 = time.perf_counter()
    out = model.generate(ids, pixels, max_new_tokens=32, eos_token_id=None)
    dt = time.perf_counter() - t0
    print(f"generated {out.shape[1]} tokens in {dt:.2f}s ({out.shape[1] / dt:.0f} tokens/s): {out[0].tolist()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="run the tiny-model demo")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.demo:
        p.print_help()
        return 0
    demo(args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
