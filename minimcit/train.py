"""The continual run: train each stage in turn (one task, or all of them for the joint
baseline), evaluate after every stage (the tasks trained so far and the next), write the accuracy
matrix and its summary.
`train_stage` is the step loop, shared with stage-1 pre-training (pretrain.py); what the run
folder holds and how it is written is in runfolder.py.

Resume works at stage boundaries. Each stage draws its randomness from (seed, stage) alone, so
restarting from the checkpoint written after task k-1 trains task k exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .data import Collator, Sample, Task
from .method import Method, stream_seed
from .metrics import tasks_answered_per_row, tasks_answered_per_stage, continual_summary
from .model import IGNORE_INDEX, Backbone
from .official import percent, score_items
from .runfolder import (first_difference, load_checkpoint, read_results, run_lock, save_checkpoint, save_results,
                        seeded_start_task, stages_done, write_predictions)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 32
    max_new_tokens: int = 32
    gradient_checkpointing: bool = False
    train_projector: bool = False
    group_by_modality_length: bool = False  # LLaVA's batching: one modality per step, lengths sorted within
    num_workers: int = 0  # DataLoader processes decoding images; the batches are the same for any number
    projector_lr: float | None = None  # the projector's own rate when trained (CoIN: 2e-5); None: lr
    seed: int = 0


class Progress:
    """One self-overwriting line: what, done/total, a detail (loss, samples/s; a task's score), ETA."""

    def __init__(self, label: str, total: int, quiet: bool = False, unit: str = "step"):
        self.label, self.total, self.quiet, self.unit = label, total, quiet, unit
        self.start = self.last = time.time()

    def update(self, done: int, detail: str = "") -> None:
        now = time.time()
        if self.quiet or (now - self.last < 1.0 and done < self.total):
            return
        self.last, elapsed = now, now - self.start
        eta = elapsed / done * (self.total - done)
        print(f"\r[{self.label}] {self.unit} {done}/{self.total} {detail} ETA {eta:.0f}s   ",
              end="" if done < self.total else "\n", file=sys.stderr, flush=True)


def keep_freed_memory() -> None:
    """CPU runs: glibc gives freed blocks above its mmap threshold (128 KiB, raised adaptively up to
    32 MiB) back to the OS, and the next allocation of that size faults zero-filled pages back in.
    Every layer's activations are such blocks, so a CPU forward spent 20-25% of its time in page
    faults (MiniCoIN prefill: benchmarks/README.md). Keep freed memory for reuse instead. Numbers
    are unchanged; the process holds its peak memory until it exits."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # int mallopt(int param, int value)
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest value glibc accepts; fixed, no longer adaptive
    # M_TRIM_THRESHOLD: trim the heap's top only past 2 GiB free. mallopt takes a C int: a larger
    # value (1 << 40 here once) wrapped to 0, which trimmed at every free and faulted every block in again.
    libc.mallopt(-1, 2**31 - 1)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    return {k: None if v is None else v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def autocast(device, model: Backbone):
    """bf16 autocast wherever the base model is held in bf16, on CUDA and on CPU alike, so a CPU
    run with --dtype bf16 takes the path a GPU run takes (bf16 base, fp32 adapters and optimiser
    state); an fp32 base runs without it."""
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, torch.bfloat16, enabled=model.lm_head.weight.dtype == torch.bfloat16)


def modality_length_order(perm: list, samples: list[Sample], per_step: int, g: torch.Generator) -> list:
    """LLaVA's group_by_modality_length, made independent of the number of processes: the epoch's
    order split by modality (with an image, text-only), cut into steps, each step's samples sorted
    longest first (so micro-batches pad little), the steps shuffled, and the two modalities' last,
    partial steps joined at the end."""
    length = [len(s.question) + len(s.answer) + sum(len(q) + len(a) for q, a in s.later_turns) for s in samples]
    full, rest = [], []
    for group in ([i for i in perm if samples[i].image is not None], [i for i in perm if samples[i].image is None]):
        for k in range(0, len(group), per_step):
            chunk = sorted(group[k:k + per_step], key=lambda i: -length[i])
            (full if len(chunk) == per_step else rest).append(chunk)
    full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    return [i for chunk in full for i in chunk] + sorted((i for c in rest for i in c), key=lambda i: -length[i])


def micro_step(model: Backbone, method: Method | None, b: dict, n_tokens, n_micro: int, task: int, device,
               checkpointing: bool = False):
    """Forward and backward of one micro-batch of a step with `n_tokens` answer tokens (a number,
    or a tensor on the device) over its `n_micro` micro-batches; gradients accumulate in .grad.
    Returns the micro-batch's share of the step's loss as (L_task, the method's own terms), detached,
    on the device. benchmarks/bench_7b.py and minimcit/plan.py measure this very function."""
    with autocast(device, model):
        logits, target = model.answer_logits(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"],
                                             checkpointing=checkpointing, instruction_mask=b["instruction_mask"])
        task_loss = F.cross_entropy(logits.float(), target, reduction="sum") / n_tokens  # each answer token once
        extra = method.extra_loss(b, task, logits) if method else None  # LwF reads the student's logits
        extra = task_loss.new_zeros(()) if extra is None else extra / n_micro
    (task_loss + extra).backward()
    return torch.stack([task_loss, extra.float()]).detach()


def step_loss(method: Method | None, task: int, share: float):
    """The method's parameter-only losses, once per optimiser step, weighted by this process's
    share of the step's micro-batches (the shares of all processes sum to 1); backward taken.
    Returns the weighted loss (detached), or None. In fp32: no autocast around it."""
    extra = method.step_loss(task) if method and share else None
    if extra is None:
        return None
    extra = extra * share
    extra.backward()
    return extra.detach()


def sample_losses(model: Backbone, method: Method, samples: list[Sample], collator: Collator, seed: int, device):
    """n -> the losses (mean over each one's answer tokens) of n of `samples` drawn from `seed`,
    one sample per forward, dropout off, gradients on: what end_task gets to measure a task's
    data with (EWC's Fisher). Every process draws the same samples, so state agrees."""
    def losses(n: int):
        g = torch.Generator().manual_seed(seed)
        model.eval()
        for i in torch.randperm(len(samples), generator=g)[:n].tolist():
            b = to_device(collator([samples[i]]), device)
            with autocast(device, model):
                loss_sum, count = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
            yield loss_sum / max(1, count)
    return losses


def optimizer(groups: list[dict], projector, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the method's groups (Method.parameter_groups) at cfg.lr and the projector, if
    trained, at cfg.projector_lr. A group's "clip" says whether the gradient-norm clip covers it."""
    groups = [{"clip": True, **g, "params": list(g["params"])} for g in groups if g["params"]]
    if projector:
        groups.append({"params": list(projector), "lr": cfg.lr if cfg.projector_lr is None else cfg.projector_lr,
                       "clip": True})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def stage_steps(samples: list[Sample], cfg: TrainConfig, stage: int) -> list[list[list[int]]]:
    """A stage's optimiser steps, each a list of micro-batches of sample indices: batch_size x
    grad_accum samples a step, in an order drawn from (seed, stage) alone, so every process and
    a resumed run see the same steps."""
    g = torch.Generator().manual_seed(stream_seed(cfg.seed, "training order", stage))
    per_step = cfg.batch_size * cfg.grad_accum
    total = max(1, math.ceil(len(samples) * cfg.epochs / per_step))
    epochs = [torch.randperm(len(samples), generator=g).tolist() for _ in range(math.ceil(cfg.epochs) + 1)]
    if cfg.group_by_modality_length:
        epochs = [modality_length_order(perm, samples, per_step, g) for perm in epochs]
    order = [i for perm in epochs for i in perm]
    steps = [order[k * per_step:(k + 1) * per_step] for k in range(total)]
    return [[idx[j:j + cfg.batch_size] for j in range(0, len(idx), cfg.batch_size)] for idx in steps]


def refuse_untrained(model: Backbone, params: list, label: str) -> None:
    """Model tensors that take gradients outside the optimiser: autograd would fill their .grad at
    every step (a 7B base's worth of memory) and nothing would read it."""
    untrained = {id(p) for p in model.parameters() if p.requires_grad} - {id(p) for p in params}
    if untrained:
        name = next(n for n, p in model.named_parameters() if id(p) in untrained)
        raise ValueError(f"{label}: {len(untrained)} model tensor(s) receive gradients but are not trained, e.g. "
                         f"{name!r}; freeze the base first (model.requires_grad_(False)), then build the method")


def batches(samples: list[Sample], chunks: list[list[int]], collator: Collator, num_workers: int, pin: bool):
    """The collated micro-batches of `chunks`, in order. Images are decoded in DataLoader workers
    while the model trains; the chunks are fixed beforehand, so the worker count changes nothing
    but speed."""
    return iter(torch.utils.data.DataLoader(samples, batch_sampler=chunks, collate_fn=collator,
                                            num_workers=min(num_workers, os.cpu_count() or 1), pin_memory=pin,
                                            prefetch_factor=4 if num_workers else None))


def train_stage(model: Backbone, groups: list[dict], samples: list[Sample], collator: Collator, cfg: TrainConfig, *,
                stage: int, label: str, method: Method | None = None, task: int = 0, device="cpu",
                quiet: bool = False, projector=()) -> list:
    """Train the parameter `groups` (and `projector`, at cfg.projector_lr) on `samples` for cfg.epochs;
    returns the loss curve, [step, L_task, the method's own terms] about every 1% of the steps and
    at the last (the terms weighted as they enter the loss: lambda L_align, LiLoRA's lambda L_reg,
    EWC's penalty, LwF's distillation, O-LoRA's; 0 for a method without any). A step takes
    batch_size x grad_accum samples, drawn in an order fixed by the seed; under torchrun its
    micro-batches are dealt out across processes and the gradients summed (distributed.py).
    Gradient accumulation weights every answer token of the step equally, on any world size."""
    torch.manual_seed(stream_seed(cfg.seed, "training order", stage))  # the stage's RNG, on every process alike
    rank, world = dist.rank(), dist.world_size()
    steps = [(chunks, chunks[rank::world]) for chunks in stage_steps(samples, cfg, stage)]  # all, and this process's
    total, per_step = len(steps), cfg.batch_size * cfg.grad_accum
    opt = optimizer(groups, projector, cfg)
    params = [p for group in opt.param_groups for p in group["params"]]
    refuse_untrained(model, params, label)
    clipped = [p for group in opt.param_groups if group["clip"] for p in group["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, max(1, int(cfg.warmup_ratio * total))))
    model.train()
    progress, curve, every = Progress(label, total, quiet), [], max(1, total // 100)
    cuda = str(device).startswith("cuda")
    loader = batches(samples, [c for _, mine in steps for c in mine], collator, cfg.num_workers, cuda)
    for step, (chunks, mine) in enumerate(steps):
        # The step's batches wait in (pinned) host memory: their answer tokens are counted there, and
        # each goes to the device only as its forward starts, so one micro-batch is on it at a time.
        micro = [next(loader) for _ in mine]
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        # The step's answer tokens over every process: summed on the device, and kept there (no sync).
        n_tokens = dist.sum_(torch.tensor(local, device=device)).clamp(min=1)
        losses = torch.zeros(2, dtype=torch.float64, device=device)  # L_task, the method's terms
        for k, b in zip(range(rank, len(chunks), world), micro):  # k: the micro-batch's place in the step
            # Its dropout masks from (seed, stage, step, k) alone: whichever process runs micro-batch k
            # draws what one process would, so any world size takes the same step.
            torch.manual_seed(stream_seed(cfg.seed, "adapter dropout", stage) * 2**40 + step * 2**16 + k)
            losses += micro_step(model, method, to_device(b, device, non_blocking=cuda), n_tokens, len(chunks),
                                 task, device, checkpointing=cfg.gradient_checkpointing)
        extra = step_loss(method, task, len(mine) / len(chunks))
        if extra is not None:
            losses[1] += extra
        task_value, extra_value = dist.sum_(losses).tolist()  # the step's one host sync
        loss_value = task_value + extra_value
        if not math.isfinite(loss_value):  # decided on the summed value, so every process stops together
            raise FloatingPointError(f"{label}: loss is {loss_value} at step {step + 1}/{total}; stopping "
                                     "(lower --lr, or check the data)")
        dist.sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(clipped, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        terms = f" + {extra_value:.3f}" if extra_value else ""
        progress.update(step + 1, f"L_task {task_value:.3f}{terms} "
                                  f"{(step + 1) * per_step / (time.time() - progress.start):.1f} samples/s")
        if (step + 1) % every == 0 or step + 1 == total:
            curve.append([step + 1, round(task_value, 5), round(extra_value, 5)])
    model.eval()
    return curve


# --------------------------------------------------------------------------- evaluation


def eval_batches(samples: list[Sample], collator: Collator, batch_size: int) -> list[list[int]]:
    """The items' indices cut into batches of similar prompt length, longest first: little left
    padding, and the largest batch runs first, so one that does not fit fails at once."""
    length = [collator.prompt_length(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: -length[i])  # stable: ties keep the file's order
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def dealt(samples: list[Sample], collator: Collator, cfg: TrainConfig, device, answer, label=None) -> list:
    """answer(prompt batch on the device) -> one result per row, for every sample, in order. The
    batches (eval_batches) are dealt out across processes under torchrun and gathered back;
    prompts are collated (images decoded) in DataLoader workers while the model generates."""
    batches = eval_batches(samples, collator, cfg.eval_batch_size)
    mine = batches[dist.rank()::dist.world_size()]
    cuda = str(device).startswith("cuda")
    workers = min(cfg.num_workers, os.cpu_count() or 1) if mine else 0
    loader = torch.utils.data.DataLoader(samples, batch_sampler=mine, collate_fn=collator.prompts,
                                         num_workers=workers, pin_memory=cuda,
                                         prefetch_factor=2 if workers else None)
    progress = Progress(label, len(mine), quiet=label is None or len(mine) < 2, unit="batch")
    out = {}
    for k, (rows, batch) in enumerate(zip(mine, loader)):
        out.update(zip(rows, answer(to_device(batch, device, non_blocking=cuda))))
        progress.update(k + 1)
    found = {i: v for part in dist.gather(out) for i, v in part.items()}
    return [found[i] for i in range(len(samples))]


def predict(model: Backbone, samples: list[Sample], collator: Collator, cfg: TrainConfig, *, method=None,
            trained: int = 0, identity: str = "oracle", true_task: int = 0, device="cpu", label=None):
    """Greedy answers for `samples`, with the task chosen by oracle identity or the selector.
    Returns (predictions, selector hits or None). The items are grouped by the task whose
    parameters answer them (all of them under oracle identity; the selector's choice, made first
    for every item, otherwise), and each group is answered with that task's parameters merged
    into W0 where the method allows it (Method.inference)."""
    task_specific = method is not None and method.task_specific and trained > 0
    if not task_specific:
        picked = [None] * len(samples)
    elif identity == "selector":
        picked = dealt(samples, collator, cfg, device, lambda b: method.select_tasks(b).tolist())
    else:  # oracle: the task's own parameters; an unseen task uses the newest ones
        picked = [min(true_task, trained - 1)] * len(samples)

    def answer(b):
        with autocast(device, model):
            new_ids = model.generate(b["input_ids"], b["pixel_values"], b["attention_mask"],
                                     max_new_tokens=cfg.max_new_tokens, eos_token_id=collator.tok.eos_id,
                                     pad_token_id=collator.tok.pad_id, instruction_mask=b["instruction_mask"])
        return [collator.tok.decode(ids).strip() for ids in new_ids.tolist()]

    preds = [None] * len(samples)
    for t in sorted(set(picked), key=lambda t: -1 if t is None else t):
        rows = [i for i, p in enumerate(picked) if p == t]
        with nullcontext() if method is None else method.inference(t) if trained else method.base_model():
            for i, p in zip(rows, dealt([samples[i] for i in rows], collator, cfg, device, answer, label)):
                preds[i] = p
    hits = [p == true_task for p in picked]
    return preds, (hits if identity == "selector" and task_specific and true_task < trained else None)


PROTOCOLS = ("official", "robust")


def suffix(primary: str, protocol: str) -> str:
    """Where a protocol's numbers sit in results.json: `acc_matrix` and `summary` for the primary
    one, `acc_matrix_<protocol>` and `summary_<protocol>` for the other."""
    return "" if protocol == primary else f"_{protocol}"


def empty_row(n: int) -> tuple[dict, list]:
    """A row of n unscored tasks for every protocol and the format matrix (--skip-base-eval)."""
    return {p: [None] * n for p in PROTOCOLS}, [None] * n


@dataclass
class Evaluation:
    """One evaluation: a row of each protocol's matrix and of the format matrix
    (percent; None where a protocol cannot score a task or the task was not evaluated), selector
    hits, and per-item records."""
    rows: dict  # protocol -> [score per task]
    format: list
    hits: list
    items: dict  # task name -> [{"id", "question", "prediction", "gold", "robust", "official", "format"}]


def score_task(task: Task, preds: list[str]):
    """Both protocols' task scores, the format rate and the per-item records of `task`'s test items."""
    return score_records(task.scorer, task.official, [{"id": s.id, "question": s.question, "prediction": p,
                                                       "gold": s.target, "size": s.size}
                                                      for s, p in zip(task.test, preds)])


def score_records(scorer: str, rule: str | None, records: list[dict]):
    """score_task on records (id, question, prediction, gold, size): a run's saved predictions."""
    per = score_items(scorer, rule, [r["prediction"] for r in records], [r["gold"] for r in records],
                      [r.get("size") for r in records])
    items = [{**{k: r.get(k) for k in ("id", "question", "prediction", "gold", "size")}, "robust": per["robust"][n],
              "official": None if per["official"] is None else per["official"][n], "format": per["format"][n]}
             for n, r in enumerate(records)]
    return {"robust": percent(per["robust"]), "official": percent(per["official"])}, percent(per["format"]), items


def evaluate(exp: "Experiment", *, trained: int = 0, label: str = "eval", upto: int | None = None) -> Evaluation:
    """The first `upto` tasks' test items (every task's by default) answered after `trained` tasks
    and scored under both protocols, with selector hits on the seen tasks; the rest of the row is None."""
    tasks = exp.tasks
    upto = len(tasks) if upto is None else upto
    ev = Evaluation({p: [None] * len(tasks) for p in PROTOCOLS}, [None] * len(tasks), [], {})
    progress = Progress(label, upto, exp.quiet, unit="task")
    for j, task in enumerate(tasks[:upto]):
        preds, h = predict(exp.model, task.test, exp.collator, exp.cfg, method=exp.method, trained=trained,
                           identity=exp.identity, true_task=j, device=exp.device,
                           label=None if exp.quiet else f"{label} {task.name}")
        scores, fmt, ev.items[task.name] = score_task(task, preds)
        for p in PROTOCOLS:
            ev.rows[p][j] = scores[p]
        ev.format[j] = fmt
        ev.hits += h or []
        shown = "  ".join(f"{p} {'n/a' if scores[p] is None else f'{scores[p]:5.1f}'}" for p in PROTOCOLS)
        progress.update(j + 1, f"{task.name}: {shown} (format {fmt:.0f}%)")
    return ev


# --------------------------------------------------------------------------- the continual run


@dataclass
class Experiment:
    """One continual run, resolved once from recipe, preset and flags (run.py's `build`); the loop
    reads everything from here. Its `config` in results.json (the method, the tasks, the recipe
    and `run_info`: hyper-parameters, data paths and hashes) is what --resume checks."""
    model: Backbone
    method: Method  # already injected into the model
    tasks: list[Task]
    collator: Collator
    cfg: TrainConfig
    identity: str = "oracle"  # how a task is chosen at test time: "oracle" or "selector"
    primary: str = "robust"  # the protocol acc_matrix holds; the other is acc_matrix_<other>
    device: object = "cpu"
    run_info: dict = field(default_factory=dict)
    plan: dict | None = None  # the memory plan this sitting follows (None: no plan was made)
    argv: list | None = None  # the command that made the run: --evaluate rebuilds it from there
    skip_base: bool = False  # row 0 left empty: every metric but FWT stands without it
    quiet: bool = False


def run_continual(exp: Experiment, out: Path, *, resume: bool = False) -> dict:
    """Train the task sequence stage by stage, as `method.stages` lays it out, evaluating after
    each stage (`metrics.tasks_answered_per_row`) under both protocols. Writes out/results.json,
    out/predictions/stage_<k>/ and out/checkpoints/ atomically after every stage. One run writes
    to a folder at a time (out/run.lock)."""
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):  # taken by rank 0 alone, which alone writes
        projector = trained_projector(exp.model, exp.method, exp.cfg)
        results, done = open_results(exp, out, resume)
        if done < 0:
            base_row(exp, out, results)
        for stage in range(max(done, 0) + 1, len(results["stages"]) + 1):
            run_stage(exp, out, results, stage, projector)
    return results


# How a run executes, not what it computes: the memory plan (or a flag) sets them per device, so a
# run resumed on another GPU may differ here; the global batch is what the optimisation sees.
EXECUTION = ("batch_size", "grad_accum", "gradient_checkpointing", "eval_batch_size", "num_workers")


def experiment(cfg: TrainConfig) -> dict:
    """The recipe as the run's fingerprint holds it: the execution settings replaced by the global batch."""
    d = {k: v for k, v in asdict(cfg).items() if k not in EXECUTION}
    return {**d, "global_batch": cfg.batch_size * cfg.grad_accum}


def new_results(exp: Experiment) -> dict:
    """results.json of a run about to start: what it is (its `config`, which resume checks), and
    empty matrices."""
    names = [t.name for t in exp.tasks]
    method = type(exp.method).__name__.lower()
    other = next(p for p in PROTOCOLS if p != exp.primary)  # Decision (SPEC §3): both protocols' matrices are kept
    return {"method": method, "tasks": names, "stages": exp.method.stages(len(exp.tasks)), "protocol": exp.primary,
            "acc_matrix": [], f"acc_matrix_{other}": [], "format_matrix": [], "summary": None,
            f"summary_{other}": None, "params": None, "selector_accuracy": None, "task_identity": exp.identity,
            "scoring": {t.name: {"scorer": t.scorer, "official": t.official, "test_file": t.test_file,
                                 "items": len(t.test)} for t in exp.tasks},
            "stage_seconds": [], "loss_curves": [],
            "config": {"method": method, "tasks": names, "config": experiment(exp.cfg), **exp.run_info},
            "complete": False, "argv": exp.argv}


def open_results(exp: Experiment, out: Path, resume: bool) -> tuple[dict, int]:
    """The run's results and its last finished stage (-1: not even the base evaluated): new, or
    read back by --resume with the method restored to that stage."""
    (out / "checkpoints").mkdir(exist_ok=True)
    results, done = new_results(exp), -1
    if resume and (out / "results.json").is_file():
        results, done = _resume(out, results["config"], exp)
        print(f"resuming after stage {done} of {len(results['stages'])}", file=sys.stderr)
    elif resume:
        print(f"nothing to resume in {out}: starting afresh", file=sys.stderr)
    elif (out / "results.json").is_file():
        raise FileExistsError(f"{out / 'results.json'} exists: pass --resume to continue that run, or choose "
                              "another --out (nothing already written is overwritten)")
    skipped = bool(results["acc_matrix"]) and all(v is None for v in results["acc_matrix"][0])
    if done >= 0 and skipped != exp.skip_base:  # row 0 is made (or skipped) as a run starts, not on resume
        print(f"note: {out} started {'with' if skipped else 'without'} --skip-base-eval; row 0 (the base model) "
              f"stays {'empty' if skipped else 'as evaluated'}", file=sys.stderr)
    results["plan"] = exp.plan  # this sitting's: a resumed run may run on another device
    results["execution"] = {k: getattr(exp.cfg, k) for k in EXECUTION}
    dist.barrier()  # every process has read the folder before rank 0 writes to it
    return results, done


def base_row(exp: Experiment, out: Path, results: dict) -> None:
    """Row 0: the base model, every adapter still the identity (the first task started)."""
    if exp.method.num_tasks == 0:
        seeded_start_task(exp.method, 0, exp.cfg)
    results["params"] = params_of(exp.method)  # as the first task starts training
    if exp.skip_base:
        add_rows(results, *empty_row(len(exp.tasks)), 1)
    else:
        ev = evaluate(exp, label="eval base")
        write_predictions(out, 0, ev.items)
        add_rows(results, ev.rows, ev.format, 1)
    save_results(out, results)


def run_stage(exp: Experiment, out: Path, results: dict, stage: int, projector: list) -> None:
    """Stage `stage` (from 1): start its task, train, end the task, evaluate, write everything."""
    t0, method, cfg, plan = time.time(), exp.method, exp.cfg, results["stages"]
    k = stage - 1  # the method's task index of this stage
    if method.num_tasks <= k:
        seeded_start_task(method, k, cfg)
    samples = method.train_samples(plan[k], exp.tasks, cfg.seed)
    what = exp.tasks[plan[k][0]].name if len(plan[k]) == 1 else f"all {len(plan[k])} tasks"
    curve = train_stage(exp.model, method.parameter_groups(), samples, exp.collator, cfg, stage=stage,
                        projector=projector, label=f"stage {stage}/{len(plan)} {what}", method=method, task=k,
                        device=exp.device, quiet=exp.quiet)
    for stat in method.statistics():  # data-driven state: the same sums on every process
        dist.sum_(stat)
    sample_seed = stream_seed(cfg.seed, "task samples", k)
    method.end_task(k, sample_losses(exp.model, method, samples, exp.collator, sample_seed, exp.device))
    ev = evaluate(exp, trained=method.num_tasks, label=f"eval after stage {stage}",
                  upto=tasks_answered_per_stage(plan, len(exp.tasks))[stage])
    write_predictions(out, stage, ev.items)
    add_rows(results, ev.rows, ev.format, len(plan[k]))  # one row per task the stage trained
    if ev.hits:
        results["selector_accuracy"] = round(100 * sum(ev.hits) / len(ev.hits), 2)
    results["stage_seconds"].append(round(time.time() - t0, 1))
    results.setdefault("loss_curves", []).append(curve)
    left = len(plan) - stage
    if not exp.quiet and left:
        eta = sum(results["stage_seconds"]) / len(results["stage_seconds"]) * left
        print(f"stage {stage}/{len(plan)} took {results['stage_seconds'][-1]:.0f}s; the run ends in about "
              f"{eta / 60:.1f} min", file=sys.stderr)
    results["params"]["total_added"] = params_of(method)["total_added"]
    results["complete"] = stage == len(plan)
    summarise(results)
    save_checkpoint(out / "checkpoints", stage, method, projector)
    save_results(out, results)


def add_rows(results: dict, rows: dict, fmt: list, copies: int) -> None:
    """Append one evaluation's row to each protocol's matrix and the format matrix, `copies` times
    (a stage that trained several tasks at once stands for each of them)."""
    for p, row in rows.items():
        results[f"acc_matrix{suffix(results['protocol'], p)}"] += [row] * copies
    results["format_matrix"] += [fmt] * copies


def summarise(results: dict) -> None:
    """The continual metrics of each protocol once the run is complete; None for a protocol with
    a cell it could not score (e.g. official TextVQA without its ten answers)."""
    shown = tasks_answered_per_row(results["stages"], len(results["tasks"]))
    for p in PROTOCOLS:
        where = suffix(results["protocol"], p)
        matrix = results[f"acc_matrix{where}"]
        ok = results["complete"] and all(v is not None for row, m in zip(matrix[1:], shown[1:]) for v in row[:m])
        results[f"summary{where}"] = continual_summary(matrix, results["format_matrix"]) if ok else None


def rescore(out: Path) -> dict:
    """Rebuild both protocols' matrices, the format matrix and the summaries of a run from its saved
    predictions, with no model (after a scorer changes, or to check a number). Only the stages
    whose checkpoint was written are rescored: the predictions of a stage killed before its
    checkpoint are left alone, so --resume still continues the run. Takes the run lock."""
    read_results(out, "--rescore")  # a folder that is not a run's is refused before the lock is taken
    with run_lock(out):
        results = read_results(out, "--rescore")
        tasks, done = results["tasks"], 0
        while done < len(results["stages"]) and (out / "checkpoints" / f"after_stage_{done + 1}.pt").is_file():
            done += 1
        recorded = stages_done(results)
        base_skipped = all(v is None for v in results["acc_matrix"][0]) if results["acc_matrix"] else False
        results.update({f"acc_matrix{suffix(results['protocol'], p)}": [] for p in PROTOCOLS}, format_matrix=[])
        upto = tasks_answered_per_stage(results["stages"], len(tasks))
        for stage, copies in enumerate([1] + [len(s) for s in results["stages"][:done]]):
            folder = out / "predictions" / f"stage_{stage}"
            if stage == 0 and base_skipped and not folder.is_dir():  # --skip-base-eval
                add_rows(results, *empty_row(len(tasks)), 1)
                continue
            rows, fmt = empty_row(len(tasks))
            for j, task in enumerate(tasks[:upto[stage]]):
                scores, f, _ = score_records(*scoring_of(results, task), saved_records(folder / f"{task}.jsonl",
                                                                                      results["scoring"][task]))
                for p in PROTOCOLS:
                    rows[p][j] = scores[p]
                fmt[j] = f
            add_rows(results, rows, fmt, copies)
        if done < recorded:
            print(f"--rescore: {out / 'checkpoints' / f'after_stage_{done + 1}.pt'} is missing, so stages after "
                  f"{done} are left out (--resume trains them again)", file=sys.stderr)
        results["complete"] = done == len(results["stages"])
        summarise(results)
        save_results(out, results)
    return results


def scoring_of(results: dict, task: str) -> tuple:
    try:
        return results["scoring"][task]["scorer"], results["scoring"][task]["official"]
    except (KeyError, TypeError):
        raise ValueError(f"results.json: task {task!r} has no scorer in 'scoring'") from None


def saved_records(path: Path, scoring: dict) -> list[dict]:
    """A stage's saved predictions of one task, checked against the test set the run recorded."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the saved predictions ({e})") from None
    for n, r in enumerate(records):
        if not isinstance(r, dict) or not {"id", "prediction", "gold"} <= set(r):
            raise ValueError(f"{path}, line {n + 1}: a prediction record needs 'id', 'prediction' and 'gold'")
        gold = r["gold"]
        if not isinstance(r["prediction"], str) or not (
                isinstance(gold, str) or (isinstance(gold, list) and all(isinstance(g, str) for g in gold))):
            raise ValueError(f"{path}, line {n + 1}: 'prediction' should be text and 'gold' text or a list of texts")
    items = scoring.get("items")  # recorded from issue 24 on
    if items is not None and len(records) != items:
        raise ValueError(f"{path} holds {len(records)} predictions but the run's test set had {items} items")
    return records


def trained_projector(model: Backbone, method: Method, cfg: TrainConfig) -> list[nn.Parameter]:
    """The projector's own weights when `train_projector` is set (CoIN's recipe), made
    trainable; they are not an adapter, so the method neither counts nor saves them."""
    if not cfg.train_projector:
        return []
    if any(n.startswith(model.projector_name + ".") for n in method.names):
        raise ValueError(f"--train-projector: {type(method).__name__} already adapts the projector "
                         "(its linears hold adapters); drop the flag")
    params = list(model.projector.parameters())
    for p in params:  # trained weights and their AdamW state in fp32, as the adapters
        p.data = p.data.float()  # per tensor, not Module.float(), which fake tensors (bench_7b.py) refuse
        p.requires_grad_(True)
    return params


def params_of(method: Method) -> dict:
    """trainable: receiving gradients now; total_added: every tensor the method added so far."""
    added = sum(p.numel() for p in method.adapter_parameters())
    return {"trainable": sum(p.numel() for p in method.trainable_parameters()), "total_added": added}


def _resume(out: Path, fingerprint: dict, exp: Experiment):
    path = out / "results.json"
    results = read_results(out, "--resume")
    diff = first_difference(results.get("config"), fingerprint)
    if diff is not None:
        setting, old, new = diff
        raise ValueError(f"--resume: {path} was written by a different run: {setting} was {old!r}, now {new!r}; "
                         f"give the settings it was made with, or another --out for a new run")
    done = stages_done(results)
    if done > 0:
        load_checkpoint(out / "checkpoints" / f"after_stage_{done}.pt", exp.method, exp.model, exp.cfg)
    elif exp.method.num_tasks == 0:
        seeded_start_task(exp.method, 0, exp.cfg)
    return results, done
