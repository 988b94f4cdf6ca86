"""What every continual adapter method shares: the wrapped layer (a frozen Linear W0 plus
s * delta(x), keeping W0's state-dict keys), injection by full module name, and the task life
cycle `Method` runs. The four adapter families and their methods are in adapters.py.

The life cycle: start_task (which calls the method's one hook, `add_task_parameters`) -> train
(train_samples, trainable parameters, extra_loss per micro-batch, step_loss per optimiser step)
-> end_task; then use_task / select_tasks and `inference` (merged where exact) at test time,
and parameter accounting. `stages` says which tasks each training stage sees.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .selector import TaskSelector, sample_embeddings

# Placement by full module name, scoped to the language model and the projector, whose names the
# backbone gives (Backbone.PROJECTOR): both backbones name their decoders' linears as LLaMA does.
def target_pattern(model, target: str) -> str:
    """The regex of a named placement ("llm", "ffn+projector"), or `target` itself, a regex."""
    if target == "llm":
        return r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    if target == "ffn+projector":
        return r"language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj|" + model.PROJECTOR
    return target


def kaiming(p: torch.Tensor) -> torch.Tensor:
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # nn.Linear's (and peft's lora_A) default
    return p


class AdapterLinear(nn.Module):
    """A frozen Linear plus s * delta(x). Holds W0 as its own `weight`/`bias` so the
    wrapped layer's state-dict keys do not change; adapter tensors are float32."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)  # W0 is frozen: the adapter is what trains
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)
        self.r, self.scaling = r, alpha / r
        self.task = 0  # which task's parameters the forward uses
        self.plain = False  # the forward is W0 x + b alone: while merged, or while the base model answers
        self.w0 = None  # while merged: W0 as it was (host memory), to restore exactly
        self.dropout = 0.0  # on the adapter's input while training, as the reference codebases do

    mergeable = False  # True where delta_weight exists: the update is one matrix, not routed per input

    def drop(self, x):
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def zeros(self, *shape) -> nn.Parameter:
        """A new float32 Parameter of zeros on the base layer's device."""
        return nn.Parameter(torch.zeros(*shape, device=self.weight.device, dtype=torch.float32))

    def forward(self, x, tokens=None):
        if self.plain:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (n, out), not a view
        h, B = self.update(x, tokens)  # s * delta(x) = h B^T
        # y += h B^T in one GEMM: no (..., out) temporary for the update, nor a pass for s (in h);
        # in place on y itself, not on a view of it, whose backward would copy the gradient twice.
        # x stays in its dtype: under autocast the adapter GEMMs run in bf16 whatever x's dtype,
        # so an fp32 copy of x would cost bytes and change nothing.
        y.addmm_(h.reshape(-1, h.shape[-1]).to(y.dtype), B.t().to(y.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def update(self, x, tokens=None):
        """The active task's update as one product, s * delta(x) = h B^T: h (..., k) and B (out, k),
        with s already in h (a k-wide tensor, k the adapter's rank, not the layer's width).
        `tokens` (model.Tokens, None outside the LLM): what the call's tokens are, for a layer that
        routes per sequence or counts its gates over real tokens (BranchLoRA); others ignore it."""
        raise NotImplementedError

    def delta_weight(self):  # (out, in): s * DeltaW of the active task
        raise NotImplementedError(f"{type(self).__name__} routes per input and cannot be merged")

    def merge(self) -> None:
        """W0 <- W0 + s DeltaW_task: a plain Linear's cost, the same outputs up to rounding (in bf16,
        W0 + s DeltaW is rounded to bf16). W0 is kept in host memory, so unmerge restores it exactly
        (subtracting DeltaW again would not, in floating point)."""
        if self.w0 is None:
            with torch.no_grad():
                self.w0 = self.weight.detach().to("cpu", copy=True)
                self.weight += self.delta_weight().to(self.weight.dtype)
            self.plain = True

    def unmerge(self) -> None:
        if self.w0 is not None:
            with torch.no_grad():
                self.weight.copy_(self.w0)
            self.w0, self.plain = None, False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


def inject(model: nn.Module, target: str, make) -> list[str]:
    """Replace every nn.Linear whose full name matches `target` by make(linear); none in the vision tower."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target, n)]
    if not names:
        raise ValueError(f"no Linear layer of the model matches --target {target!r}")
    tower_names = getattr(model, "TOWER", None)  # None: a module without a vision tower (the tests' toys)
    tower = [n for n in names if tower_names and re.fullmatch(tower_names, n)]
    if tower:  # the vision tower stays as its pre-training left it
        raise ValueError(f"--target {target!r} matches {tower[0]!r}: adapters go in the language model and "
                         "the projector only")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, make(model.get_submodule(name)))
    return names


def wrap_summary(method: str, names: list[str]) -> str:
    kinds = Counter(n.rsplit(".", 1)[-1] for n in names)
    return f"{method}: wrapped {len(names)} linears (" + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) + ")"


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: from `low` to `high` (None: unbounded), each end
    included unless open."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value) -> bool:
        return ((self.low is None or value > self.low or (value == self.low and not self.open_low))
                and (self.high is None or value < self.high or (value == self.high and not self.open_high)))

    def __str__(self) -> str:
        def number(v) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"
        low = "-inf" if self.low is None else number(self.low)
        high = "inf" if self.high is None else number(self.high)
        return f"{'(' if self.open_low or self.low is None else '['}{low}, {high}{')' if self.open_high or self.high is None else ']'}"


POSITIVE = Range(0, open_low=True)  # (0, inf)
COUNT = Range(1)  # [1, inf): an integer count
NON_NEGATIVE = Range(0)  # [0, inf)
FRACTION = Range(0, 1, open_high=True)  # [0, 1): a dropout rate
UNIT = Range(0, 1)  # [0, 1]


@dataclass(frozen=True)
class Option:
    """A method's own command-line flag (--name-with-dashes), declared on the method's class;
    run.py builds its parser, checks and --help from these. type None: a switch (--x, or --x /
    --no-x when negatable); `range`: the values a number may take, checked before anything loads."""
    name: str
    help: str
    type: type | None = None
    choices: tuple = ()
    range: Range | None = None
    negatable: bool = False


# Flags that several methods share.
DORA = Option("dora", "weight-decomposed LoRA (DoRA)")
USE_SELECTOR = Option("use_selector", "train the task selector too")


# Every random stream of a run comes from (seed, purpose, index) alone, so a resumed run, any
# number of processes and any order of calls draw the same numbers. The offsets keep the streams
# apart (and are the ones runs were made with before this table).
STREAMS = {"training order": 0, "new task parameters": 500, "replay memory": 700, "task samples": 800,
           "adapter dropout": 900}


def stream_seed(seed: int, purpose: str, index: int) -> int:
    """The seed of stream `purpose` (STREAMS) for stage or task `index` of a run seeded `seed`."""
    return seed * 1000 + STREAMS[purpose] + index


class Method:
    """The continual life cycle around one adapter family. Tasks are numbered from 0."""

    default_target = "llm"
    task_specific = False  # has per-task parameters: inference needs a task (oracle or selector)
    options: tuple[Option, ...] = ()  # its own flags, beyond r, lora_alpha and dropout
    paper_recipe = "coin"  # the training recipe of the paper it is measured in (run.py's RECIPES)
    paper_identity = "oracle"  # how its paper picks a task at test time on real data

    def __init__(self, model, *, r: int = 128, lora_alpha: float = 256, target: str | None = None,
                 dropout: float = 0.0, use_selector: bool = False, align_weight: float = 1.0, verbose: bool = True):
        if r < 1:
            raise ValueError(f"--r must be at least 1, got {r}")
        self.model, self.r, self.lora_alpha = model, r, lora_alpha
        self.num_tasks = 0
        pattern = target_pattern(model, target or self.default_target)
        self.names = inject(model, pattern, self.make_layer)
        self.layers = [model.get_submodule(n) for n in self.names]
        if not 0 <= dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {dropout}")
        for layer in self.layers:
            layer.dropout = dropout
        self.selector = None
        if use_selector:
            self.selector = TaskSelector(model.image_embedding_dim, model.config.text.hidden_size,
                                         device=model.lm_head.weight.device)
        self.align_weight = align_weight
        if verbose:
            print(wrap_summary(type(self).__name__.lower(), self.names))

    def make_layer(self, base: nn.Linear) -> AdapterLinear:
        raise NotImplementedError

    def stages(self, num_tasks: int) -> list[list[int]]:
        """The tasks each training stage sees, in order: one task per stage (the joint
        baseline overrides this with one stage of every task). Stage k is method task k."""
        return [[t] for t in range(num_tasks)]

    # -- training
    def start_task(self, t: int) -> None:
        if t != self.num_tasks:
            raise ValueError(f"tasks start in order: expected task {self.num_tasks}, got {t}")
        self.add_task_parameters(t)
        self.num_tasks += 1
        if self.selector is not None:
            self.selector.add_task()
        self.use_task(t)

    def add_task_parameters(self, t: int) -> None:
        """The one hook a method fills in: create (and freeze) what task t needs."""

    def train_samples(self, stage_tasks: list[int], tasks: list, seed: int) -> list:
        """What a stage trains on: its tasks' training samples (Replay adds its memory)."""
        return [s for j in stage_tasks for s in tasks[j].train]

    def end_task(self, t: int, sample_losses=None) -> None:
        """After task t trained. `sample_losses(n)` yields the losses of n of its training
        samples, one at a time, for methods that measure the task's data (EWC's Fisher)."""

    def statistics(self) -> list:
        """Tensors a method accumulates from the data it trains on (summed over processes under
        torchrun before end_task reads them)."""
        return []

    def extra_loss(self, batch: dict, task: int, logits=None):
        """Method losses added to L_task, already weighted (None when there are none). `logits`:
        the training forward's answer logits (n, V), for methods that compare them (LwF)."""
        if self.selector is None:
            return None
        e_img, e_txt = sample_embeddings(self.model, batch["input_ids"], batch["pixel_values"],
                                         batch["instruction_mask"])
        return self.align_weight * self.selector.align_loss(e_img, e_txt, task)  # lambda * L_align

    def step_loss(self, task: int):
        """Method losses of the parameters alone (no batch in them), already weighted; added once
        per optimiser step, not once per micro-batch (None when there are none)."""
        return None

    # -- inference
    def use_task(self, t: int) -> None:
        for layer in self.layers:
            layer.task = t

    def select_tasks(self, batch: dict):
        """Task index per sample from the selector (identity-free inference)."""
        if self.selector is None:
            raise ValueError(f"{type(self).__name__} was built without a task selector")
        e_img, e_txt = sample_embeddings(self.model, batch["input_ids"], batch["pixel_values"],
                                         batch["instruction_mask"])
        return self.selector.select(e_img, e_txt)

    def merge(self, t: int) -> None:
        self.use_task(t)
        for layer in self.layers:
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers:
            layer.unmerge()

    @property
    def mergeable(self) -> bool:
        return all(layer.mergeable for layer in self.layers)

    @contextmanager
    def base_model(self):
        """The base model, before any task: every layer's forward is W0 alone. The adapters are
        still the identity then (B = 0), so this skips their arithmetic and changes no output."""
        for layer in self.layers:
            layer.plain = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.plain = False

    @contextmanager
    def inference(self, t: int | None):
        """Task t's parameters for generation (None: a method without task identity), merged into W0
        where every layer allows it (the LoRA family, O-LoRA, LiLoRA), and W0 restored exactly after."""
        if not self.mergeable:
            if t is not None:
                self.use_task(t)
            yield
            return
        self.merge(0 if t is None else t)
        try:
            yield
        finally:
            self.unmerge()

    # -- accounting and checkpoints
    def adapter_tensors(self) -> dict:
        """The live tensors of the method by state-dict name (adapters, routers, statistics,
        selector keys), the wrapped W0 excluded."""
        base = {id(t) for layer in self.layers for t in (layer.weight, layer.bias)}
        state = {f"{name}.{k}": v for name, layer in zip(self.names, self.layers)
                 for k, v in layer.state_dict(keep_vars=True).items() if id(v) not in base}
        if self.selector is not None:
            state.update({f"selector.{k}": v for k, v in self.selector.state_dict(keep_vars=True).items()})
        return state

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every parameter the method added (the wrapped W0 excluded), trainable or not."""
        return [v for v in self.adapter_tensors().values() if isinstance(v, nn.Parameter)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapter_parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """The trainable tensors as optimiser groups. Decision (SPEC §2): the selector's keys are a
        group of their own, with no weight decay and outside the gradient-norm clip ("clip": False).
        L_align is summed over the batch and fresh keys are short, so their gradient norm starts
        tens of times max_grad_norm: inside a shared clip it would shrink the adapters' step."""
        keys = {id(p) for p in self.selector.parameters()} if self.selector is not None else set()
        trainable = self.trainable_parameters()
        groups = [{"params": [p for p in trainable if id(p) not in keys], "clip": True}]
        if keys:
            groups.append({"params": [p for p in trainable if id(p) in keys], "weight_decay": 0.0, "clip": False})
        return groups

    def adapter_state_dict(self) -> dict:
        """The method's tensors only, for an adapter-only checkpoint."""
        return {k: v.detach() for k, v in self.adapter_tensors().items()}

    def load_adapter_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Copy an adapter_state_dict into the method's tensors (their shapes must already exist:
        start the same number of tasks first)."""
        own = self.adapter_tensors()
        with torch.no_grad():
            for name, value in state.items():
                if name not in own:
                    raise KeyError(f"{source}: {name!r} is not a tensor of this method")
                own[name].copy_(value)
