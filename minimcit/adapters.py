"""Continual adapters as explicit layers, and the methods that drive them across tasks.

Layers (each wraps a frozen Linear W0 and keeps its `weight`/`bias` keys unchanged):
    LoRALinear       y = W0 x + s B_t A_t x                    (SeqLoRA, DirLoRA, joint)
    MoELoRALinear    y = W0 x + s sum_n softmax(R x)_n B_n A_n x   (CoIN's MoELoRA)
    BranchLoRALinear y = W0 x + s sum_{n in topk} g_n B_n (A x)    (BranchLoRA)
    LiLoRALinear     y = W0 x + s (a_t B0 + (1 - a_t) B~_t A~_t) A x  (LiLoRA, Eq. 5-8)
with s = lora_alpha / r. Methods (`make_method`) inject a layer type by full module name and
run the continual life cycle: start_task -> train (trainable params + extra_loss) -> end_task,
then use_task / select_tasks at inference, merge, parameter accounting.
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

from .selector import TaskSelector, mean_patch_feature, sample_embeddings

# Placement by full module name, scoped to the language model and the projector.
TARGETS = {
    "llm": r"language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    "ffn+projector": r"language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj|multi_modal_projector\.linear_[12]",
}


def _kaiming(p: torch.Tensor) -> torch.Tensor:
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # nn.Linear's (and peft's lora_A) default
    return p


# --------------------------------------------------------------------------- layers


class AdapterLinear(nn.Module):
    """A frozen Linear plus s * delta(x). Holds W0 as its own `weight`/`bias` so the
    wrapped layer's state-dict keys do not change; adapter tensors are float32."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.scaling = r, alpha / r
        self.task = 0  # which task's parameters the forward uses
        self.merged = False

    def new(self, *shape) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, device=self.weight.device, dtype=torch.float32))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.delta(x.to(torch.float32)).to(y.dtype)

    def delta(self, x):  # s * (adapter update) x, x in float32
        raise NotImplementedError

    def delta_weight(self):  # (out, in): s * DeltaW of the active task
        raise NotImplementedError(f"{type(self).__name__} routes per input and cannot be merged")

    def merge(self) -> None:
        """W0 <- W0 + s DeltaW_task: a plain Linear's cost, same outputs."""
        if not self.merged:
            with torch.no_grad():
                self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class LoRALinear(AdapterLinear):
    """y = W0 x + s B_t A_t x; one (A, B) pair per task added (DirLoRA) or just one (SeqLoRA)."""

    def __init__(self, base, r: int, alpha: float):
        super().__init__(base, r, alpha)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()

    def add_task(self) -> None:
        for p in (*self.lora_A, *self.lora_B):
            p.requires_grad_(False)  # DirLoRA: an earlier task's pair is frozen
        self.lora_A.append(_kaiming(self.new(self.r, self.in_features)))  # A (r, in) Kaiming-uniform
        self.lora_B.append(self.new(self.out_features, self.r))  # B (out, r) zeros: identity at init

    def delta(self, x):
        return self.scaling * F.linear(F.linear(x, self.lora_A[self.task]), self.lora_B[self.task])

    def delta_weight(self):
        return self.scaling * self.lora_B[self.task] @ self.lora_A[self.task]  # (out, in)


class MoELoRALinear(AdapterLinear):
    """CoIN's MoELoRA: N experts of rank r/N, dense per-token softmax router, s = alpha / r."""

    def __init__(self, base, r: int, alpha: float, num_experts: int):
        super().__init__(base, r, alpha)
        self.num_experts, self.r_e = num_experts, r // num_experts
        # The N experts' A_n (r/N, in) stacked row-wise, B_n (out, r/N) column-wise.
        self.lora_A = self.new(num_experts * self.r_e, self.in_features)
        nn.init.normal_(self.lora_A, std=0.01)
        self.lora_B = self.new(self.out_features, num_experts * self.r_e)
        self.router = _kaiming(self.new(num_experts, self.in_features))  # R (N, in), no bias

    def delta(self, x):
        g = F.linear(x, self.router).softmax(-1)  # (..., N) dense gates
        a = F.linear(x, self.lora_A).unflatten(-1, (self.num_experts, self.r_e))  # (..., N, r/N): A_n x
        # sum_n g_n B_n A_n x == [B_1 .. B_N] (g_1 A_1 x; ...; g_N A_N x): one matmul for all experts
        return self.scaling * F.linear((g[..., None] * a).flatten(-2), self.lora_B)


@dataclass
class RoutingContext:
    """What BranchLoRA layers need to know about the batch beyond x: which tokens are real
    (for gate statistics and sequence routing) and whether to collect statistics."""
    mask: torch.Tensor | None = None  # (B, T) bool, True at real tokens
    collect: bool = False
    route: str = "token"


class BranchLoRALinear(AdapterLinear):
    """BranchLoRA: one shared A (r_b, in) and N branches B_n (out, r_b), r_b = r / N; a router
    per task (earlier ones frozen) picks the top-k branches per token."""

    def __init__(self, base, r: int, alpha: float, num_branches: int, top_k: int, ctx: RoutingContext):
        super().__init__(base, r, alpha)
        self.num_branches, self.top_k, self.r_b, self.ctx = num_branches, top_k, r // num_branches, ctx
        self.lora_A = _kaiming(self.new(self.r_b, self.in_features))  # the trunk, shared by all branches
        # One Parameter per branch so each can be frozen on its own.
        self.lora_B = nn.ParameterList(self.new(self.out_features, self.r_b) for _ in range(num_branches))
        self.routers = nn.ParameterList()  # R_t (N, in), one per task
        # Gate mass per branch over the current task's training tokens (the freezing rule).
        self.register_buffer("gate_mass", torch.zeros(num_branches, device=self.weight.device))
        self.register_buffer("gate_tokens", torch.zeros((), device=self.weight.device))
        self._sequence_gates = None  # route="sequence": the prompt's decision, kept while generating

    def add_task(self) -> None:
        for router in self.routers:
            router.requires_grad_(False)
        self.routers.append(_kaiming(self.new(self.num_branches, self.in_features)))
        self.gate_mass.zero_()
        self.gate_tokens.zero_()

    def route(self, x):  # (B, T, in) -> top-k gates and branch indices, each (B, T or 1, k)
        if self.ctx.route == "sequence":
            # One routing decision per sequence, from the mean x of its real tokens. A one-token
            # call after a longer one is a generation step: it keeps the prompt's decision.
            if x.shape[1] == 1 and self._sequence_gates is not None and len(self._sequence_gates[0]) == len(x):
                return self._sequence_gates
            mask = self.real_tokens(x)
            w = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
            x = ((x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1))[:, None]  # (B, 1, in)
        top, idx = F.linear(x, self.routers[self.task]).topk(self.top_k, dim=-1)  # R_t x, keep the k largest
        routed = top.softmax(-1), idx  # softmax over the top-k only; the other N - k gates are 0
        if self.ctx.route == "sequence":
            self._sequence_gates = routed
        return routed

    def gates(self, x):  # (B, T, in) -> dense (B, T or 1, N), k non-zero per token
        g, idx = self.route(x)
        return torch.zeros(*g.shape[:-1], self.num_branches, device=g.device).scatter(-1, idx, g)

    def real_tokens(self, x):
        mask = self.ctx.mask
        return mask if mask is not None and mask.shape == x.shape[:2] else None

    def delta(self, x):
        a = F.linear(x, self.lora_A)  # (B, T, r_b): A x, computed once for every branch
        g = self.gates(x).expand(*x.shape[:-1], -1)  # (B, T, N), k non-zero per token
        if self.ctx.collect and self.training:
            mask = self.real_tokens(x)
            w = g.detach() if mask is None else g.detach() * mask[..., None]
            self.gate_mass += w.flatten(0, -2).sum(0)
            self.gate_tokens += w.sum()  # = number of real tokens, since each token's gates sum to 1
        # sum_{n in topk} g_n B_n (A x) = [B_1 .. B_N] (g_1 A x; ...; g_N A x): the N - k zero gates
        # drop out. One dense matmul was faster than gathering only the k chosen branches per
        # token (sort + per-branch matmul + index_add), measured on CPU: benchmarks/README.md.
        h = (g[..., None] * a[..., None, :]).flatten(-2)  # (B, T, N * r_b)
        return self.scaling * F.linear(h, torch.cat(list(self.lora_B), dim=1))  # B_cat (out, N * r_b)

    def freeze_most_used(self) -> list[int]:
        """Tuning-freezing: freeze the k branches with the most gate mass this task among those
        still tunable. Frozen branches keep taking part in the forward pass."""
        tunable = [n for n, b in enumerate(self.lora_B) if b.requires_grad]
        usage = (self.gate_mass / self.gate_tokens.clamp(min=1)).tolist()
        chosen = sorted(tunable, key=lambda n: -usage[n])[:self.top_k]
        for n in chosen:
            self.lora_B[n].requires_grad_(False)
        return chosen


class LiLoRALinear(AdapterLinear):
    """LiLoRA: shared A (r, in) and basis B0 (out, r); per task B~_t (out, r~), A~_t (r~, r) and
    a fusion scalar phi_t."""

    def __init__(self, base, r: int, alpha: float, r_task: int):
        super().__init__(base, r, alpha)
        self.r_task = r_task
        self.lora_A = _kaiming(self.new(r, self.in_features))  # shared A, Kaiming
        self.lora_B0 = self.new(self.out_features, r)  # shared basis B0, zeros
        self.task_B = nn.ParameterList()  # B~_t (out, r~), zeros
        self.task_A = nn.ParameterList()  # A~_t (r~, r), Kaiming
        self.phi = nn.ParameterList()  # phi_t, alpha_t = sigmoid(phi_t)
        self.register_buffer("B0_prev", None)  # B0^{t-1}: snapshot when task t starts (Eq. 8)

    def add_task(self) -> None:
        for p in (*self.task_B, *self.task_A, *self.phi):
            p.requires_grad_(False)
        if len(self.task_B):
            self.B0_prev = self.lora_B0.detach().clone()
        self.task_B.append(self.new(self.out_features, self.r_task))
        self.task_A.append(_kaiming(self.new(self.r_task, self.r)))
        self.phi.append(nn.Parameter(torch.randn((), device=self.weight.device)))  # phi_t ~ N(0, 1), Eq. 5

    def fusion(self, t: int):
        return torch.sigmoid(self.phi[t])  # alpha_t = Sigmoid(phi_t), Eq. 5

    def delta(self, x):
        t, alpha = self.task, self.fusion(self.task)
        a = F.linear(x, self.lora_A)  # (..., r): A x
        shared = F.linear(a, self.lora_B0)  # B0 A x
        specific = F.linear(F.linear(a, self.task_A[t]), self.task_B[t])  # B~_t A~_t A x
        return self.scaling * (alpha * shared + (1 - alpha) * specific)  # Eq. 6 applied to x

    def delta_weight(self, t: int | None = None):
        t = self.task if t is None else t
        alpha = self.fusion(t)
        return self.scaling * (alpha * self.lora_B0 + (1 - alpha) * self.task_B[t] @ self.task_A[t]) @ self.lora_A  # Eq. 6

    def reg_loss(self):
        """Eq. 7-8 for the newest task t (from the second task on):
        (1 - sim_t) ||B0 - B0^{t-1}||_F^2, sim_t = cos(vec(B~_t A~_t), vec(B~_{t-1} A~_{t-1}))."""
        t = len(self.task_B) - 1
        if t < 1:
            return self.lora_B0.new_zeros(())
        with torch.no_grad():  # Decision (SPEC): sim_t is an importance weight, no gradient through it
            cur = (self.task_B[t] @ self.task_A[t]).flatten()
            prev = (self.task_B[t - 1] @ self.task_A[t - 1]).flatten()
            norms = cur.norm() * prev.norm()
            sim = cur @ prev / norms if norms > 0 else cur.new_zeros(())  # Eq. 7; cos with a zero matrix is 0
        return (1 - sim) * (self.lora_B0 - self.B0_prev).pow(2).sum()  # Eq. 8


# --------------------------------------------------------------------------- injection


def inject(model: nn.Module, target: str, make) -> list[str]:
    """Replace every nn.Linear whose full name matches `target` by make(linear)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(target, n)]
    if not names:
        raise ValueError(f"no Linear layer of the model matches target {target!r}")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, make(model.get_submodule(name)))
    return names


def wrap_summary(method: str, names: list[str]) -> str:
    kinds = Counter(n.rsplit(".", 1)[-1] for n in names)
    return f"{method}: wrapped {len(names)} linears (" + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) + ")"


# --------------------------------------------------------------------------- methods


class Method:
    """The continual life cycle around one adapter family. Tasks are numbered from 0."""

    layer_type: type = AdapterLinear
    default_target = "llm"
    joint = False  # trained once on the union of all tasks (the training loop reads this)
    task_specific = False  # has per-task parameters: inference needs a task (oracle or selector)

    def __init__(self, model, *, r: int = 128, lora_alpha: float = 256, target: str | None = None,
                 use_selector: bool = False, align_weight: float = 1.0, verbose: bool = True):
        self.model, self.r, self.alpha = model, r, lora_alpha
        self.num_tasks = 0
        model.requires_grad_(False)  # the base is frozen; adapters own every trainable tensor
        pattern = TARGETS.get(target or self.default_target, target or self.default_target)
        self.names = inject(model, pattern, self.make_layer)
        self.layers = [model.get_submodule(n) for n in self.names]
        self.selector = None
        if use_selector:
            self.selector = TaskSelector(model.config.vision.hidden_size, model.config.text.hidden_size,
                                         device=model.lm_head.weight.device)
            # L_align needs e_img, the mean CLIP patch feature, which the training forward has
            # just computed: keep it from there instead of running the vision tower twice.
            model.vision_tower.register_forward_hook(self._keep_e_img)
        self._e_img = None
        self.align_weight = align_weight
        if verbose:
            print(wrap_summary(type(self).__name__.lower(), self.names))

    def make_layer(self, base):
        raise NotImplementedError

    def _keep_e_img(self, module, inputs, output):
        self._e_img = mean_patch_feature(output)

    # -- training
    def start_task(self, t: int) -> None:
        if t != self.num_tasks:
            raise ValueError(f"tasks start in order: expected task {self.num_tasks}, got {t}")
        self.num_tasks += 1
        if self.selector is not None:
            self.selector.add_task()
        self.use_task(t)

    def end_task(self, t: int) -> None:
        pass

    def extra_loss(self, batch: dict, task: int):
        """Method losses added to L_task, already weighted (None when there are none)."""
        if self.selector is None:
            return None
        # Called right after the forward on the same batch: take the e_img it left, once.
        e_img = self._e_img if self._e_img is not None and len(self._e_img) == len(batch["input_ids"]) else None
        self._e_img = None
        e_img, e_txt = sample_embeddings(self.model, batch["input_ids"], batch["pixel_values"],
                                         batch.get("attention_mask"), batch.get("labels"), e_img=e_img)
        return self.align_weight * self.selector.align_loss(e_img, e_txt, task)  # lambda * L_align

    @contextmanager
    def batch_context(self, attention_mask=None, training: bool = False):
        """Wrap each forward (or generate) call: methods that route per sequence or collect
        statistics read the batch's padding mask from here."""
        yield

    # -- inference
    def use_task(self, t: int) -> None:
        for layer in self.layers:
            layer.task = t

    def select_tasks(self, batch: dict):
        """Task index per sample from the selector (identity-free inference)."""
        if self.selector is None:
            raise ValueError(f"{type(self).__name__} was built without a task selector")
        e_img, e_txt = sample_embeddings(self.model, batch["input_ids"], batch["pixel_values"],
                                         batch.get("attention_mask"))
        return self.selector.select(e_img, e_txt)

    def merge(self, t: int) -> None:
        self.use_task(t)
        for layer in self.layers:
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers:
            layer.unmerge()

    # -- accounting
    def adapter_parameters(self):
        """Every parameter the method added (the wrapped W0 excluded), trainable or not."""
        base = self._base_ids()
        params = [p for layer in self.layers for p in layer.parameters() if id(p) not in base]
        if self.selector is not None:
            params += list(self.selector.parameters())
        return params

    def _base_ids(self) -> set[int]:
        return {id(t) for layer in self.layers for t in (layer.weight, layer.bias)}

    def trainable_parameters(self):
        return [p for p in self.adapter_parameters() if p.requires_grad]

    def _adapter_tensors(self) -> dict:
        """The live tensors of the method by state-dict name (adapters, routers, statistics,
        selector keys), the wrapped W0 excluded."""
        base = self._base_ids()
        state = {f"{name}.{k}": v for name, layer in zip(self.names, self.layers)
                 for k, v in layer.state_dict(keep_vars=True).items() if id(v) not in base}
        if self.selector is not None:
            state.update({f"selector.{k}": v for k, v in self.selector.state_dict(keep_vars=True).items()})
        return state

    def adapter_state_dict(self) -> dict:
        """The method's tensors only, for an adapter-only checkpoint."""
        return {k: v.detach() for k, v in self._adapter_tensors().items()}

    def load_adapter_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Copy an adapter_state_dict into the method's tensors (their shapes must already exist:
        start the same number of tasks first)."""
        own = self._adapter_tensors()
        with torch.no_grad():
            for name, value in state.items():
                if name not in own:
                    raise KeyError(f"{source}: {name!r} is not a tensor of this method")
                own[name].copy_(value)


class SeqLoRA(Method):
    """One LoRA trained on every task in turn."""

    def make_layer(self, base):
        return LoRALinear(base, self.r, self.alpha)

    def start_task(self, t):
        super().start_task(t)
        if t == 0:
            for layer in self.layers:
                layer.add_task()

    def use_task(self, t):
        super().use_task(0)  # there is only one LoRA


class Joint(SeqLoRA):
    """One LoRA trained once on the union of all tasks: the multi-task ceiling."""

    joint = True


class DirLoRA(Method):
    """A new LoRA per task, earlier ones frozen: the expansion upper bound."""

    task_specific = True

    def make_layer(self, base):
        return LoRALinear(base, self.r, self.alpha)

    def start_task(self, t):
        for layer in self.layers:
            layer.add_task()
        super().start_task(t)


class MoELoRA(Method):
    """CoIN's MoELoRA: shared router, all experts trained on every task."""

    def __init__(self, model, *, num_experts: int = 8, **kw):
        self.num_experts = num_experts
        super().__init__(model, **kw)

    def make_layer(self, base):
        return MoELoRALinear(base, self.r, self.alpha, self.num_experts)

    def use_task(self, t):
        pass  # nothing task-specific


class BranchLoRA(Method):
    """Shared trunk A, N branches, a router per task, top-k routing, tuning-freezing, selector."""

    task_specific = True

    def __init__(self, model, *, num_branches: int = 8, top_k: int = 2, route: str = "token",
                 freeze_trunk_after_first_task: bool = False, use_selector: bool = True, **kw):
        if route not in ("token", "sequence"):
            raise ValueError(f"route must be 'token' or 'sequence', got {route!r}")
        self.num_branches, self.top_k = num_branches, top_k
        self.freeze_trunk_after_first_task = freeze_trunk_after_first_task
        self.ctx = RoutingContext(route=route)
        super().__init__(model, use_selector=use_selector, **kw)

    def make_layer(self, base):
        return BranchLoRALinear(base, self.r, self.alpha, self.num_branches, self.top_k, self.ctx)

    def start_task(self, t):
        for layer in self.layers:
            layer.add_task()
            # Decision (SPEC): the trunk A stays trainable on every task unless asked otherwise.
            layer.lora_A.requires_grad_(not (self.freeze_trunk_after_first_task and t > 0))
        super().start_task(t)

    def end_task(self, t):
        for layer in self.layers:
            layer.freeze_most_used()

    @contextmanager
    def batch_context(self, attention_mask=None, training: bool = False):
        self.ctx.mask = None if attention_mask is None else attention_mask.bool()
        self.ctx.collect = training
        for layer in self.layers:
            layer._sequence_gates = None
        try:
            yield
        finally:
            self.ctx.mask, self.ctx.collect = None, False


class LiLoRA(Method):
    """Shared A and basis B0, per-task B~_t A~_t, learnable fusion, cosine-regularised basis."""

    default_target = "ffn+projector"
    task_specific = True

    def __init__(self, model, *, r_task: int | None = None, reg_weight: float = 1.0,
                 freeze_basis_after_first_task: bool = False, **kw):
        self.r_task = r_task or kw.get("r", 128) // 2  # r~ = r / 2 by default
        # lambda of L = L_task + lambda L_reg: the paper does not give a value; 1.0 is our default.
        self.reg_weight = reg_weight
        self.freeze_basis_after_first_task = freeze_basis_after_first_task
        super().__init__(model, **kw)

    def make_layer(self, base):
        return LiLoRALinear(base, self.r, self.alpha, self.r_task)

    def start_task(self, t):
        for layer in self.layers:
            layer.add_task()
            # The released code trains B0 on the first task only; the paper's Algorithm 1 on every task.
            layer.lora_B0.requires_grad_(not (self.freeze_basis_after_first_task and t > 0))
        super().start_task(t)

    def extra_loss(self, batch, task):
        losses = [] if (align := super().extra_loss(batch, task)) is None else [align]
        if self.num_tasks > 1 and not self.freeze_basis_after_first_task:
            losses.append(self.reg_weight * sum(layer.reg_loss() for layer in self.layers))  # lambda L_reg, summed over layers
        return sum(losses) if losses else None


METHODS = {"seqlora": SeqLoRA, "dirlora": DirLoRA, "joint": Joint, "moelora": MoELoRA,
           "branchlora": BranchLoRA, "lilora": LiLoRA}


def make_method(name: str, model, **hparams) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](model, **hparams)


def parameter_report(config, method: str, num_tasks: int, **hparams) -> dict:
    """Parameter counts of `method` on a model of `config`, built on the meta device (a 7B
    shape costs no memory): `trainable` while the first task trains, `total_added` after
    `num_tasks` tasks (TP), `per_task` added by each task after the first (EP). A fully
    trained projector is not an adapter and is not counted."""
    from .model import Llava

    with torch.device("meta"):
        model = Llava(config)
    m = make_method(method, model, verbose=False, **hparams)
    added = []  # adapter parameters after each task has started
    for t in range(max(num_tasks, 2)):
        m.start_task(t)
        if t == 0:
            trainable = sum(p.numel() for p in m.trainable_parameters())
        added.append(sum(p.numel() for p in m.adapter_parameters()))
    return {"method": method, "trainable": trainable, "total_added": added[num_tasks - 1],
            "per_task": added[1] - added[0], "first_task": added[0], "wrapped": len(m.names)}
