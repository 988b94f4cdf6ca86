"""Parameter accounting on the LLaVA-1.5-7B and -13B and Qwen2-VL-2B shapes (meta device: no memory), next to
the papers.

    python benchmarks/param_table.py

"MiB" = parameters x 2 bytes / 2^20, the unit that reproduces LiLoRA's Table 2 ("MB").
"""

import dataclasses
import sys

import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimcit.methods import parameter_report  # noqa: E402
from minimcit.model import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from minimcit.qwen2_vl import Qwen2VLConfig  # noqa: E402
from minimcit.qwen2_vl import VisionConfig as QwenVisionConfig  # noqa: E402

LLAVA_7B = LlavaConfig(
    vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14),
    text=TextConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5))
LLAVA_13B = dataclasses.replace(LLAVA_7B, text=dataclasses.replace(
    LLAVA_7B.text, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
    num_key_value_heads=40, head_dim=None))  # llava-hf/llava-1.5-13b-hf config.json
# Qwen/Qwen2-VL-2B-Instruct's config.json: a 675M-parameter tower (32 blocks of 1280, a 2 x 2 merger to 1536)
# and a 1.5B Qwen2 decoder (28 layers of 1536, 12 query heads sharing 2 KV heads, tied embeddings).
QWEN2_VL_2B = Qwen2VLConfig(
    vision=QwenVisionConfig(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16),
    text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                    max_position_embeddings=32768, tie_word_embeddings=True, qkv_bias=True, bos_token_id=151643,
                    eos_token_id=151645))
M, MIB = 1e6, lambda n: n * 2 / 2**20  # noqa: E731
# The papers' figures (None: not given). BranchLoRA's are trainable counts with the projector (which CoIN
# trains fully); LiLoRA's are TP and EP in its Table 2's "MB" (= MiB of bf16).
PAPER = {"7B": {"moelora": 350, "branchlora": 222, "lilora": (985.1, 104.6), "dirlora": (2143.9, 357.3)},
         "13B": {}, "2B": {}}


def projector(config) -> int:
    """The projector's parameters (LLaVA's mlp2x_gelu, Qwen2-VL's merger with its LayerNorm): trained in
    CoIN, not an adapter (SPEC §5)."""
    with torch.device("meta"):
        return sum(p.numel() for p in config.build().projector.parameters())


def main():
    for size, config in (("7B", LLAVA_7B), ("13B", LLAVA_13B), ("2B", QWEN2_VL_2B)):
        paper = PAPER[size]
        name = "Qwen2-VL-2B" if size == "2B" else f"LLaVA-1.5-{size}"
        print(f"{name}. BranchLoRA vs MoELoRA: trainable parameters while the first CoIN task trains "
              "(all seven LLM linears, r=128, N=8, k=2)")
        print(f"{'method':12s} {'adapters+routers':>17s} {'+ projector':>12s} {'paper':>7s}")
        for method in ("moelora", "branchlora"):
            rep = parameter_report(config, method, 8)
            print(f"{method:12s} {rep['trainable'] / M:16.1f}M {(rep['trainable'] + projector(config)) / M:11.1f}M "
                  f"{paper.get(method, '-'):>6}{'M' if method in paper else ' '}")
        print(f"(projector: {projector(config) / M:.1f}M; BranchLoRA's trainable count includes one router and the "
              "two selector keys of task 1)")

        print(f"\n{name}. LiLoRA vs DirLoRA (and SMoLoRA, N=8) on 6 CVIT tasks (FFN linears + both projector "
              "linears, r=128, r~=64)")
        print(f"{'method':10s} {'TP (MiB)':>9s} {'paper':>7s} {'EP (MiB)':>9s} {'paper':>7s} {'TP params':>10s}")
        for method in ("lilora", "dirlora", "smolora"):
            rep = parameter_report(config, method, 6, target="ffn+projector")
            tp, ep = paper.get(method, ("-", "-"))
            print(f"{method:10s} {MIB(rep['total_added']):9.1f} {tp:>7} {MIB(rep['per_task']):9.1f} {ep:>7} "
                  f"{rep['total_added'] / M:9.1f}M")
        print()


if __name__ == "__main__":
    main()
