"""The memory plan of a real-data run, made before the model loads: gradient checkpointing, the
per-device micro-batch and the evaluation batch for the device's free memory (or
--device-memory), keeping the recipe's global batch (micro-batch x accumulation = the paper's,
on any number of processes; distributed.py).

The prediction is the run's own code, not a formula: the model is built and stepped under torch's
FakeTensorMode (shapes, dtypes and storage sizes, no data), so `train.micro_step`, the optimiser
step and `Llava.generate` run at the 7B shape in seconds and no memory, and `LiveBytes` counts the
live storage bytes op by op. Data-dependent ops (the boolean index that keeps answer positions,
a few `int(...)` counts) cannot run on fake tensors: `Tape` records their results on a tiny-width
twin of the model stepping the same batch for real (the values depend on the batch, not on the
width), and `Replay` answers them in order during the fake run. benchmarks/bench_7b.py checks the
prediction against real steps (within 7% of the resident memory on a small shape).

A GPU adds the CUDA context and its allocator's slack on top of live tensor bytes; the plan keeps
10% of the memory free for that (Decision), and `benchmarks/gpu_check.py` measures the real peak.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .model import IGNORE_INDEX

aten = torch.ops.aten
GiB = 2**30
HEADROOM = 0.10  # Decision: the share of device memory the plan leaves free (context, allocator slack)
MIN_TOKENS = 2048  # Decision: a micro-batch of this many tokens keeps a GPU's GEMMs busy without checkpointing
MAX_EVAL_BATCH = 256  # Decision: past this, a decode step is bound by reading the KV cache, not by launches

# --------------------------------------------------------------------------- fake tensors

INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


def data_dependent(func, args) -> bool:
    """Ops whose output shape or value depends on tensor contents (fake tensors refuse them)."""
    if func in INDEXING:
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    # item (int(t)) and is_nonzero (bool(t)) reach a dispatch mode whole under inference_mode, which
    # skips the autograd layer that decomposes them into _local_scalar_dense.
    return func in (aten.nonzero.default, aten.masked_select.default, aten._local_scalar_dense.default,
                    aten.item.default, aten.is_nonzero.default)


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
        self.phases = []  # the peaks of the phases `mark` closed

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
        self.phases = []

    def mark(self):
        """Close a phase: its peak is kept in `phases` and the next phase's peak starts from now."""
        self.phases.append(self.peak)
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


# --------------------------------------------------------------------------- one step, one generate call


@dataclass(frozen=True)
class Shape:
    """What a micro-batch or an evaluation batch looks like: `batch` samples of `length` tokens
    each (image tokens included), `answer` of them labelled; every sample with an image."""
    batch: int
    length: int
    answer: int = 1
    image: int | None = None  # each image's tokens; None: the backbone's count (LLaVA's fixed 576; Qwen2-VL's most)


def synthetic_batch(c, s: Shape, prompt_only: bool = False) -> dict:
    """Images after 5 system tokens, then the instruction and the answer; labels on the answer."""
    g = torch.Generator().manual_seed(0)
    pixel_values, n_img = c.fake_images(s.batch, s.image, g)
    T = max(s.length, n_img + 5 + s.answer + 1)
    ids = torch.randint(3, min(c.text.vocab_size, c.image_token_index), (s.batch, T), generator=g)
    ids[:, 5:5 + n_img] = c.image_token_index
    instruction = torch.zeros_like(ids, dtype=torch.bool)  # what the task selector reads
    instruction[:, 5 + n_img:T - (0 if prompt_only else s.answer)] = True
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "instruction_mask": instruction,
         "pixel_values": pixel_values}
    if not prompt_only:
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -s.answer:] = ids[:, -s.answer:]
        b["labels"] = labels
    return b


def build(c, method: str, hparams: dict, cfg, tasks: int, dtype):
    """The model in `dtype` with the method's adapters after `tasks` tasks have started (every
    task's tensors held, none frozen by end_task: an upper bound on any task's state), the
    trainable parameters and the optimiser, as the run makes them."""
    from .methods import make_method
    from .train import optimizer, trained_projector

    torch.manual_seed(0)
    model = c.build()
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)  # per tensor, not Module.to(), which fake tensors refuse
    model.requires_grad_(False)  # the base is frozen, as run.py freezes it
    m = make_method(method, model, verbose=False, **hparams)
    for t in range(tasks):
        m.start_task(t)
    projector = trained_projector(model, m, cfg)
    opt = optimizer(m.parameter_groups(), projector, cfg)
    return model, m, [p for g in opt.param_groups if g["clip"] for p in g["params"]], opt


def _train_step(model, m, params, opt, b, cfg, task):
    from .train import micro_step, step_loss

    n_tokens = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    micro_step(model, m, b, max(1, n_tokens), 1, task, "cpu", checkpointing=cfg.gradient_checkpointing)
    step_loss(m, task, 1.0)
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _generate(model, m, b, max_new: int):
    from .train import autocast

    merged = m.mergeable  # a merged layer costs what the plain base costs
    with (m.base_model() if merged else nullcontext()), autocast("cpu", model):
        model.generate(b["input_ids"], b["pixel_values"], b["attention_mask"], max_new_tokens=max_new,
                       eos_token_id=None, instruction_mask=b["instruction_mask"])


def predict_bytes(c, method: str, hparams: dict, cfg, shape: Shape, *, tasks: int = 1,
                  evaluation: bool = False, dtype=torch.bfloat16, fake: bool = True) -> dict:
    """Peak live bytes of the run's second training step (AdamW's state exists by then), or of one
    generate call of cfg.max_new_tokens tokens, and the bytes held before it; and the peaks of its
    two phases, `before` the decoder first runs (the vision tower) and `after` (the decoder, the loss,
    the backward, the optimiser), which peak_model extrapolates each on its own. fake=False takes
    the same steps on real tensors (for the tests)."""
    def run(config, mode_dtype, mem=None):
        model, m, params, opt = build(config, method, hparams, cfg, tasks, mode_dtype)
        if evaluation:
            model.eval()
            b = synthetic_batch(config, shape, prompt_only=True)
            steps = [lambda: _generate(model, m, b, cfg.max_new_tokens)]
        else:
            model.train()
            b = synthetic_batch(config, shape)
            steps = [lambda: _train_step(model, m, params, opt, b, cfg, tasks - 1)] * 2
        if mem is None:
            for s in steps:
                s()
            return None
        inputs = [t for v in b.values() if v is not None  # Qwen2-VL's ImagePatches: its patches
                  for t in (vars(v).values() if dataclasses.is_dataclass(v) else [v]) if isinstance(t, torch.Tensor)]
        mem.hold(*model.parameters(), *model.buffers(), *inputs)
        measuring = []

        def decoder_starts(*_):  # plan-side instrumentation of its own model: the phases' boundary
            if measuring and not mem.phases:
                mem.mark()
        hook = model.language_model.register_forward_pre_hook(decoder_starts)
        with mem:
            for k, s in enumerate(steps):
                if k == len(steps) - 1:
                    gc.collect()
                    held = mem.now
                    mem.reset_peak()
                    measuring.append(True)
                s()
            gc.collect()
        hook.remove()
        return held

    mem = LiveBytes()
    if fake:
        tape = Tape()
        with tape:  # fp32: the same data-dependent ops, and a CPU runs fp32 far faster
            run(c.tiny(), torch.float32)
        with FakeTensorMode(allow_non_fake_inputs=True), Replay(tape.tape) as replay:
            held = run(c, dtype, mem)
        if replay.tape:
            raise RuntimeError(f"{len(replay.tape)} recorded ops were never replayed")
    else:
        held = run(c, dtype, mem)
    before = mem.phases[0] if mem.phases else held
    return {"peak": max(mem.peak, before), "held": held, "before": before, "after": mem.peak}


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    memory: int  # bytes of device memory the plan is made for
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    eval_batch_size: int
    train_peak: int  # predicted bytes
    eval_peak: int
    train_shape: Shape
    eval_shape: Shape
    given: list = field(default_factory=list)  # the settings flags fixed, not the plan
    over: list = field(default_factory=list)  # settings a flag fixed that the prediction says do not fit

    @property
    def budget(self) -> int:
        return int(self.memory * (1 - HEADROOM))

    def summary(self) -> str:
        def share(b):
            return f"{b / GiB:.1f} GiB ({100 * b / self.memory:.0f}% of {self.memory / GiB:.1f})"
        lines = [f"memory plan: micro-batch {self.batch_size} x {self.grad_accum} accumulation, gradient "
                 f"checkpointing {'on' if self.gradient_checkpointing else 'off'}: a step peaks at "
                 f"{share(self.train_peak)} for {self.train_shape.length}-token samples",
                 f"  evaluation batch {self.eval_batch_size}: peaks at {share(self.eval_peak)} for "
                 f"{self.eval_shape.length}-token prompts + {self.eval_shape.answer} new tokens",
                 f"  headroom kept: {HEADROOM:.0%}" + (f"; set by flags: {', '.join(self.given)}" if self.given else "")]
        lines += [f"  warning: {o}" for o in self.over]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["budget"] = self.budget
        return d


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layer_bytes(c, dtype) -> int:
    """Bytes of one vision-tower layer's weights in `dtype`."""
    with torch.device("meta"):
        layer = c.vision_layer()
    return sum(p.numel() for p in layer.parameters()) * torch.empty((), dtype=dtype).element_size()


def peak_model(c, method: str, hparams: dict, cfg, shape: Shape, *, tasks: int, evaluation: bool,
               dtype=torch.bfloat16, batches: tuple[int, int] = (1, 2)):
    """batch -> predicted peak bytes at c's full depth, from four predictions of a shallow twin (2
    and 3 decoder layers, the two `batches`, 2 vision layers), so a plan costs seconds, not minutes.

    Each of the step's two phases (predict_bytes: the vision tower's forward, then everything from
    the decoder on) peaks where some set of tensors is live: weights and optimiser state (constant in
    the batch, growing with each decoder layer), activations (growing with both), adapter gradients
    (growing with the layers only). Each such set is affine in the batch and in the depth, so the
    four predictions give a phase's peak at full depth exactly while one set stays the largest. The
    largest can change with the batch: at Qwen2-VL-2B's shape with checkpointing, the adapters'
    gradients are the larger set up to 4 samples and the saved layer inputs from 8 on (extrapolated
    from batch 1 and 2, micro-batch 8 was under-predicted by 0.34 GiB). A maximum of affine functions
    is convex, so a chord between two batches lies on or above it: make_plan asks for its smallest and
    largest candidate micro-batches, and none between is under-predicted.
    The two phases are extrapolated apart for the same reason (at a twin's few layers the tower's
    can be the larger and hide the decoder's growth); the step's peak is the larger of the two
    (tests/test_plan.py checks both backbones against the full-depth prediction). The frozen vision
    layers run without a graph, one at a time: only the weights of the layers the twin leaves out
    are added."""
    n_text, n_vision = c.text.num_hidden_layers, c.vision_layers
    shallow = min(2, n_vision)
    lo, hi = batches[0], max(batches[1], batches[0] + 1)
    p = {}
    for layers in (2, 3):
        twin = c.with_layers(layers, shallow)
        for b in (lo, hi):
            p[layers, b] = predict_bytes(twin, method, hparams, cfg, dataclasses.replace(shape, batch=b), tasks=tasks,
                                         evaluation=evaluation, dtype=dtype)
    vision = (n_vision - shallow) * _layer_bytes(c, dtype)

    def phase(name, batch):
        deep = {b: p[2, b][name] + (n_text - 2) * (p[3, b][name] - p[2, b][name]) for b in (lo, hi)}
        return deep[lo] + (batch - lo) * (deep[hi] - deep[lo]) / (hi - lo) + vision

    return lambda batch: max(phase("before", batch), phase("after", batch))


def make_plan(c, method: str, hparams: dict, cfg, *, memory: int, train: Shape, evaluation: Shape,
              tasks: int, given: set, dtype=torch.bfloat16, progress=print) -> Plan:
    """Choose what `given` (the TrainConfig fields the user set) leaves open. The recipe's global
    batch cfg.batch_size x cfg.grad_accum is kept: the micro-batch is a divisor of it, at most the
    recipe's. Checkpointing stays off when a micro-batch of at least MIN_TOKENS tokens (or the
    recipe's own) fits without it. The evaluation batch is the largest power of two that fits,
    up to MAX_EVAL_BATCH."""
    budget = int(memory * (1 - HEADROOM))
    total = cfg.batch_size * cfg.grad_accum
    models = {}

    def peak(b, ckpt, evaluating=False):
        if (ckpt, evaluating) not in models:
            what = "evaluation" if evaluating else f"training step, checkpointing {'on' if ckpt else 'off'}"
            progress(f"memory plan: predicting the {what} (four shallow predictions)")
            # Training: the candidates' ends (see peak_model). Evaluation stays at batch 1 and 2: its live
            # sets (KV cache, activations, images) all grow with the batch, and at Qwen2-VL-2B's shape the
            # peak is affine from 1 to 256 prompts (0.261 GiB a prompt), where a twin at 256 costs minutes.
            span = (1, 2) if evaluating else (min(sizes), max(sizes))
            models[ckpt, evaluating] = peak_model(c, method, hparams, dataclasses.replace(cfg, gradient_checkpointing=ckpt),
                                                  evaluation if evaluating else train, tasks=tasks,
                                                  evaluation=evaluating, dtype=dtype, batches=span)
        return int(models[ckpt, evaluating](b))

    def largest(sizes, fn):  # the largest size that fits the budget and its peak, or (None, peak of the smallest)
        fitting = [s for s in sorted(sizes) if fn(s) <= budget]
        return (fitting[-1], fn(fitting[-1])) if fitting else (None, fn(min(sizes)))

    sizes = [cfg.batch_size] if "batch_size" in given else [d for d in divisors(total) if d <= cfg.batch_size]
    ckpts = [cfg.gradient_checkpointing] if "gradient_checkpointing" in given else [False, True]
    over, choice, tried = [], None, {}
    for ckpt in ckpts:
        b, p = tried[ckpt] = largest(sizes, lambda b, ckpt=ckpt: peak(b, ckpt))
        if b is not None and (ckpt or b * train.length >= MIN_TOKENS or b == max(sizes) or len(ckpts) == 1):
            choice = (b, p, ckpt)
            break
    if choice is None and tried.get(False, (None,))[0] is not None:  # fits only without checkpointing
        choice = (*tried[False], False)
    if choice is None and given & {"batch_size", "gradient_checkpointing"}:  # the user's choice: warn, not refuse
        choice = (sizes[0], tried[ckpts[-1]][1], ckpts[-1])
        over.append(f"the flags' training step needs {choice[1] / GiB:.1f} GiB, over the {budget / GiB:.1f} GiB "
                    "budget: expect out-of-memory")
    if choice is None:
        need = tried[True][1]
        raise MemoryError(f"memory plan: even micro-batch 1 with gradient checkpointing needs {need / GiB:.1f} GiB "
                          f"for {train.length}-token samples, and this device has {budget / GiB:.1f} GiB to give "
                          f"({memory / GiB:.1f} GiB less {HEADROOM:.0%} headroom): short by "
                          f"{(need - budget) / GiB:.1f} GiB. Use a larger GPU (more processes do not help: each "
                          "holds the whole model)")
    b, train_peak, ckpt = choice
    accum = cfg.grad_accum if "grad_accum" in given else max(1, total // b)
    if "eval_batch_size" in given:
        eval_b, eval_peak = cfg.eval_batch_size, peak(cfg.eval_batch_size, False, True)
        if eval_peak > budget:
            over.append(f"--eval-batch-size {eval_b} needs {eval_peak / GiB:.1f} GiB, over the budget")
    else:
        eval_b, eval_peak = largest([2**k for k in range(int(math.log2(MAX_EVAL_BATCH)) + 1)],
                                    lambda b: peak(b, False, True))
        if eval_b is None:
            raise MemoryError(f"memory plan: one evaluation prompt needs {eval_peak / GiB:.1f} GiB, over the "
                              f"{budget / GiB:.1f} GiB this device has to give")
    return Plan(memory, b, accum, ckpt, eval_b, train_peak, eval_peak, train, evaluation,
                sorted(given & {"batch_size", "grad_accum", "gradient_checkpointing", "eval_batch_size"}), over)


# --------------------------------------------------------------------------- what the run needs


def device_memory(device) -> int:
    """Free bytes on the GPU `device` (a CPU run plans only for a --device-memory it is given)."""
    return torch.cuda.mem_get_info(torch.device(device))[0]


LONGEST = 256  # Decision: per task, the samples longest in characters are tokenised to find the longest in tokens


def data_shapes(tasks, collator, max_new_tokens: int) -> tuple[Shape, Shape]:
    """The longest training sample (tokens, answer tokens) and the longest test prompt of the run's
    data, the shapes the plan is made for. Tokenising every sample of CoIN would take minutes, so
    per task the LONGEST samples by characters are tokenised (tokens grow with characters within
    a task's template), each image taking the most tokens the prompt gives one (`max_slots`: LLaVA's
    fixed count; Qwen2-VL's at max_pixels, as no header is read)."""
    def longest(samples, key):
        return sorted(samples, key=key, reverse=True)[:LONGEST]

    def slots(s):
        return 0 if s.image is None else collator.prompt.max_slots

    length, answer, prompt = 1, 1, 1
    for t in tasks:
        for s in longest(t.train, lambda s: len(s.question) + len(s.answer)
                         + sum(len(q) + len(a) for q, a in s.later_turns)):
            r = collator.encode(s, slots=slots(s))
            length = max(length, len(r.ids))
            answer = max(answer, sum(1 for label in r.labels if label != IGNORE_INDEX))
        for s in longest(t.test, lambda s: len(s.question)):
            prompt = max(prompt, len(collator.encode(s, prompt_only=True, slots=slots(s)).ids))
    image = collator.prompt.max_slots
    return Shape(1, length, answer, image), Shape(1, prompt, max_new_tokens, image)
