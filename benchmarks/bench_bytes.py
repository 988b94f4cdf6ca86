"""Bytes that non-matmul ops read and write per decoder layer in one LLaVA-1.5-7B LoRA training
micro-step (forward and backward; bf16 base under autocast, fp32 adapters, r=128, dropout 0.05,
8 samples x 700 tokens), counted on fake tensors, for this code and an earlier revision in one run.

    python benchmarks/bench_bytes.py --against d917398

An op's bytes are its tensor inputs' and outputs' sizes (views and metadata queries move none);
matmuls (mm, addmm and its in-place form, bmm, convolution, attention) are left out, since their
bytes are not what an elementwise pass costs. The frozen base alone (no adapters; the projector
trained, so the backward runs through every layer) is counted too. Dropout (in both revisions) and
F.rms_norm (where a revision calls it) are counted as CUDA runs them, one fused kernel each way,
not as the CPU's decomposition into elementwise passes. One decoder layer = the step of a 3-layer model
minus that of a 2-layer one (the vision tower, embedding and head cancel).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MATMUL = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "convolution", "convolution_backward",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "slice", "select", "alias",
         "as_strided", "permute", "detach", "_reshape_alias", "split", "split_with_sizes", "unbind", "unflatten",
         "lift_fresh", "reshape"}


def child() -> None:
    """Under whichever minimcit PYTHONPATH names: one JSON line, {op: bytes} per decoder layer."""
    import dataclasses

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from benchmarks.param_table import LLAVA_7B
    from minimcit.methods import make_method
    from minimcit.model import IGNORE_INDEX, Llava
    from minimcit.train import micro_step
    try:  # the fake-tensor replay lives in minimcit/plan.py now, in benchmarks/bench_7b.py before
        from minimcit.plan import Replay, Tape
        from minimcit import plan as where
    except ImportError:
        from benchmarks.bench_7b import Replay, Tape
        import benchmarks.bench_7b as where
    # the tiny-width twin: LlavaConfig.tiny now, tiny_like before
    tiny_like = getattr(where, "tiny_like", None) or (lambda c: c.tiny())

    def nbytes(*tensors):
        return sum(t.numel() * t.element_size() for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor))

    class Bytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_op = Counter()
            self.paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not self.paused and name not in VIEWS and name not in MATMUL and func.namespace != "prim":
                self.by_op[name] += nbytes(args, kwargs, out)
            return out

    counting = []  # the Bytes mode of the step being counted, if any

    @contextmanager
    def uncounted():
        mode = counting[0] if counting else None
        if mode is not None:
            mode.paused = True
        try:
            yield mode
        finally:
            if mode is not None:
                mode.paused = False

    class FusedRMSNorm(torch.autograd.Function):
        """F.rms_norm as CUDA runs it: aten::_fused_rms_norm forward, _fused_rms_norm_backward
        backward, one kernel each, whose bytes are their tensors'. On the CPU the op decomposes
        into nine elementwise passes; they run here uncounted."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            with uncounted() as mode:
                y = rms_norm(x, weight.shape, weight, eps)
                rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
                if mode is not None:
                    mode.by_op["_fused_rms_norm"] += nbytes(x, weight, y, rstd)
            ctx.save_for_backward(x, weight)
            ctx.eps = eps
            return y

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            with uncounted() as mode, torch.enable_grad():
                xx, ww = x.detach().requires_grad_(), weight.detach().requires_grad_(ctx.needs_input_grad[1])
                wanted = [xx, ww] if ctx.needs_input_grad[1] else [xx]
                grads = torch.autograd.grad(rms_norm(xx, ww.shape, ww, ctx.eps), wanted, grad)
                if mode is not None:
                    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
                    mode.by_op["_fused_rms_norm_backward"] += nbytes(grad, x, rstd, weight, grads)
            return grads[0], grads[1] if ctx.needs_input_grad[1] else None, None

    rms_norm = torch.nn.functional.rms_norm

    def step(c, dtype, mode=None, adapters=True):
        torch.manual_seed(0)
        model = Llava(c)
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
        model.requires_grad_(False)
        m = None
        if adapters:
            m = make_method("seqlora", model, r=128, lora_alpha=256, dropout=0.05, verbose=False)
            m.start_task(0)
        for p in model.multi_modal_projector.parameters():  # trained, as CoIN trains it: the LLM's backward runs
            p.data = p.data.float()
            p.requires_grad_(True)
        model.train()
        g = torch.Generator().manual_seed(0)
        n_img, T = c.num_image_tokens, c.num_image_tokens + 124
        ids = torch.randint(3, 32000, (8, T), generator=g)
        ids[:, 5:5 + n_img] = c.image_token_index
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -30:] = ids[:, -30:]
        b = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "instruction_mask": torch.zeros_like(ids, dtype=torch.bool),
             "pixel_values": torch.randn(8, 3, c.vision.image_size, c.vision.image_size, generator=g)}
        with mode if mode is not None else torch.enable_grad():
            micro_step(model, m, b, 240, 1, 0, "cpu")

    # Dropout as CUDA runs it, for both revisions: F.dropout on a GPU tensor is one fused
    # native_dropout (which gives the same masks); on the CPU it is four elementwise passes.
    torch.nn.functional.dropout = lambda x, p=0.5, training=True, inplace=False: (
        torch.native_dropout(x, p, training)[0] if training and p > 0 else x)
    # rms_norm likewise (revisions that normalise with their own elementwise ops are counted as written).
    torch.nn.functional.rms_norm = lambda x, shape, weight, eps=None: FusedRMSNorm.apply(x, weight, eps)
    out = {}
    for adapters in (True, False):
        per_depth = {}
        for layers in (2, 3):
            c = dataclasses.replace(LLAVA_7B, text=dataclasses.replace(LLAVA_7B.text, num_hidden_layers=layers),
                                    vision=dataclasses.replace(LLAVA_7B.vision, num_hidden_layers=2))
            tape = Tape()
            with tape:
                step(tiny_like(c), torch.float32, adapters=adapters)
            count = Bytes()
            counting[:] = [count]
            with FakeTensorMode(allow_non_fake_inputs=True), Replay(tape.tape):
                step(c, torch.bfloat16, count, adapters=adapters)
            counting.clear()
            per_depth[layers] = count.by_op
        layer = {op: per_depth[3][op] - per_depth[2].get(op, 0) for op in per_depth[3]}
        out["lora" if adapters else "base"] = {op: n for op, n in layer.items() if n}
    print(json.dumps(out))


def measure(code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code)])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bytes.py"), "--child"], cwd=code, env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="the git revision to compare with")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child()
    results = {"this": measure(ROOT)}
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            old = Path(tmp) / "old"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against], check=True,
                           capture_output=True)
            try:
                results[args.against] = measure(old)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    ops = sorted({op for r in results.values() for op in r["lora"]},
                 key=lambda op: -max(r["lora"].get(op, 0) for r in results.values()))
    print(f"non-matmul bytes per decoder layer, LLaVA-1.5-7B LoRA step (GB): {' / '.join(results)}")
    for op in ops[:14]:
        print(f"  {op:28s} " + " / ".join(f"{r['lora'].get(op, 0) / 1e9:7.2f}" for r in results.values()))
    totals = {k: sum(r["lora"].values()) for k, r in results.items()}
    base = {k: sum(r["base"].values()) for k, r in results.items()}
    print("  total                        " + " / ".join(f"{t / 1e9:7.2f}" for t in totals.values()))
    print("  the frozen base alone        " + " / ".join(f"{t / 1e9:7.2f}" for t in base.values()))
    print("  the adapters' share          " + " / ".join(f"{(totals[k] - base[k]) / 1e9:7.2f}" for k in totals))
    if args.against:
        a = args.against
        print(f"ratio {a} / this: {totals[a] / totals['this']:.2f}x the step, "
              f"{(totals[a] - base[a]) / (totals['this'] - base['this']):.2f}x the adapters' share")

if __name__ == "__main__":
    main()
