"""Continual adapters as explicit layers, each directly above the method that drives it
across tasks, in SPEC §2's order:

    LoRALinear       y = W0 x + s B_t A_t x                        SeqLoRA, DirLoRA, joint
    MoELoRALinear    y = W0 x + s sum_n softmax(R x)_n B_n A_n x    MoELoRA (CoIN)
    BranchLoRALinear y = W0 x + s sum_{n in topk} g_n B_n (A x)     BranchLoRA
    LiLoRALinear     y = W0 x + s (a_t B0 + (1 - a_t) B~_t A~_t) A x  LiLoRA (LiLoRA Eq. 5-8)
    SMoLoRALinear    y = W0 x + a_v v + a_u u, v and u each one top-1 expert  SMoLoRA (LiLoRA's Table 1)

with s = lora_alpha / r. The layer base class, injection by full module name and the task life
cycle every method follows are in method.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .method import COUNT, DORA, NON_NEGATIVE, UNIT, USE_SELECTOR, AdapterLinear, Method, Option, Range, kaiming
from .model import Tokens, masked_mean

# --------------------------------------------------------------------------- LoRA: SeqLoRA, DirLoRA, joint


class LoRALinear(AdapterLinear):
    """y = W0 x + s B_t A_t x; one (A, B) pair per task added (DirLoRA) or just one (SeqLoRA).

    dora=True: DoRA's weight decomposition (Liu et al. 2024, Eq. 5), as peft's DoraLinearLayer
    computes it: W' = m * (W0 + s B A) / ||W0 + s B A||, the norm per output row and detached
    in the forward (DoRA §4.3), and a magnitude m (out,) per pair, starting at ||W0|| (B = 0)."""

    mergeable = True

    def __init__(self, base, r: int, alpha: float, dora: bool = False):
        super().__init__(base, r, alpha)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dora = dora
        self.lora_magnitude = nn.ParameterList()  # DoRA's m_t (out,); empty without DoRA

    def add_task(self) -> None:
        for p in (*self.lora_A, *self.lora_B, *self.lora_magnitude):
            p.requires_grad_(False)  # DirLoRA: an earlier task's pair is frozen
        self.lora_A.append(kaiming(self.zeros(self.r, self.in_features)))  # A (r, in) Kaiming-uniform
        self.lora_B.append(self.zeros(self.out_features, self.r))  # B (out, r) zeros: identity at init
        if self.dora:
            self.lora_magnitude.append(nn.Parameter(torch.linalg.norm(self.weight.detach().float(), dim=1)))  # ||W0||

    def update(self, x, tokens=None):
        return self.scaling * F.linear(self.drop(x), self.lora_A[self.task]), self.lora_B[self.task]  # (..., r): s A x

    def weight_norm(self):  # ||W0 + s B A|| per output row, (out,)
        return torch.linalg.norm(self.weight.float() + self.scaling * self.lora_B[self.task] @ self.lora_A[self.task], dim=1)

    def forward(self, x, tokens=None):
        if not self.dora or self.plain:
            return super().forward(x, tokens)
        y = F.linear(x, self.weight, self.bias)
        scale = self.lora_magnitude[self.task] / self.weight_norm().detach()  # DoRA Eq. 5: m / ||W0 + s B A||
        xd = self.drop(x.to(torch.float32))
        if self.training and self.dropout:  # peft: with dropout, the base product of the dropped input
            base = F.linear(xd.to(self.weight.dtype), self.weight).float()
        else:
            base = (y if self.bias is None else y - self.bias).float()
        lora = self.scaling * F.linear(F.linear(xd, self.lora_A[self.task]), self.lora_B[self.task])
        return y + ((scale - 1) * base + scale * lora).to(y.dtype)  # = m/||.|| (W0 + s B A) x + b

    def delta_weight(self):
        delta = self.scaling * self.lora_B[self.task] @ self.lora_A[self.task]  # (out, in)
        if not self.dora:
            return delta
        w = self.weight.float() + delta
        return (self.lora_magnitude[self.task] / self.weight_norm())[:, None] * w - self.weight.float()  # W' - W0


class LoRAMethod(Method):
    """The LoRA family's shared option: --dora, weight-decomposed layers."""

    def __init__(self, model, *, dora: bool = False, **kw):
        self.dora = dora
        super().__init__(model, **kw)

    def make_layer(self, base):
        return LoRALinear(base, self.r, self.lora_alpha, self.dora)


class SeqLoRA(LoRAMethod):
    """One LoRA trained on every task in turn."""

    options = (DORA,)

    def add_task_parameters(self, t):
        if t == 0:
            for layer in self.layers:
                layer.add_task()

    def use_task(self, t):
        super().use_task(0)  # there is only one LoRA


class Joint(SeqLoRA):
    """One LoRA trained once on the union of all tasks: the multi-task ceiling."""

    def stages(self, num_tasks):
        return [list(range(num_tasks))]


class DirLoRA(LoRAMethod):
    """A new LoRA per task, earlier ones frozen: the expansion upper bound."""

    task_specific = True
    options = (DORA, USE_SELECTOR)

    def add_task_parameters(self, t):
        for layer in self.layers:
            layer.add_task()


# --------------------------------------------------------------------------- MoELoRA


def _check_split(r: int, n: int, what: str) -> None:
    if n < 1 or r % n:
        raise ValueError(f"--r {r} must split evenly into --{what.replace('_', '-')} {n} (each gets rank r/N), as CoIN "
                         "asserts")


NUM_EXPERTS = Option("num_experts", "N experts (8; smolora: half visual, half instruction)", int, range=COUNT)


class MoELoRALinear(AdapterLinear):
    """CoIN's MoELoRA: N experts of rank r/N, dense per-token softmax router, s = alpha / r."""

    def __init__(self, base, r: int, alpha: float, num_experts: int):
        super().__init__(base, r, alpha)
        self.num_experts, self.r_e = num_experts, r // num_experts
        # The N experts' A_n (r/N, in) stacked row-wise, B_n (out, r/N) column-wise.
        self.lora_A = self.zeros(num_experts * self.r_e, self.in_features)
        nn.init.normal_(self.lora_A, std=0.01)
        self.lora_B = self.zeros(self.out_features, num_experts * self.r_e)
        self.router = kaiming(self.zeros(num_experts, self.in_features))  # R (N, in), no bias

    def update(self, x, tokens=None):
        g = F.linear(x, self.router).softmax(-1)  # (..., N) dense gates
        if self.dropout and self.training:  # CoIN draws each expert's dropout mask on its own
            a = expert_dropout(x, self.lora_A, self.num_experts, self.dropout)  # (..., N, r/N): A_n drop_n(x)
        else:
            a = F.linear(x, self.lora_A).unflatten(-1, (self.num_experts, self.r_e))  # (..., N, r/N): A_n x
        # sum_n g_n B_n A_n x == [B_1 .. B_N] (g_1 A_1 x; ...; g_N A_N x): one matmul for all experts
        return self.scaling * (g[..., None] * a).flatten(-2), self.lora_B  # h (..., r)


class ExpertDropout(torch.autograd.Function):
    """A_n drop_n(x) for every expert n, each with its own dropout mask, without holding N dropped
    copies of x: the masks come from a generator seeded once per call, and the backward draws them
    again, one expert at a time. Memory: x (saved once, as a plain linear saves it), not N x."""

    @staticmethod
    def forward(ctx, x, A, n: int, p: float, seed: int):  # x (..., in), A (n * r_e, in)
        ctx.save_for_backward(x, A)
        ctx.n, ctx.p, ctx.seed = n, p, seed
        A_n = A.to(x.dtype).view(n, -1, A.shape[-1])  # (n, r_e, in)
        return torch.stack([F.linear(x * m, A_n[k]) for k, m in enumerate(expert_masks(x, n, p, seed))], -2)

    @staticmethod
    def backward(ctx, grad):  # grad (..., n, r_e)
        x, A = ctx.saved_tensors
        A_n = A.to(x.dtype).view(ctx.n, -1, A.shape[-1])
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gA = torch.empty(ctx.n, A_n.shape[1], A.shape[-1], dtype=torch.float32, device=A.device)
        for k, m in enumerate(expert_masks(x, ctx.n, ctx.p, ctx.seed)):
            g = grad[..., k, :].to(x.dtype)  # (..., r_e)
            gA[k] = (g.reshape(-1, g.shape[-1]).t() @ (x * m).reshape(-1, x.shape[-1])).float()
            if gx is not None:
                gx += (g @ A_n[k]) * m
        return gx, gA.view_as(A).to(A.dtype), None, None, None


def expert_masks(x, n: int, p: float, seed: int):
    """The n dropout masks of one call, scaled by 1 / (1 - p), drawn one at a time in x's dtype."""
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    for _ in range(n):
        yield torch.empty_like(x).bernoulli_(1 - p, generator=g) / (1 - p)


def expert_dropout(x, A, n: int, p: float):
    seed = int(torch.randint(2**62, (), generator=None))  # from the global CPU stream: checkpointing replays it
    return ExpertDropout.apply(x, A, n, p, seed)


class MoELoRA(Method):
    """CoIN's MoELoRA: shared router, all experts trained on every task."""

    options = (NUM_EXPERTS,)

    def __init__(self, model, *, num_experts: int = 8, **kw):
        _check_split(kw.get("r", 128), num_experts, "num_experts")
        self.num_experts = num_experts
        super().__init__(model, **kw)

    def make_layer(self, base):
        return MoELoRALinear(base, self.r, self.lora_alpha, self.num_experts)


# --------------------------------------------------------------------------- BranchLoRA


class BranchLoRALinear(AdapterLinear):
    """BranchLoRA: one shared A (r_b, in) and N branches B_n (out, r_b), r_b = r / N; a router
    per task (earlier ones frozen) picks the top-k branches per token."""

    def __init__(self, base, r: int, alpha: float, num_branches: int, top_k: int, route: str = "token",
                 shared_router: bool = False):
        super().__init__(base, r, alpha)
        self.num_branches, self.top_k, self.r_b, self.per_sequence = num_branches, top_k, r // num_branches, \
            route == "sequence"
        self.shared_router = shared_router  # ablation: one router for every task, trained on each
        self.lora_A = kaiming(self.zeros(self.r_b, self.in_features))  # the trunk, shared by all branches
        # One Parameter per branch so each can be frozen on its own.
        self.lora_B = nn.ParameterList(self.zeros(self.out_features, self.r_b) for _ in range(num_branches))
        self.routers = nn.ParameterList()  # R_t (N, in), one per task
        # Gate mass per branch over the current task's training tokens (the freezing rule).
        self.register_buffer("gate_mass", torch.zeros(num_branches, device=self.weight.device))
        self.register_buffer("gate_tokens", torch.zeros((), device=self.weight.device))

    def extra_repr(self) -> str:  # r is the adapter's whole rank; the trunk's is r / N
        return (f"in={self.in_features}, out={self.out_features}, trunk rank r_b={self.r_b} (r={self.r} over "
                f"{self.num_branches} branches), top_k={self.top_k}, scaling={self.scaling:g}")

    def add_task(self) -> None:
        if not (self.shared_router and len(self.routers)):
            for router in self.routers:
                router.requires_grad_(False)
            self.routers.append(kaiming(self.zeros(self.num_branches, self.in_features)))
        self.gate_mass.zero_()
        self.gate_tokens.zero_()

    def route(self, x, tokens: Tokens):  # (B, T, in) -> top-k gates and branch indices, each (B, T or 1, k)
        # Decision (SPEC): route per token by default; route="sequence" routes once per sequence.
        if self.per_sequence:
            if tokens.decoding:  # a generation step keeps the decision made on its prompt
                return tokens.memory[id(self)]
            # One routing decision per sequence, from the mean x of its real tokens.
            x = masked_mean(x, tokens.mask)[:, None]  # (B, 1, in)
        router = self.routers[0 if self.shared_router else self.task]
        top, idx = F.linear(x, router).topk(self.top_k, dim=-1)  # R_t x, keep the k largest
        routed = top.softmax(-1), idx  # softmax over the top-k only; the other N - k gates are 0
        if self.per_sequence:
            tokens.memory[id(self)] = routed
        return routed

    def gates(self, x, tokens: Tokens | None = None):  # (B, T, in) -> dense (B, T or 1, N), k non-zero per token
        g, idx = self.route(x, Tokens() if tokens is None else tokens)
        return torch.zeros(*g.shape[:-1], self.num_branches, dtype=g.dtype, device=g.device).scatter(-1, idx, g)

    def update(self, x, tokens=None):
        tokens = Tokens() if tokens is None else tokens
        a = F.linear(self.drop(x), self.lora_A)  # (B, T, r_b): A x, computed once for every branch
        g = self.gates(x, tokens).expand(*x.shape[:-1], -1)  # (B, T, N), k non-zero per token
        if self.training and not tokens.recomputing:  # the freezing rule's statistics, once per training token
            mask = tokens.mask
            w = g.detach().float() if mask is None else g.detach().float() * mask[..., None]
            self.gate_mass += w.flatten(0, -2).sum(0)
            self.gate_tokens += w.sum()  # = number of real tokens, since each token's gates sum to 1
        # sum_{n in topk} g_n B_n (A x) = [B_1 .. B_N] (g_1 A x; ...; g_N A x): the N - k zero gates
        # drop out. One dense matmul was faster than gathering only the k chosen branches per
        # token (sort + per-branch matmul + index_add), measured on CPU: benchmarks/README.md.
        h = (g[..., None] * (self.scaling * a)[..., None, :]).flatten(-2)  # (B, T, N * r_b)
        return h, torch.cat(list(self.lora_B), dim=1)  # B_cat (out, N * r_b)

    def freeze_most_used(self) -> list[int]:
        """Tuning-freezing: freeze the k branches with the most gate mass this task among those
        still tunable. Frozen branches keep taking part in the forward pass."""
        tunable = [n for n, b in enumerate(self.lora_B) if b.requires_grad]
        usage = (self.gate_mass / self.gate_tokens.clamp(min=1)).tolist()
        chosen = sorted(tunable, key=lambda n: -usage[n])[:self.top_k]
        for n in chosen:
            self.lora_B[n].requires_grad_(False)
        return chosen


class BranchLoRA(Method):
    """Shared trunk A, N branches, a router per task, top-k routing, tuning-freezing, selector."""

    task_specific = True
    paper_identity = "selector"  # its paper's identity-free protocol
    options = (
        Option("num_branches", "N branches (8)", int, range=Range(2)),
        Option("top_k", "branches per token, at most N (2)", int, range=COUNT),
        Option("route", "routing (token)", str, choices=("token", "sequence")),
        Option("freeze_trunk_after_first_task", "the shared A trained on the first task only"),
        Option("tuning_freezing", "freeze the k most used branches after each task (on; off: an ablation)",
               negatable=True),
        Option("shared_router", "ablation: one router trained on every task instead of one per task"),
    )

    def __init__(self, model, *, num_branches: int = 8, top_k: int = 2, route: str = "token",
                 freeze_trunk_after_first_task: bool = False, use_selector: bool = True,
                 tuning_freezing: bool = True, shared_router: bool = False, **kw):
        if route not in ("token", "sequence"):
            raise ValueError(f"--route must be 'token' or 'sequence', got {route!r}")
        _check_split(kw.get("r", 128), num_branches, "num_branches")
        if not 1 <= top_k <= num_branches:
            raise ValueError(f"--top-k must be between 1 and --num-branches ({num_branches}), got {top_k}")
        self.num_branches, self.top_k = num_branches, top_k
        self.freeze_trunk_after_first_task = freeze_trunk_after_first_task
        self.tuning_freezing, self.shared_router = tuning_freezing, shared_router  # ablations, on/off as the paper
        self.route = route
        super().__init__(model, use_selector=use_selector, **kw)

    def make_layer(self, base):
        return BranchLoRALinear(base, self.r, self.lora_alpha, self.num_branches, self.top_k, self.route,
                                self.shared_router)

    def add_task_parameters(self, t):
        for layer in self.layers:
            layer.add_task()
            # Decision (SPEC): the trunk A stays trainable on every task unless asked otherwise.
            layer.lora_A.requires_grad_(not (self.freeze_trunk_after_first_task and t > 0))

    def end_task(self, t, sample_losses=None):
        if self.tuning_freezing:
            for layer in self.layers:
                layer.freeze_most_used()

    def statistics(self):
        return [s for layer in self.layers for s in (layer.gate_mass, layer.gate_tokens)]


# --------------------------------------------------------------------------- LiLoRA


class LiLoRALinear(AdapterLinear):
    """LiLoRA: shared A (r, in) and basis B0 (out, r); per task B~_t (out, r~), A~_t (r~, r) and
    a fusion scalar phi_t."""

    mergeable = True

    def __init__(self, base, r: int, alpha: float, r_task: int, fixed_alpha: float | None = None):
        super().__init__(base, r, alpha)
        self.r_task, self.fixed_alpha = r_task, fixed_alpha
        self.lora_A = kaiming(self.zeros(r, self.in_features))  # shared A, Kaiming
        self.lora_B0 = self.zeros(self.out_features, r)  # shared basis B0, zeros
        self.task_B = nn.ParameterList()  # B~_t (out, r~), zeros
        self.task_A = nn.ParameterList()  # A~_t (r~, r), Kaiming
        self.phi = nn.ParameterList()  # phi_t, alpha_t = sigmoid(phi_t)
        self.register_buffer("B0_prev", None)  # B0^{t-1}: snapshot when task t starts (LiLoRA Eq. 8)

    def add_task(self) -> None:
        for p in (*self.task_B, *self.task_A, *self.phi):
            p.requires_grad_(False)
        if len(self.task_B):
            self.B0_prev = self.lora_B0.detach().clone()
        self.task_B.append(self.zeros(self.out_features, self.r_task))
        self.task_A.append(kaiming(self.zeros(self.r_task, self.r)))
        if self.fixed_alpha is None:
            self.phi.append(nn.Parameter(torch.randn((), device=self.weight.device)))  # phi_t ~ N(0, 1), LiLoRA Eq. 5

    def fusion(self, t: int):
        if self.fixed_alpha is not None:  # Table 2's fixed-alpha rows
            return self.lora_A.new_tensor(self.fixed_alpha)
        return torch.sigmoid(self.phi[t])  # alpha_t = Sigmoid(phi_t), LiLoRA Eq. 5

    def update(self, x, tokens=None):
        t, alpha = self.task, self.fusion(self.task)
        a = self.scaling * F.linear(self.drop(x), self.lora_A)  # (..., r): s A x
        # LiLoRA Eq. 6 applied to x: s (alpha B0 + (1 - alpha) B~_t A~_t) A x
        #   = [B0 | B~_t] (alpha s A x ; (1 - alpha) A~_t s A x): one GEMM for both paths
        h = torch.cat([alpha * a, (1 - alpha) * F.linear(a, self.task_A[t])], dim=-1)  # (..., r + r~)
        return h, torch.cat([self.lora_B0, self.task_B[t]], dim=1)  # (out, r + r~)

    def delta_weight(self, t: int | None = None):
        t = self.task if t is None else t
        alpha = self.fusion(t)
        fused = alpha * self.lora_B0 + (1 - alpha) * self.task_B[t] @ self.task_A[t]  # (out, r)
        return self.scaling * fused @ self.lora_A  # LiLoRA Eq. 6: DeltaW_t (out, in)

    def reg_loss(self):
        """LiLoRA Eq. 7-8 for the newest task t (from the second task on):
        (1 - sim_t) ||B0 - B0^{t-1}||_F^2, sim_t = cos(vec(B~_t A~_t), vec(B~_{t-1} A~_{t-1}))."""
        t = len(self.task_B) - 1
        if t < 1:
            return self.lora_B0.new_zeros(())
        with torch.no_grad():  # Decision (SPEC): sim_t is an importance weight, no gradient through it
            cur = (self.task_B[t] @ self.task_A[t]).flatten()
            prev = (self.task_B[t - 1] @ self.task_A[t - 1]).flatten()
            norms = cur.norm() * prev.norm()
            # LiLoRA Eq. 7; Decision: cos with 0 is 0 (decided on the device: no host sync)
            sim = torch.where(norms > 0, cur @ prev / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)
        return (1 - sim) * (self.lora_B0 - self.B0_prev).pow(2).sum()  # LiLoRA Eq. 8


class SharedALinear(AdapterLinear):
    """LiLoRA's Table 2 row "Share A" alone: y = W0 x + s B_t A x, a full per-task B_t (out, r)
    on the shared A; no basis, no decomposition, no fusion."""

    mergeable = True

    def __init__(self, base, r: int, alpha: float):
        super().__init__(base, r, alpha)
        self.lora_A = kaiming(self.zeros(r, self.in_features))  # shared A
        self.task_B = nn.ParameterList()  # B_t (out, r), zeros

    def add_task(self) -> None:
        for p in self.task_B:
            p.requires_grad_(False)
        self.task_B.append(self.zeros(self.out_features, self.r))

    def update(self, x, tokens=None):
        return self.scaling * F.linear(self.drop(x), self.lora_A), self.task_B[self.task]  # (..., r): s A x

    def delta_weight(self):
        return self.scaling * self.task_B[self.task] @ self.lora_A  # (out, in)


class LiLoRA(Method):
    """Shared A and basis B0, per-task B~_t A~_t, learnable fusion, cosine-regularised basis.
    Table 2's ablations: share_a_only (a full B_t per task), reg_weight=0 (decomposed B without
    L_reg), fixed_alpha (0, 0.5 or 1 instead of a learnable alpha_t)."""

    default_target = "ffn+projector"
    task_specific = True
    paper_recipe = "lilora"
    options = (
        Option("r_task", "r~ (r/2)", int, range=COUNT),
        Option("reg_weight", "lambda of L_reg (1.0)", float, range=NON_NEGATIVE),
        Option("freeze_basis_after_first_task", "B0 trained on the first task only, as its released code"),
        Option("freeze_a_after_first_task", "ablation: the shared A trained on the first task only (as BranchLoRA's "
               "--freeze-trunk-after-first-task)"),
        USE_SELECTOR,
        Option("share_a_only", "ablation, Table 2's 'Share A' row: a full B_t per task, no basis or fusion"),
        Option("fixed_alpha", "ablation, Table 2: alpha fixed at 0, 0.5 or 1", float, range=UNIT),
    )

    def __init__(self, model, *, r_task: int | None = None, reg_weight: float = 1.0,
                 freeze_basis_after_first_task: bool = False, freeze_a_after_first_task: bool = False,
                 share_a_only: bool = False, fixed_alpha: float | None = None, **kw):
        self.r_task = r_task or kw.get("r", 128) // 2  # r~ = r / 2 by default
        if self.r_task < 1:
            raise ValueError(f"--r-task must be at least 1, got {self.r_task}")
        if fixed_alpha is not None and not 0 <= fixed_alpha <= 1:
            raise ValueError(f"--fixed-alpha must be in [0, 1], got {fixed_alpha}")
        if share_a_only and (fixed_alpha is not None or freeze_basis_after_first_task or r_task is not None
                             or reg_weight != 1.0):
            raise ValueError("--share-a-only has no basis B0, no fusion and no task factors: it takes none of "
                             "--fixed-alpha, --freeze-basis-after-first-task, --r-task, --reg-weight")
        self.share_a_only, self.fixed_alpha = share_a_only, fixed_alpha
        # lambda of L = L_task + lambda L_reg: the paper gives no value; 1.0 is our default (Decision).
        self.reg_weight = reg_weight
        self.freeze_basis_after_first_task = freeze_basis_after_first_task
        self.freeze_a_after_first_task = freeze_a_after_first_task
        super().__init__(model, **kw)

    def make_layer(self, base):
        if self.share_a_only:
            return SharedALinear(base, self.r, self.lora_alpha)
        return LiLoRALinear(base, self.r, self.lora_alpha, self.r_task, self.fixed_alpha)

    def add_task_parameters(self, t):
        for layer in self.layers:
            layer.add_task()
            # Where shared-A methods forget (benchmarks/README.md): A frozen once task 1 has shaped it.
            layer.lora_A.requires_grad_(not (self.freeze_a_after_first_task and t > 0))
            if not self.share_a_only:
                # The released code trains B0 on the first task only; the paper's Algorithm 1 on every task.
                layer.lora_B0.requires_grad_(not (self.freeze_basis_after_first_task and t > 0))

    def step_loss(self, task):
        if self.reg_weight and self.num_tasks > 1 and not (self.freeze_basis_after_first_task or self.share_a_only):
            reg = sum(layer.reg_loss() for layer in self.layers)  # L_reg summed over layers (Decision)
            return self.reg_weight * reg  # LiLoRA Eq. 8: L = L_task + lambda L_reg
        return None


# --------------------------------------------------------------------------- SMoLoRA


class SMoLoRALinear(AdapterLinear):
    """SMoLoRA (Wang et al. 2024, arXiv 2411.13949), re-expressed from its code,
    Minato-Zackie/SMoLoRA PEFT_SMoLoRA/peft/tuners/smolora.py (line numbers below): N experts
    B_n A_n of rank r/N, s = alpha / r (r the total rank, L292). Experts 0..N/2-1, the visual half,
    are routed top-1 per sequence by R_v(mean of x over the sequence) (L425-429); experts N/2..N-1,
    the instruction half, top-1 by R_i(e_ins) (L432-436). The two halves' outputs v and u are mixed
    per token by softmax([w_a . v, w_b . u]) (L462-474):
        y = W0 x + b + a_v v + a_u u,   v = s B_i A_i drop_i(x),   u = s B_j A_j drop_j(x)."""

    def __init__(self, base, r: int, alpha: float, num_experts: int, instruction_dim: int):
        super().__init__(base, r, alpha)
        self.num_experts, self.r_e = num_experts, r // num_experts
        half = num_experts // 2
        # The N experts' A_n (r/N, in) stacked row-wise, normal std 0.01; B_n (out, r/N) column-wise, zeros (L300-302).
        self.lora_A = self.zeros(num_experts * self.r_e, self.in_features)
        nn.init.normal_(self.lora_A, std=0.01)
        self.lora_B = self.zeros(self.out_features, num_experts * self.r_e)
        # The routers keep nn.Linear's default init (L328, L331) and are never trained: the code marks them
        # trainable on the first task only (L339-350), but a hard one-hot top-1 (zeros + scatter of 1.0, L426-436)
        # sends them no gradient, so they stay where init put them on every task. Frozen here from the start:
        # the same routing, and no tensor an optimiser holds for nothing.
        self.router_visual = kaiming(self.zeros(half, self.in_features)).requires_grad_(False)  # R_v (N/2, in)
        self.router_instruction = kaiming(self.zeros(half, instruction_dim)).requires_grad_(False)  # R_i (N/2, C)
        # w_a, w_b: Linear(out, 1, bias=False) each (L333, L335), nn.Linear's default init; trained on every task.
        self.mix_visual = kaiming(self.zeros(1, self.out_features))
        self.mix_instruction = kaiming(self.zeros(1, self.out_features))

    def routes(self, x, tokens: Tokens):  # -> one-hot (B, 1, N): one visual and one instruction expert per row
        if tokens.decoding:  # Decision: a generation step keeps its prompt's visual expert (see SMoLoRA)
            visual = tokens.memory[id(self)]
        else:
            # Mean of x over the sequence (L425). Decision: over the real tokens only; the code's mean takes in
            # the padding too, which makes a sample's expert depend on what it is batched with.
            visual = top1(F.linear(masked_mean(x, tokens.mask), self.router_visual))  # (B, N/2)
            tokens.memory[id(self)] = visual
        if tokens.instruction is None:
            raise ValueError("SMoLoRA routes by the instruction: call the model with instruction_mask")
        instruction = top1(F.linear(tokens.instruction, self.router_instruction))  # (B, N/2)
        return torch.cat([visual, instruction], -1)[:, None].to(x.dtype)  # (B, 1, N), no gradient (L439)

    def update(self, x, tokens=None):
        tokens = Tokens() if tokens is None else tokens
        g = self.routes(x, tokens)  # (B, 1, N) one-hot
        if self.dropout and self.training:  # the code draws each expert's dropout mask on its own (L443-457)
            a = expert_dropout(x, self.lora_A, self.num_experts, self.dropout)  # (B, T, N, r/N): A_n drop_n(x)
        else:
            a = F.linear(x, self.lora_A).unflatten(-1, (self.num_experts, self.r_e))  # (B, T, N, r/N)
        h = (self.scaling * g[..., None] * a).flatten(-2)  # (B, T, N r/N): s A_n x where expert n is chosen, else 0
        k = self.num_experts // 2 * self.r_e
        h_v, h_u = h[..., :k], h[..., k:]  # v = h_v B_v^T, u = h_u B_u^T
        # w_a . v = h_v (w_a B_v)^T: the scores from (1, k) vectors, without v and u in full (out wide)
        scores = torch.cat([F.linear(h_v, self.mix_visual @ self.lora_B[:, :k]),
                            F.linear(h_u, self.mix_instruction @ self.lora_B[:, k:])], -1)  # (B, T, 2)
        mix = scores.softmax(-1)  # (B, T, 2): a_v, a_u per token (L465-466)
        # a_v v + a_u u = [B_v | B_u] (a_v h_v ; a_u h_u): one GEMM for both halves
        return torch.cat([mix[..., :1] * h_v, mix[..., 1:] * h_u], -1), self.lora_B


def top1(logits):  # (B, n) -> one-hot (B, n) of the argmax, as the code builds it: zeros + scatter of 1.0 (L426-429)
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


class SMoLoRA(Method):
    """SMoLoRA: separable visual and instruction experts, top-1 each, mixed per token; one set of
    tensors trained on every task (its routers never learn: see SMoLoRALinear).

    Decision (SPEC §2): the code's e_ins is a 384-d all-MiniLM-L6-v2 sentence embedding of the task's
    instruction template, one fixed row per task picked by the task id (scripts/SMoLoRA/ins_gen.py,
    `ins_type`). That encoder cannot be downloaded here, so e_ins is each sample's mean frozen LLM
    input embedding over its instruction span, the selector's e_txt (Llava.instruction_embedding):
    no task id is needed at test time. Decision: a generation step keeps the visual expert its prompt
    chose; the code re-routes each new token on its own x alone (x is one token wide there), which
    its training never sees."""

    default_target = "ffn+projector"  # gate/up/down and both projector linears (train_SMoLoRA.py L177-202)
    paper_recipe = "smolora"
    options = (NUM_EXPERTS,)

    def __init__(self, model, *, num_experts: int = 8, **kw):
        if num_experts % 2:
            raise ValueError(f"--num-experts must be even for smolora (half visual, half instruction), got "
                             f"{num_experts}")
        _check_split(kw.get("r", 128), num_experts, "num_experts")
        self.num_experts = num_experts
        self.instruction_dim = model.config.text.hidden_size
        super().__init__(model, **kw)

    def make_layer(self, base):
        return SMoLoRALinear(base, self.r, self.lora_alpha, self.num_experts, self.instruction_dim)
