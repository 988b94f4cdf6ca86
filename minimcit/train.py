"""The continual run: train each task in turn, evaluate every task after every stage, write
the accuracy matrix and its summary. Also stage 1 for MiniCoIN: a tokenizer and a tiny LLaVA
trained from scratch on captions of the synthetic world.

Resume works at task boundaries. Each stage draws its randomness from (seed, stage) alone, so
restarting from the checkpoint written after task k-1 trains task k exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapters import Method
from .checkpoint import atomic_write, save_llava
from .data import Collator, Sample, Task, caption_corpus, minicoin
from .metrics import continual_summary, score_task
from .model import Llava, LlavaConfig, TextConfig, VisionConfig
from .processing import SYSTEM, TextTokenizer


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
    seed: int = 0


class Progress:
    """One self-overwriting line: stage, step/total, loss, samples/s, ETA."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.label, self.total, self.quiet = label, total, quiet
        self.start = self.last = time.time()

    def update(self, step: int, loss: float, samples: int) -> None:
        now = time.time()
        if self.quiet or (now - self.last < 1.0 and step < self.total):
            return
        self.last, elapsed = now, now - self.start
        eta = elapsed / step * (self.total - step)
        print(f"\r[{self.label}] step {step}/{self.total} loss {loss:.3f} {samples / elapsed:.1f} samples/s "
              f"ETA {eta:.0f}s   ", end="" if step < self.total else "\n", file=sys.stderr, flush=True)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def autocast(device):
    """bf16 autocast on CUDA; on CPU a no-op, so training and evaluation stay fp32 there."""
    return torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))


def train_stage(model: Llava, params, samples: list[Sample], collator: Collator, cfg: TrainConfig, *,
                stage: int, label: str, method: Method | None = None, task: int = 0, device="cpu",
                quiet: bool = False) -> float:
    """Train `params` on `samples` for cfg.epochs; returns the last step's loss. Gradient
    accumulation weights every answer token equally across the micro-batches of a step."""
    torch.manual_seed(cfg.seed * 1000 + stage)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + stage)
    per_step = cfg.batch_size * cfg.grad_accum
    total = max(1, math.ceil(len(samples) * cfg.epochs / per_step))
    order = torch.cat([torch.randperm(len(samples), generator=g) for _ in range(math.ceil(cfg.epochs) + 1)])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, max(1, int(cfg.warmup_ratio * total))))
    model.train()
    model.language_model.gradient_checkpointing = cfg.gradient_checkpointing
    progress, loss_value = Progress(label, total, quiet), float("nan")
    for step in range(total):
        idx = order[step * per_step:(step + 1) * per_step].tolist()
        micro = [to_device(collator([samples[i] for i in idx[j:j + cfg.batch_size]]), device)
                 for j in range(0, len(idx), cfg.batch_size)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        loss_value = 0.0
        for b in micro:
            ctx = method.batch_context(b["attention_mask"], training=True) if method else nullcontext()
            with autocast(device), ctx:
                loss_sum, _ = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
                loss = loss_sum / max(1, n_tokens)  # every answer token of the step counts once
                extra = method.extra_loss(b, task) if method else None
                if extra is not None:
                    loss = loss + extra / len(micro)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label}: loss is {loss.item()} at step {step + 1}/{total}; stopping "
                                         "(lower --lr, or check the data)")
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        progress.update(step + 1, loss_value, (step + 1) * per_step)
    model.eval()
    return loss_value


# --------------------------------------------------------------------------- evaluation


def predict(model: Llava, samples: list[Sample], collator: Collator, cfg: TrainConfig, *, method=None,
            trained: int = 0, identity: str = "oracle", true_task: int = 0, device="cpu"):
    """Greedy answers for `samples`, with the task chosen by oracle identity or the selector.
    Returns (predictions, selector hits or None)."""
    preds, hits = [], []
    task_specific = method is not None and method.task_specific and trained > 0
    for start in range(0, len(samples), cfg.eval_batch_size):
        chunk = samples[start:start + cfg.eval_batch_size]
        batch = to_device(collator(chunk, generate=True), device)
        if not task_specific:
            groups = {None: list(range(len(chunk)))}
        elif identity == "selector":
            picked = method.select_tasks(batch).tolist()
            hits += [p == true_task for p in picked]
            groups = {t: [i for i, p in enumerate(picked) if p == t] for t in set(picked)}
        else:  # oracle: the task's own parameters; an unseen task uses the newest ones
            groups = {min(true_task, trained - 1): list(range(len(chunk)))}
        out = [None] * len(chunk)
        for t, rows in groups.items():
            if t is not None:
                method.use_task(t)
            sub = {k: v[rows] for k, v in batch.items()}
            ctx = method.batch_context(sub["attention_mask"]) if method else nullcontext()
            with ctx, autocast(device):
                new = model.generate(sub["input_ids"], sub["pixel_values"], sub["attention_mask"],
                                     max_new_tokens=cfg.max_new_tokens, eos_token_id=collator.tok.eos_id,
                                     pad_token_id=collator.tok.pad_id)
            for r, ids in zip(rows, new.tolist()):
                out[r] = collator.tok.decode(ids).strip()
        preds += out
    return preds, (hits if identity == "selector" and task_specific and true_task < trained else None)


def evaluate(model, tasks: list[Task], collator, cfg, *, method=None, trained=0, identity="oracle",
             device="cpu", quiet=False):
    """Scores and format rates (percent) of every task, and selector hits on the seen ones."""
    row, fmt, hits = [], [], []
    for j, task in enumerate(tasks):
        preds, h = predict(model, task.test, collator, cfg, method=method, trained=trained, identity=identity,
                           true_task=j, device=device)
        score, f = score_task(task.kind, preds, [s.target for s in task.test])
        row.append(round(score, 2))
        fmt.append(round(f, 2))
        hits += h or []
        if not quiet:
            print(f"  eval {task.name:10s} {score:6.1f}  (format {f:5.1f}%)  e.g. {preds[0]!r}", file=sys.stderr)
    return row, fmt, hits


# --------------------------------------------------------------------------- the continual run


def run_continual(model: Llava, method: Method, tasks: list[Task], collator: Collator, cfg: TrainConfig, out: Path,
                  *, identity: str = "oracle", resume: bool = False, device="cpu", run_info: dict | None = None,
                  quiet: bool = False) -> dict:
    """Train the task sequence with `method` (already injected), evaluating after each stage;
    writes out/results.json and out/checkpoints/ atomically after every stage."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    names = [t.name for t in tasks]
    fingerprint = {"method": type(method).__name__.lower(), "tasks": names, "config": asdict(cfg),
                   **(run_info or {})}
    results = {"method": fingerprint["method"], "tasks": names, "acc_matrix": [], "format_matrix": [],
               "summary": None, "params": None, "selector_accuracy": None,
               "task_identity": identity, "stage_seconds": [], "config": fingerprint, "complete": False}
    stages = 1 if method.joint else len(tasks)
    done = -1  # last finished stage; -1: not even the base evaluated
    if resume and (out / "results.json").is_file():
        results, done = _resume(out, ckpt_dir, fingerprint, method, model, cfg)
        print(f"resuming after stage {done} of {stages}", file=sys.stderr)
    elif resume:
        print(f"nothing to resume in {out}: starting afresh", file=sys.stderr)
    elif (out / "results.json").is_file():
        raise FileExistsError(f"{out / 'results.json'} exists: pass --resume to continue that run, or choose "
                              "another --out (nothing already written is overwritten)")

    if done < 0:  # row 0: the base model; every adapter is still the identity
        if method.num_tasks == 0:
            start_task(method, 0, cfg)
        results["params"] = params_of(method)  # as the first task starts training
        row, fmt, _ = evaluate(model, tasks, collator, cfg, device=device, quiet=quiet)
        results["acc_matrix"], results["format_matrix"] = [row], [fmt]
        _save(out, results)
        done = 0
    for stage in range(done + 1, stages + 1):
        t0 = time.time()
        k = stage - 1
        if method.num_tasks <= k:
            start_task(method, k, cfg)
        params = method.trainable_parameters() + (list(model.multi_modal_projector.parameters())
                                                  if cfg.train_projector else [])
        samples = [s for t in tasks for s in t.train] if method.joint else tasks[k].train
        label = "joint" if method.joint else f"task {stage}/{stages} {tasks[k].name}"
        train_stage(model, params, samples, collator, cfg, stage=stage, label=label, method=method, task=k,
                    device=device, quiet=quiet)
        method.end_task(k)
        trained = len(tasks) if method.joint else stage
        row, fmt, hits = evaluate(model, tasks, collator, cfg, method=method, trained=min(trained, method.num_tasks),
                                  identity=identity, device=device, quiet=quiet)
        rows = len(tasks) if method.joint else 1  # joint: one model stands for every stage
        results["acc_matrix"] += [row] * rows
        results["format_matrix"] += [fmt] * rows
        if hits:
            results["selector_accuracy"] = round(100 * sum(hits) / len(hits), 2)
        results["stage_seconds"].append(round(time.time() - t0, 1))
        results["params"]["total_added"] = params_of(method)["total_added"]
        if stage == stages:
            results["summary"] = continual_summary(results["acc_matrix"], results["format_matrix"])
            results["complete"] = True
        _checkpoint(ckpt_dir, stage, method, model, cfg)
        _save(out, results)
    return results


def start_task(method: Method, k: int, cfg: TrainConfig) -> None:
    """New task parameters drawn from (seed, task) alone, so a resumed run draws the same ones."""
    torch.manual_seed(cfg.seed * 1000 + 500 + k)
    method.start_task(k)


def params_of(method: Method) -> dict:
    """trainable: receiving gradients now; total_added: every tensor the method added so far."""
    added = sum(p.numel() for p in method.adapter_parameters())
    return {"trainable": sum(p.numel() for p in method.trainable_parameters()), "total_added": added}


def _save(out: Path, results: dict) -> None:
    text = json.dumps(results, indent=1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))


def _checkpoint(ckpt_dir: Path, stage: int, method: Method, model: Llava, cfg: TrainConfig) -> None:
    """Adapter-only state after `stage`: the method's tensors, which of them are frozen, and the
    projector when it is trained."""
    state = {"stage": stage, "num_tasks": method.num_tasks, "adapters": method.adapter_state_dict(),
             "frozen": [i for i, p in enumerate(method.adapter_parameters()) if not p.requires_grad]}
    if cfg.train_projector:
        state["projector"] = model.multi_modal_projector.state_dict()
    atomic_write(ckpt_dir / f"after_stage_{stage}.pt", lambda tmp: torch.save(state, tmp))


def _resume(out: Path, ckpt_dir: Path, fingerprint: dict, method: Method, model: Llava, cfg: TrainConfig):
    results = json.loads((out / "results.json").read_text())
    if results.get("config") != fingerprint:
        raise ValueError(f"{out / 'results.json'} was written by a different run (method, tasks, settings or "
                         "model differ); use another --out, or drop --resume to start afresh")
    done = len(results["acc_matrix"]) - 1
    if method.joint and done > 0:
        done = 1
    if done > 0:
        path = ckpt_dir / f"after_stage_{done}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; cannot resume after stage {done}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        while method.num_tasks < state["num_tasks"]:
            start_task(method, method.num_tasks, cfg)  # shapes only: the values come from the checkpoint
        method.load_adapter_state_dict(state["adapters"], source=str(path))
        frozen = set(state["frozen"])
        for i, p in enumerate(method.adapter_parameters()):
            p.requires_grad_(i not in frozen)
        if "projector" in state:
            model.multi_modal_projector.load_state_dict(state["projector"])
    elif method.num_tasks == 0:
        start_task(method, 0, cfg)
    return results, done


# --------------------------------------------------------------------------- stage 1 for MiniCoIN

BASE_PRESETS = {  # the tiny LLaVA each MiniCoIN preset starts from, and its pre-training
    "smoke": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16),
                  text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2),
                  vocab=400, corpus=64, epochs=1, batch=16, lr=3e-3),
    "default": dict(vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                image_size=64, patch_size=16),
                    text=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=6,
                              num_key_value_heads=2),
                    vocab=800, corpus=46000, epochs=1, batch=16, lr=5e-4),
    "large": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                              image_size=224, patch_size=16),
                  text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4),
                  vocab=1000, corpus=60000, epochs=2, batch=64, lr=1e-3),
}


def default_cache() -> Path:
    return Path(os.environ.get("MINIMCIT_CACHE", Path.home() / ".cache" / "minimcit"))


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with digits split one by one (boxes and counts read digit by digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def pretrain_base(preset: str = "default", seed: int = 0, cache: Path | None = None, device="cpu",
                  quiet: bool = False) -> Path:
    """The MiniCoIN base model: a tokenizer trained on the synthetic world's text, and a tiny
    LLaVA (vision tower, projector, LLM, all from random init) trained on its captions. Saved in
    the llava-hf layout with tokenizer.json, cached by preset, seed and recipe."""
    spec = BASE_PRESETS[preset]
    recipe = json.dumps({"preset": preset, "seed": seed, "spec": spec, "version": 3}, sort_keys=True)
    folder = (cache or default_cache()) / f"minicoin-base-{preset}-{hashlib.sha1(recipe.encode()).hexdigest()[:10]}"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    t0 = time.time()
    size = spec["vision"]["image_size"]
    corpus = caption_corpus(spec["corpus"], size, seed)
    task_text = [f"{s.question} {s.answer}" for order in ("minicoin", "minicvit")
                 for t in minicoin(order, preset, seed) for s in t.train]
    tok_json = train_tokenizer([SYSTEM + " USER: ASSISTANT:"] * 10 + [f"{s.question} {s.answer}" for s in corpus]
                               + task_text, spec["vocab"])
    vocab = tok_json.get_vocab_size()
    cfg = LlavaConfig(vision=VisionConfig(**spec["vision"]),
                      text=TextConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                      max_position_embeddings=1024, **spec["text"]),
                      image_token_index=tok_json.token_to_id("<image>"))
    torch.manual_seed(seed)
    model = Llava(cfg).to(device)
    with torch.no_grad():  # GPT-style small init: the default Linear init is too large for a deep residual stack
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok_json.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "pad_token": "<pad>"}))
    collator = Collator(TextTokenizer(tmp), cfg.num_image_tokens, cfg.image_token_index, size, plain=True)
    tcfg = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch"], lr=spec["lr"], warmup_ratio=0.05,
                       weight_decay=0.01, seed=seed)
    loss = train_stage(model, list(model.parameters()), corpus, collator, tcfg, stage=0, label="stage 1 (captions)",
                       device=device, quiet=quiet)
    save_llava(model, tmp)
    (tmp / "pretrain.json").write_text(json.dumps({"recipe": json.loads(recipe), "final_loss": loss,
                                                   "seconds": round(time.time() - t0, 1)}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)  # the cache entry appears whole or not at all
    return folder
