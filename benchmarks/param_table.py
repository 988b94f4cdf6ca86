"""Parameter accounting on the LLaVA-1.5-7B shape (meta device: no memory), next to the papers.

    python benchmarks/param_table.py

"MiB" = parameters x 2 bytes / 2^20, the unit that reproduces LiLoRA's Table 2 ("MB").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimcit.methods import parameter_report  # noqa: E402
from minimcit.model import LlavaConfig, TextConfig, VisionConfig  # noqa: E402

LLAVA_7B = LlavaConfig(
    vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14),
    text=TextConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5))
PROJECTOR = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)  # mlp2x_gelu, trained in CoIN, not an adapter
M, MIB = 1e6, lambda n: n * 2 / 2**20  # noqa: E731


def main():
    print("BranchLoRA vs MoELoRA: trainable parameters while the first CoIN task trains "
          "(all seven LLM linears, r=128, N=8, k=2)")
    print(f"{'method':12s} {'adapters+routers':>17s} {'+ projector':>12s} {'paper':>7s}")
    for method, paper in (("moelora", 350), ("branchlora", 222)):
        rep = parameter_report(LLAVA_7B, method, 8)
        print(f"{method:12s} {rep['trainable'] / M:16.1f}M {(rep['trainable'] + PROJECTOR) / M:11.1f}M {paper:6d}M")
    print(f"(projector: {PROJECTOR / M:.1f}M; BranchLoRA's trainable count includes one router and the two "
          "selector keys of task 1)")

    print("\nLiLoRA vs DirLoRA on 6 CVIT tasks (FFN linears + both projector linears, r=128, r~=64)")
    print(f"{'method':10s} {'TP (MiB)':>9s} {'paper':>7s} {'EP (MiB)':>9s} {'paper':>7s} {'TP params':>10s}")
    for method, tp, ep in (("lilora", 985.1, 104.6), ("dirlora", 2143.9, 357.3)):
        rep = parameter_report(LLAVA_7B, method, 6, target="ffn+projector")
        print(f"{method:10s} {MIB(rep['total_added']):9.1f} {tp:7.1f} {MIB(rep['per_task']):9.1f} {ep:7.1f} "
              f"{rep['total_added'] / M:9.1f}M")


if __name__ == "__main__":
    main()
