"""The classic continual-learning baselines MCIT papers report, each on LoRA (adapters.py's
LoRALinear) and each beside its equation (SPEC §2, "Classic continual-learning baselines"):

    Replay  L_task on task t's data plus a memory of rho of every earlier task's
    EWC     L_task + lambda/2 sum_i F_i (theta_i - theta*_i)^2, F summed over tasks (online)
    LwF     L_task + lambda T^2 KL(softmax(z_teacher/T) || softmax(z/T)), teacher = the adapters as t began
    O-LoRA  y = W0 x + s sum_{i<=t} B_i A_i x;  L_task + l1 sum_{i<t} ||A_i A_t^T||_F^2 + l2 ||(A_t, B_t)||^2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import LoRALinear, LoRAMethod, SeqLoRA
from .method import COUNT, NON_NEGATIVE, POSITIVE, Method, Option, Range, stream_seed

# --------------------------------------------------------------------------- Replay


class Replay(SeqLoRA):
    """SeqLoRA trained on each task's data mixed with a memory of every earlier task's."""

    options = (*SeqLoRA.options,
               Option("replay_share", "share of each earlier task's training data kept (0.01)", float, range=Range(0, 1, open_low=True)))

    def __init__(self, model, *, replay_share: float = 0.01, **kw):
        if not 0 < replay_share <= 1:
            raise ValueError(f"--replay-share must be in (0, 1], got {replay_share}")
        self.replay_share = replay_share
        super().__init__(model, **kw)

    def memory(self, train: list, task: int, seed: int) -> list:
        """round(rho * |train|) of task `task`'s training samples, drawn from (seed, task) alone,
        so a resumed run, or any number of processes, keeps the same ones. Test items are never
        drawn: the memory comes from the training split."""
        n = round(self.replay_share * len(train))
        g = torch.Generator().manual_seed(stream_seed(seed, "replay memory", task))
        return [train[i] for i in sorted(torch.randperm(len(train), generator=g)[:n].tolist())]

    def train_samples(self, stage_tasks, tasks, seed):
        own = super().train_samples(stage_tasks, tasks, seed)
        return own + [s for j in range(min(stage_tasks)) for s in self.memory(tasks[j].train, j, seed)]


# --------------------------------------------------------------------------- EWC


class EWC(SeqLoRA):
    """Online EWC on one LoRA. After task t: F <- F + F_t, with F_t the mean over `fisher_samples`
    of task t's training samples of each adapter tensor's squared gradient of that sample's loss
    (the empirical diagonal Fisher), and theta* <- theta. F and theta* are buffers of the layers,
    so checkpoints carry them. Decision: lambda = 400 (TRACE's EWC default), 64 samples."""

    options = (*SeqLoRA.options, Option("ewc_lambda", "lambda of the penalty (400)", float, range=NON_NEGATIVE),
               Option("fisher_samples", "samples per task for the Fisher (64)", int, range=COUNT))

    def __init__(self, model, *, ewc_lambda: float = 400.0, fisher_samples: int = 64, **kw):
        if ewc_lambda < 0 or fisher_samples < 1:
            raise ValueError(f"--ewc-lambda must be >= 0 and --fisher-samples >= 1, got {ewc_lambda}, {fisher_samples}")
        self.ewc_lambda, self.fisher_samples = ewc_lambda, fisher_samples
        super().__init__(model, **kw)

    @staticmethod
    def tensor_names(layer):  # the layer's adapter tensors: A, B, and DoRA's magnitude
        return ("A", "B", "magnitude") if layer.dora else ("A", "B")

    def add_task_parameters(self, t):
        super().add_task_parameters(t)
        if t == 0:
            for layer in self.layers:
                for name in self.tensor_names(layer):
                    p = getattr(layer, f"lora_{name}")[0]
                    layer.register_buffer(f"fisher_{name}", torch.zeros_like(p.detach()))
                    layer.register_buffer(f"star_{name}", torch.zeros_like(p.detach()))

    def pairs(self):  # (theta, F, theta*) for every adapter tensor
        return [(getattr(layer, f"lora_{n}")[0], getattr(layer, f"fisher_{n}"), getattr(layer, f"star_{n}"))
                for layer in self.layers for n in self.tensor_names(layer)]

    def end_task(self, t, sample_losses=None):
        if sample_losses is None:
            raise ValueError("EWC needs the task's samples at end_task to estimate the Fisher")
        params = [p for p, _, _ in self.pairs()]
        squares, n = [torch.zeros_like(p) for p in params], 0
        for loss in sample_losses(self.fisher_samples):
            for sq, g in zip(squares, torch.autograd.grad(loss, params)):
                sq += g.float() ** 2  # (dL/dtheta)^2 of one sample
            n += 1
        with torch.no_grad():
            for (p, fisher, star), sq in zip(self.pairs(), squares):
                fisher += sq / max(1, n)  # online EWC: F <- F + F_t
                star.copy_(p)  # theta* <- theta

    def step_loss(self, task):
        if self.num_tasks < 2:
            return None  # nothing consolidated yet
        penalty = sum((fisher * (p - star) ** 2).sum() for p, fisher, star in self.pairs())
        return self.ewc_lambda / 2 * penalty  # lambda/2 sum_i F_i (theta_i - theta*_i)^2


# --------------------------------------------------------------------------- LwF


class LwF(SeqLoRA):
    """Learning without Forgetting on one LoRA. As task t >= 1 starts, the LoRA is copied into a
    frozen second pair (the teacher, lora_A[1] / lora_B[1]); each step runs the teacher once on
    the same batch and pulls the student's answer distribution towards it. Decision: lambda = 1,
    T = 2 (Li & Hoiem's temperature). The teacher is the adapters (SPEC): a projector trained
    alongside (CoIN's recipe) is shared by teacher and student."""

    options = (*SeqLoRA.options, Option("lwf_lambda", "lambda of the distillation term (1.0)", float, range=NON_NEGATIVE),
               Option("temperature", "softmax temperature T (2.0)", float, range=POSITIVE))

    def __init__(self, model, *, lwf_lambda: float = 1.0, temperature: float = 2.0, **kw):
        if lwf_lambda < 0 or temperature <= 0:
            raise ValueError(f"--lwf-lambda must be >= 0 and --temperature > 0, got {lwf_lambda}, {temperature}")
        self.lwf_lambda, self.temperature = lwf_lambda, temperature
        super().__init__(model, **kw)

    def add_task_parameters(self, t):
        super().add_task_parameters(t)
        if t == 0:
            return
        for layer in self.layers:
            if len(layer.lora_A) == 1:
                layer.add_task()  # a second pair (it also freezes the first; thawed below)
            with torch.no_grad():
                for name in ("lora_A", "lora_B", "lora_magnitude"):
                    pairs = getattr(layer, name)
                    if len(pairs):
                        pairs[1].copy_(pairs[0])  # the teacher: the adapters as task t starts
                        pairs[1].requires_grad_(False)
                        pairs[0].requires_grad_(True)

    def teacher_logits(self, batch):
        """The teacher's answer logits (n, V): the same forward with every layer on pair 1, no dropout."""
        was_training = self.model.training
        self.model.eval()
        Method.use_task(self, 1)  # pair 1, the teacher: SeqLoRA's use_task maps every task to pair 0
        try:
            with torch.no_grad():
                return self.model.answer_logits(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                                batch["labels"], instruction_mask=batch["instruction_mask"])[0]
        finally:
            self.use_task(0)
            self.model.train(was_training)

    def extra_loss(self, batch, task, logits=None):
        if self.num_tasks < 2:
            return None
        if logits is None:
            raise ValueError("LwF needs the training forward's answer logits")
        T = self.temperature
        log_p_teacher = F.log_softmax(self.teacher_logits(batch).float() / T, dim=-1)  # (n, V)
        log_p_student = F.log_softmax(logits.float() / T, dim=-1)  # (n, V)
        # KL(p_teacher || p_student) per answer token, averaged over the batch's answer tokens
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
        return self.lwf_lambda * T ** 2 * kl


# --------------------------------------------------------------------------- O-LoRA


class OLoRALinear(LoRALinear):
    """y = W0 x + s sum_{i<=t} B_i A_i x: every task's LoRA stays on, earlier ones frozen, so
    inference needs no task identity. The pairs run as one (sum r, in) / (out, sum r) product."""

    def update(self, x, tokens=None):
        A = torch.cat(list(self.lora_A))  # (t r, in)
        B = torch.cat(list(self.lora_B), dim=1)  # (out, t r)
        return self.scaling * F.linear(self.drop(x), A), B

    def delta_weight(self):
        return self.scaling * torch.cat(list(self.lora_B), dim=1) @ torch.cat(list(self.lora_A))  # (out, in)

    def orthogonality(self):
        """sum_{i<t} ||A_i A_t^T||_F^2: the new rows' overlap with every earlier subspace."""
        new = self.lora_A[-1]  # (r, in)
        return sum((old @ new.T).pow(2).sum() for old in list(self.lora_A)[:-1])


class OLoRA(LoRAMethod):
    """O-LoRA (Wang et al. 2023): a new LoRA per task, learned in a subspace orthogonal to the
    earlier ones. Decision: l1 = 0.5, l2 = 0, O-LoRA's released defaults."""

    options = (Option("olora_lambda1", "weight of the orthogonality term (0.5)", float, range=NON_NEGATIVE),
               Option("olora_lambda2", "weight of the new LoRA's L2 term (0)", float, range=NON_NEGATIVE))

    def __init__(self, model, *, olora_lambda1: float = 0.5, olora_lambda2: float = 0.0, **kw):
        if kw.get("dora"):
            raise ValueError("--dora does not apply to olora: DoRA normalises one pair's weight, "
                             "O-LoRA sums every task's pair")
        if olora_lambda1 < 0 or olora_lambda2 < 0:
            raise ValueError(f"--olora-lambda1 and --olora-lambda2 must be >= 0, got {olora_lambda1}, {olora_lambda2}")
        self.lambda1, self.lambda2 = olora_lambda1, olora_lambda2
        super().__init__(model, **kw)

    def make_layer(self, base):
        return OLoRALinear(base, self.r, self.lora_alpha)

    def add_task_parameters(self, t):
        for layer in self.layers:
            layer.add_task()

    def step_loss(self, task):
        losses = []
        if self.lambda1 and self.num_tasks > 1:
            losses.append(self.lambda1 * sum(layer.orthogonality() for layer in self.layers))
        if self.lambda2:
            losses.append(self.lambda2 * sum(layer.lora_A[-1].pow(2).sum() + layer.lora_B[-1].pow(2).sum()
                                             for layer in self.layers))  # ||theta_t||^2
        return sum(losses) if losses else None
