"""Peak memory and FLOPs of one training step at the LLaVA-1.5-7B shape, for every method,
without a GPU; and, on a GPU, the same step measured.

    python benchmarks/bench_7b.py                # predict: six methods x checkpointing off/on
    python benchmarks/bench_7b.py --validate     # predict a small shape, then measure it for real
    python benchmarks/bench_7b.py --measure      # on a GPU: time, peak memory, tokens/s, MFU,
                                                 # ours against transformers + peft LoRA

A step is what train.py runs: `micro_step` (forward, loss, the method's own loss, backward)
over one micro-batch of 8 samples x 700 tokens (576 image + 94 prompt + 30 answer tokens),
gradient clipping and fused AdamW, with the base in bf16 under autocast and the adapters,
projector and optimiser state in fp32. The second of two steps is reported: by then AdamW's
state exists, as in every step of a real run after the first.

How the prediction works. The model is built and stepped under FakeTensorMode: every tensor
has a shape, dtype and storage size but no data, so a 7B step costs seconds and no memory.
- Memory: `LiveBytes` registers every storage an op creates and drops it when the storage
  dies (a weakref on the storage), so its peak is the step's peak of live tensor bytes,
  parameters included. A GPU adds its allocator's slack and the CUDA context (about 0.5-1
  GiB) on top; the caching allocator's fragmentation is not modelled.
- FLOPs: torch's FlopCounterMode, plus the formula for CPU flash attention (torch counts the
  CUDA kernels only). FLOPs are what runs: checkpointing's recomputation is counted.
- Data-dependent shapes: the loss runs lm_head on labelled positions only (a boolean index),
  and a few `int(...)` calls read counts from the batch. Fake tensors cannot know these, so
  `Tape` first runs the same step on a tiny-width copy of the model (same layers, same batch,
  real tensors; these values depend on the batch, not on the width) and records each such
  op's result; `Replay` then answers them, in order, in the fake run, and checks that the
  ops come in the same order.
- Attention: at these shapes, with no padding, SDPA takes its causal flash path on CPU and
  GPU alike, which keeps (B, h, T) statistics and not the (B, h, T, T) matrix.
"""

import argparse
import dataclasses
import gc
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.param_table import LLAVA_7B  # noqa: E402
from minimcit.methods import make_method  # noqa: E402
from minimcit.model import IGNORE_INDEX, Llava, LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from minimcit.train import TrainConfig, micro_step, optimizer, step_loss, trained_projector  # noqa: E402

aten = torch.ops.aten
METHODS = ("seqlora", "dirlora", "joint", "moelora", "branchlora", "lilora")
# The papers' recipes on real data (run.py's COIN_RECIPE / LILORA_RECIPE): BranchLoRA trains its
# task selector; CoIN trains the projector in full, LiLoRA adapts it instead.
HPARAMS = {"branchlora": {"use_selector": True}}
# Small enough to step for real on 2 CPU cores, large enough that activations dominate.
SMALL = LlavaConfig(
    vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                        image_size=336, patch_size=14),
    text=TextConfig(vocab_size=32064, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                    num_attention_heads=2))
GiB = 2**30


def tiny_like(c: LlavaConfig) -> LlavaConfig:
    """The same layers, image size and vocabulary at a tiny width: the same data-dependent values."""
    return dataclasses.replace(
        c, vision=dataclasses.replace(c.vision, hidden_size=32, intermediate_size=64, num_attention_heads=2),
        text=dataclasses.replace(c.text, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                 num_key_value_heads=2, head_dim=None))


def make_batch(c: LlavaConfig, batch: int, prompt: int, answer: int, device="cpu") -> dict:
    """Images first (after 5 system tokens), then prompt and answer; labels on the answer only."""
    n_img, g = c.num_image_tokens, torch.Generator().manual_seed(0)
    T = n_img + prompt + answer
    ids = torch.randint(3, min(c.text.vocab_size, c.image_token_index), (batch, T), generator=g)
    ids[:, 5:5 + n_img] = c.image_token_index
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer:] = ids[:, -answer:]
    px = torch.randn(batch, 3, c.vision.image_size, c.vision.image_size, generator=g)
    instruction = torch.zeros_like(ids, dtype=torch.bool)  # the prompt's words (the task selector reads them)
    instruction[:, 5 + n_img:-answer] = True
    b = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "pixel_values": px,
         "instruction_mask": instruction}
    return {k: v.to(device) for k, v in b.items()}


def build(c: LlavaConfig, method: str, ckpt: bool, device="cpu", dtype=torch.bfloat16):
    """Model in bf16 with the method's adapters (fp32) for the first task, and the optimiser."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Llava(c)
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)  # not Module.to(), which fake tensors refuse
    model.requires_grad_(False)
    m = make_method(method, model, verbose=False, dropout=0.05, **HPARAMS.get(method, {}))
    m.start_task(0)
    recipe = TrainConfig(train_projector=method != "lilora", projector_lr=2e-5, lr=2e-4, gradient_checkpointing=ckpt)
    params = m.trainable_parameters() + trained_projector(model, m, recipe)
    model.train()
    return model, m, params, optimizer(params, [], recipe)


def step(model, method, params, opt, b, device="cpu", ckpt=False):
    n_tokens = b["labels"].shape[0] * (b["labels"].shape[1] - 1)  # a bound: only a count, not a shape
    micro_step(model, method, b, n_tokens, 1, 0, device, checkpointing=ckpt)
    step_loss(method, 0, 1.0)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- dispatch modes

INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


def data_dependent(func, args) -> bool:
    """Ops whose output shape or value depends on tensor contents (fake tensors refuse them)."""
    if func in INDEXING:
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return func in (aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default)


def contents(func, args, out):
    """What a fake run cannot know: True counts of boolean masks, or a scalar's value. Widths
    are left out: the tape is recorded at a tiny width and replayed at the full one."""
    if func in INDEXING:
        return [None if i is None or i.dtype != torch.bool else int(i.sum()) for i in args[1]]
    if func == aten.masked_select.default:
        return int(args[1].sum())
    if func == aten.nonzero.default:
        return out.shape[0]
    return out


class Tape(TorchDispatchMode):
    """Records, on a real run, what each data-dependent op found in the data."""

    def __init__(self):
        super().__init__()
        self.tape = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if data_dependent(func, args):
            self.tape.append((func, contents(func, args, out)))
        return out


class Replay(TorchDispatchMode):
    """Answers the data-dependent ops of a fake run from a Tape of the same step: a boolean mask
    with n True elements becomes n (fake) integer indices per dimension, which fix the shapes."""

    def __init__(self, tape):
        super().__init__()
        self.tape = list(tape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not data_dependent(func, args):
            return func(*args, **kwargs)
        if not self.tape or self.tape[0][0] != func:
            raise RuntimeError(f"replay out of step at {func}: expected {self.tape[0][0] if self.tape else 'nothing'}")
        _, found = self.tape.pop(0)
        if func in INDEXING:
            indices = []
            for i, n in zip(args[1], found):
                if n is None:
                    indices.append(i)
                else:  # a (d0, .., dk) mask -> k+1 index vectors of length n
                    indices += [torch.zeros(n, dtype=torch.long, device=i.device)] * i.dim()
            return func(args[0], indices, *args[2:], **kwargs)
        if func == aten.masked_select.default:
            return torch.empty(found, dtype=args[0].dtype, device=args[0].device)
        if func == aten.nonzero.default:
            return torch.empty(found, args[0].dim(), dtype=torch.long, device=args[0].device)
        return found


class LiveBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak: each storage an op creates is counted
    until it dies. `hold` counts tensors that existed before (parameters, the batch)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def hold(self, *tensors):
        for t in tensors:
            self._track(t)

    def _track(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = weakref.ref(st, lambda _, key=key, n=n: self._free(key, n))
        self.now += n
        self.peak = max(self.peak, self.now)

    def _free(self, key, n):
        self.live.pop(key, None)
        self.now -= n

    def reset_peak(self):
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _cpu_flash(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
         aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


# --------------------------------------------------------------------------- prediction

def record(c: LlavaConfig, method: str, ckpt: bool, batch: int, prompt: int, answer: int) -> list:
    # fp32: the data-dependent ops are the same in either dtype, and a CPU runs fp32 far faster
    model, m, params, opt = build(tiny_like(c), method, ckpt, dtype=torch.float32)
    b = make_batch(c, batch, prompt, answer)
    tape = Tape()
    with tape:
        for _ in range(3):
            step(model, m, params, opt, b, ckpt=ckpt)
    return tape.tape


def two_steps(c: LlavaConfig, method: str, ckpt: bool, batch: int, prompt: int, answer: int):
    """Build and take two steps under LiveBytes; FLOPs and the memory figures of the second."""
    mem, flops = LiveBytes(), FlopCounterMode(display=False, custom_mapping=FLOPS)
    model, m, params, opt = build(c, method, ckpt)
    b = make_batch(c, batch, prompt, answer)
    mem.hold(*model.parameters(), *model.buffers(), *b.values())
    with mem:
        step(model, m, params, opt, b, ckpt=ckpt)
        gc.collect()
        held, mem_first = mem.now, mem.peak
        mem.reset_peak()
        step(model, m, params, opt, b, ckpt=ckpt)
        gc.collect()
    with flops:  # a step of its own: the counter's module hooks hold tensors longer than a plain step
        step(model, m, params, opt, b, ckpt=ckpt)
    return model, params, mem, held, mem_first, flops.get_total_flops()


def predict(c: LlavaConfig, method: str, ckpt: bool, batch=8, prompt=94, answer=30, fake=True) -> dict:
    """Peak live bytes of the second step (and the bytes held before it), FLOPs of one step.
    fake=False takes the same two steps on real tensors (for the tests)."""
    if fake:
        tape = record(c, method, ckpt, batch, prompt, answer)
        with FakeTensorMode(allow_non_fake_inputs=True), Replay(tape) as replay:
            model, params, mem, held, mem_first, flops = two_steps(c, method, ckpt, batch, prompt, answer)
        assert not replay.tape, f"{len(replay.tape)} recorded ops were never replayed"
    else:
        model, params, mem, held, mem_first, flops = two_steps(c, method, ckpt, batch, prompt, answer)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"method": method, "ckpt": ckpt, "peak": mem.peak, "first_step_peak": mem_first, "held": held,
            "weights": weights, "trainable": sum(p.numel() for p in params), "flops": flops,
            "tokens": batch * (c.num_image_tokens + prompt + answer)}


def show(rows, title):
    print(title)
    print(f"{'method':11s} {'ckpt':>4s} {'peak GiB':>9s} {'held GiB':>9s} {'activ. GiB':>10s} "
          f"{'trainable':>10s} {'TFLOP/step':>10s}")
    for r in rows:
        print(f"{r['method']:11s} {'on' if r['ckpt'] else 'off':>4s} {r['peak'] / GiB:9.2f} {r['held'] / GiB:9.2f} "
              f"{(r['peak'] - r['held']) / GiB:10.2f} {r['trainable'] / 1e6:9.1f}M {r['flops'] / 1e12:10.1f}")


# --------------------------------------------------------------------------- validation

def _rss_child(method: str, ckpt: bool, batch: int, prompt: int, answer: int) -> None:
    """Runs in its own process: the real step's peak resident memory above the bytes held before it."""
    model, m, params, opt = build(SMALL, method, ckpt)
    b = make_batch(SMALL, batch, prompt, answer)
    step(model, m, params, opt, b, ckpt=ckpt)  # the first step creates AdamW's state
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    t0 = time.perf_counter()
    step(model, m, params, opt, b, ckpt=ckpt)
    print(f"{_status('VmHWM') - before} {time.perf_counter() - t0:.2f}")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def validate(methods, batch=8, prompt=94, answer=30):
    """Predicted activation peak (peak - held) of the SMALL shape against the real step's growth
    in resident memory, each real step in a fresh process with large blocks given straight back
    to the OS (MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors."""
    print(f"SMALL shape, batch {batch} x {SMALL.num_image_tokens + prompt + answer} tokens, bf16 base, CPU")
    print(f"{'method':11s} {'ckpt':>4s} {'predicted MiB':>13s} {'measured MiB':>12s} {'ratio':>6s} {'step s':>7s}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_ARENA_MAX": "1"}
    for method in methods:
        for ckpt in (False, True):
            p = predict(SMALL, method, ckpt, batch, prompt, answer)
            out = subprocess.run([sys.executable, __file__, "--rss-child", method, str(int(ckpt))], env=env,
                                 check=True, capture_output=True, text=True).stdout.split()
            grown, secs = int(out[0]), float(out[1])
            pred = p["peak"] - p["held"]
            print(f"{method:11s} {'on' if ckpt else 'off':>4s} {pred / 2**20:13.1f} {grown / 2**20:12.1f} "
                  f"{pred / grown:6.3f} {secs:7.1f}", flush=True)


# --------------------------------------------------------------------------- GPU measurement

def measure(reps: int, methods, peak_tflops: float):
    """The 7B step for real on a GPU: median time, peak memory, tokens/s and MFU, and transformers
    + peft LoRA (r=128 on the LLM's linears) on the same batch. Without a GPU it runs a tiny-width
    shape on the CPU: a check of this code, not a measurement."""
    gpu = torch.cuda.is_available()
    device, c = ("cuda", LLAVA_7B) if gpu else ("cpu", tiny_like(SMALL))
    b = make_batch(c, 8, 94, 30, device)
    tokens = b["input_ids"].numel()

    def timed(fn):
        times = []
        for i in range(reps + 1):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[reps // 2]  # median, the warm-up dropped

    rows = []
    for method in methods:
        model_flops = predict(c, method, False)["flops"]  # the step without recomputation
        for ckpt in (False, True):
            model, m, params, opt = build(c, method, ckpt, device)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            secs = timed(lambda: step(model, m, params, opt, b, device, ckpt))
            peak = torch.cuda.max_memory_allocated() if gpu else float("nan")
            rows.append((f"{method} (ours)", ckpt, secs, peak, model_flops))
            del model, m, params, opt
            gc.collect()
            torch.cuda.empty_cache() if gpu else None
    rows += measure_peft(c, b, device, timed, predict(c, "seqlora", False)["flops"])
    print(f"{device}, batch 8 x {tokens // 8} tokens; MFU against {peak_tflops} TFLOP/s bf16 dense")
    print(f"{'run':24s} {'ckpt':>4s} {'step s':>7s} {'peak GiB':>9s} {'tokens/s':>9s} {'MFU':>6s}")
    for name, ckpt, secs, peak, fl in rows:
        print(f"{name:24s} {'on' if ckpt else 'off':>4s} {secs:7.3f} {peak / GiB:9.2f} {tokens / secs:9.0f} "
              f"{fl / secs / (peak_tflops * 1e12):6.1%}")


def measure_peft(c: LlavaConfig, b: dict, device, timed, flops):
    """transformers' LLaVA (random weights of the same shape) with peft LoRA, stepped as ours."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration
    from transformers import LlavaConfig as HFLlavaConfig

    v, t = c.vision, c.text
    cfg = HFLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                       image_size=v.image_size, patch_size=v.patch_size),
        text_config=LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                                max_position_embeddings=t.max_position_embeddings),
        image_token_index=c.image_token_index)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    hf.requires_grad_(False)
    target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # peft keeps the adapters in fp32 on a bf16 base (autocast_adapter_dtype, its default), as we do
    hf = get_peft_model(hf, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=target))
    proj = list(hf.base_model.model.model.multi_modal_projector.parameters())
    for p in proj:
        p.data = p.data.float()
        p.requires_grad_(True)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    rows = []
    for ckpt in (False, True):
        if ckpt:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.train()

        def one():
            with torch.autocast(device, torch.bfloat16):
                loss = hf(input_ids=b["input_ids"], pixel_values=b["pixel_values"].bfloat16(),
                          attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        secs = timed(one)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
        rows.append(("transformers+peft LoRA", ckpt, secs, peak, flops))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--validate", action="store_true", help="predict the SMALL shape and measure it on this CPU")
    p.add_argument("--measure", action="store_true", help="time the step on a GPU (SMALL on a CPU)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return _rss_child(args.rss_child[0], bool(int(args.rss_child[1])), 8, 94, 30)
    if args.validate:
        return validate(args.methods)
    if args.measure:
        return measure(args.reps, args.methods, args.peak_tflops)
    c = LLAVA_7B
    rows = []
    for m in args.methods:
        for ckpt in (False, True):
            rows.append(predict(c, m, ckpt))
            print(f"{m} checkpointing {'on' if ckpt else 'off'}: done", file=sys.stderr, flush=True)
    show(rows, f"LLaVA-1.5-7B shape, batch 8 x {rows[0]['tokens'] // 8} tokens, bf16 base, fp32 adapters, "
               "projector and AdamW state; second step (AdamW state held)")


if __name__ == "__main__":
    main()
