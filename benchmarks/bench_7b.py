"""The 7B (and 13B) run without a GPU: the memory plan of every method at the first and the last
CoIN task, the step's FLOPs, and the full CoIN evaluation's predicted time on one H100.

    python benchmarks/bench_7b.py                  # plans: 7B and 13B on 80 GB, 7B on 24 GB (~8 min on 2 cores)
    python benchmarks/bench_7b.py --methods seqlora  # one method's plans (~75 s)
    python benchmarks/bench_7b.py --eval-time      # full CoIN evaluation, one method, one H100
    python benchmarks/bench_7b.py --validate       # predicted activation bytes vs a real step's RSS (CPU)
    python benchmarks/bench_7b.py --qwen2-vl-2b    # every method's plan for Qwen2-VL-2B on a 24 GB card

Each plan steps the run's own code on fake tensors at 2- and 3-layer twins of the shape, so its
cost is that of tracing ops in Python, about 75 s a method on 2 CPU cores, not of 7B arithmetic.

Memory comes from minimcit/plan.py, the code a real-data run plans with: the run's own step and
generate call on fake tensors (shapes, dtypes, storage sizes, no data), at the papers' recipes
(run.py's COIN_RECIPE; LILORA_RECIPE for LiLoRA). The samples are 576 image + 94 prompt + 30
answer tokens (the median CoIN conversation is shorter; a real run plans for its own longest).
`--tasks 8` holds every task's tensors (DirLoRA's 8 pairs, O-LoRA's 8 active pairs, EWC's Fisher
and anchor, LwF's teacher), none frozen: an upper bound on the last task's state.

The evaluation time is counted, not timed: FLOPs (torch's FlopCounterMode) and bytes read and
written per op, for one evaluation batch's prefill and each decode step, on the same fake
tensors; each op takes max(FLOPs / peak, bytes / bandwidth), plus a fixed host cost per op
(eager PyTorch launches every op from Python). The constants are printed with the figures.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run  # noqa: E402
from benchmarks.bench_bytes import VIEWS  # noqa: E402  (the ops that move no bytes, counted alike)
from benchmarks.param_table import LLAVA_7B, LLAVA_13B, QWEN2_VL_2B  # noqa: E402
from minimcit.plan import GiB, Replay, Shape, Tape, build, make_plan, predict_bytes, synthetic_batch  # noqa: E402
from minimcit.metrics import tasks_answered_per_stage  # noqa: E402
from minimcit.train import TrainConfig, autocast  # noqa: E402

aten = torch.ops.aten
METHODS = ("seqlora", "dirlora", "joint", "replay", "ewc", "lwf", "olora", "moelora", "branchlora", "lilora", "smolora")
TRAIN, PROMPT = Shape(1, 576 + 94 + 30, 30), Shape(1, 576 + 94, 32)
# Qwen2-VL: every image at the processor's max_pixels (28 x 28 x 1280: 1280 merged tokens), the
# longest it makes, with the same 94 + 30 text tokens.
QWEN_TRAIN, QWEN_PROMPT = Shape(1, 1280 + 94 + 30, 30, 1280), Shape(1, 1280 + 94, 32, 1280)


def recipe(method: str) -> tuple[TrainConfig, dict]:
    """The run's TrainConfig and method hparams for real data, as run.py builds them."""
    args = run.parse_args(["--method", method, "--tasks", "coin"])
    hp = run.method_hparams(args)
    if method == "branchlora":
        hp["use_selector"] = True  # its paper's identity-free protocol, the default on coin
    return run.train_config(args), hp


def plans(configs, methods, tasks_list=(1, 8), shapes=(TRAIN, PROMPT)):
    rows = []
    for name, c, memory in configs:
        for method in methods:
            cfg, hp = recipe(method)
            for tasks in tasks_list:
                t0 = time.time()
                p = make_plan(c, method, hp, cfg, memory=int(memory * GiB), train=shapes[0], evaluation=shapes[1],
                              tasks=tasks, given=set(), progress=lambda _: None)
                rows.append((name, memory, method, tasks, p, time.time() - t0))
                print(f"{name} {memory} GiB {method} task {tasks}: micro-batch {p.batch_size} x {p.grad_accum}, "
                      f"ckpt {'on' if p.gradient_checkpointing else 'off'}, step {p.train_peak / GiB:.1f} GiB, "
                      f"eval batch {p.eval_batch_size} {p.eval_peak / GiB:.1f} GiB ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    print(f"{'model':11s} {'GiB':>4s} {'method':10s} {'task':>4s} {'micro':>5s} {'accum':>5s} {'ckpt':>4s} "
          f"{'step GiB':>8s} {'share':>6s} {'eval B':>6s} {'eval GiB':>8s}")
    for name, memory, method, tasks, p, _ in rows:
        print(f"{name:11s} {memory:4d} {method:10s} {tasks:4d} {p.batch_size:5d} {p.grad_accum:5d} "
              f"{'on' if p.gradient_checkpointing else 'off':>4s} {p.train_peak / GiB:8.1f} "
              f"{p.train_peak / (memory * GiB):6.1%} {p.eval_batch_size:6d} {p.eval_peak / GiB:8.1f}")
    return rows


# --------------------------------------------------------------------------- evaluation time


def _cpu_flash(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
         aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
         aten.addmm_: lambda self, a, b, *args, out_shape=None, **kwargs: 2 * a[0] * a[1] * b[1]}  # y += h B^T


class OpCost(TorchDispatchMode):
    """Per op: bytes read and written (its tensor inputs and outputs; views move none) and, with a
    FlopCounterMode around it, FLOPs; `time` prices them on a roofline plus a host cost per op."""

    def __init__(self, flops: FlopCounterMode):
        super().__init__()
        self.flops, self.ops = flops, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.flops.get_total_flops()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEWS or func.namespace == "prim":  # views move no bytes; prims ask for metadata
            return out
        moved = sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                    if isinstance(t, torch.Tensor))
        self.ops.append((name, moved, self.flops.get_total_flops() - before))
        return out

    def time(self, peak_flops: float, bandwidth: float, host: float) -> float:
        return sum(max(f / peak_flops, b / bandwidth, host) for _, b, f in self.ops)


def eval_batch_cost(c, method: str, hp: dict, cfg, batch: int, new_tokens: int, peak_flops, bandwidth, host):
    """Seconds of one evaluation batch (prefill and `new_tokens` decode steps, every row decoding to
    the end: a bound) at c's depth, from 2- and 3-layer twins (cost is affine in the layers)."""
    costs = {}
    for layers in (2, 3):
        twin = dataclasses.replace(c, text=dataclasses.replace(c.text, num_hidden_layers=layers))
        shape = dataclasses.replace(PROMPT, batch=batch)
        gen_cfg = dataclasses.replace(cfg, max_new_tokens=new_tokens)

        def generate(config, dtype, mode=None):
            model, m, _, _ = build(config, method, hp, gen_cfg, 8, dtype)
            model.eval()
            b = synthetic_batch(config, shape, prompt_only=True)
            merged = m.mergeable
            with (mode or torch.no_grad()), (m.base_model() if merged else nullcontext()), autocast("cpu", model):
                model.generate(b["input_ids"], b["pixel_values"], b["attention_mask"], max_new_tokens=new_tokens,
                               eos_token_id=None)

        tape = Tape()
        with tape:
            generate(twin.tiny(), torch.float32)
        flops = FlopCounterMode(display=False, custom_mapping=FLOPS)
        cost = OpCost(flops)
        with FakeTensorMode(allow_non_fake_inputs=True), Replay(tape.tape), flops:
            generate(twin, torch.bfloat16, cost)
        costs[layers] = cost.time(peak_flops, bandwidth, host), len(cost.ops)
    n = c.text.num_hidden_layers
    return (costs[2][0] + (n - 2) * (costs[3][0] - costs[2][0]),
            costs[2][1] + (n - 2) * (costs[3][1] - costs[2][1]))


# CoIN's evaluation files, as far as a primary source gives their sizes (zackschen/CoIN, the
# "Samples: N" lines its eval scripts write, in committed results: commit b8d8be1's full-size
# runs for TextVQA 5000, ImageNet 5050, GQA 12578 (1129+589+1803+6805+2252), Grounding 30969;
# commit 4cd6ad7's runs for VizWiz 4000 and VQAv2 4000). ScienceQA: 4241, the ScienceQA test
# split. OCR-VQA: no count found (its script prints "Samples: 0"); 4000 assumed, like the slim
# files. `python run.py --check-data` prints a copy's own sizes; pass them with --sizes.
COIN_TEST = {"ScienceQA": 4241, "TextVQA": 5000, "ImageNet": 5050, "GQA": 12578, "VizWiz": 4000,
             "Grounding": 30969, "VQAv2": 4000, "OCRVQA": 4000}


def eval_time(method: str, sizes: list[int], peak_flops: float, bandwidth: float, host: float, memory: float):
    cfg, hp = recipe(method)
    plan = make_plan(LLAVA_7B, method, hp, cfg, memory=int(memory * GiB), train=TRAIN, evaluation=PROMPT, tasks=8,
                     given=set(), progress=lambda _: None)
    batch = plan.eval_batch_size
    seconds, ops = eval_batch_cost(LLAVA_7B, method, hp, cfg, batch, cfg.max_new_tokens, peak_flops, bandwidth, host)
    upto = tasks_answered_per_stage([[t] for t in range(len(sizes))], len(sizes))
    items = sum(sum(sizes[:u]) for u in upto)
    batches = sum(-(-sizes[j] // batch) for u in upto for j in range(u))
    total = batches * seconds
    print(f"{method} at 7B on one H100 ({peak_flops / 1e12:.0f} TFLOP/s bf16, {bandwidth / 1e12:.2f} TB/s, "
          f"{host * 1e6:.0f} us host time per op), eval batch {batch} (the plan's, {memory:.0f} GiB), "
          f"{PROMPT.length}-token prompts, every row decoding {cfg.max_new_tokens} tokens:")
    print(f"  one batch: {seconds:.2f} s ({ops} ops); {items} test items in {batches} batches over the protocol's "
          f"{sum(upto)} task evaluations; test sets {sizes}"
          + (f" ({', '.join(COIN_TEST)})" if len(sizes) == len(COIN_TEST) else ""))
    print(f"  predicted evaluation time: {total / 3600:.2f} h")
    return total


# --------------------------------------------------------------------------- validation on the CPU

SMALL = dataclasses.replace(LLAVA_7B, vision=dataclasses.replace(
    LLAVA_7B.vision, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2),
    text=dataclasses.replace(LLAVA_7B.text, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=None))


def _rss_child(method: str, ckpt: bool) -> None:
    """Runs in its own process: the real step's peak resident memory above the bytes held before it."""
    from minimcit.plan import _train_step

    cfg, hp = recipe(method)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=ckpt)
    model, m, params, opt = build(SMALL, method, hp, cfg, 1, torch.bfloat16)
    model.train()
    b = synthetic_batch(SMALL, dataclasses.replace(TRAIN, batch=8))
    _train_step(model, m, params, opt, b, cfg, 0)  # the first step creates AdamW's state
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    _train_step(model, m, params, opt, b, cfg, 0)
    print(_status("VmHWM") - before)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def validate(methods):
    """Predicted activation peak (peak - held) of the SMALL shape against the real step's growth
    in resident memory, each real step in a fresh process with large blocks given straight back
    to the OS (MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors."""
    print(f"SMALL shape, batch 8 x {TRAIN.length} tokens, bf16 base, CPU")
    print(f"{'method':11s} {'ckpt':>4s} {'predicted MiB':>13s} {'measured MiB':>12s} {'ratio':>6s}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_ARENA_MAX": "1"}
    for method in methods:
        cfg, hp = recipe(method)
        for ckpt in (False, True):
            p = predict_bytes(SMALL, method, hp, dataclasses.replace(cfg, gradient_checkpointing=ckpt),
                              dataclasses.replace(TRAIN, batch=8))
            out = subprocess.run([sys.executable, __file__, "--rss-child", method, str(int(ckpt))], env=env,
                                 check=True, capture_output=True, text=True).stdout.split()
            grown, pred = int(out[-1]), p["peak"] - p["held"]
            print(f"{method:11s} {'on' if ckpt else 'off':>4s} {pred / 2**20:13.1f} {grown / 2**20:12.1f} "
                  f"{pred / grown:6.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--eval-time", action="store_true")
    p.add_argument("--method", default="branchlora", choices=METHODS, help="--eval-time: the method")
    p.add_argument("--sizes", type=int, nargs="+", default=list(COIN_TEST.values()),
                   help="--eval-time: the test-set sizes in task order (run.py --check-data prints them)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--bandwidth", type=float, default=3.35, help="memory bandwidth, TB/s (H100 SXM: 3.35)")
    p.add_argument("--host-us", type=float, default=10.0, help="host time per launched op, microseconds")
    p.add_argument("--validate", action="store_true", help="predict the SMALL shape and measure it on this CPU")
    p.add_argument("--qwen2-vl-2b", action="store_true", help="Qwen2-VL-2B's plans on a 24 GB card instead")
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return _rss_child(args.rss_child[0], bool(int(args.rss_child[1])))
    if args.validate:
        return validate(args.methods)
    if args.eval_time:
        return eval_time(args.method, args.sizes, args.peak_tflops * 1e12, args.bandwidth * 1e12, args.host_us * 1e-6,
                         80)
    if args.qwen2_vl_2b:
        return plans([("Qwen2-VL-2B", QWEN2_VL_2B, 24)], args.methods, shapes=(QWEN_TRAIN, QWEN_PROMPT))
    plans([("7B", LLAVA_7B, 80), ("13B", LLAVA_13B, 80)], args.methods)
    plans([("7B", LLAVA_7B, 24)], [m for m in args.methods if m in ("seqlora", "branchlora", "lilora")])


if __name__ == "__main__":
    main()
