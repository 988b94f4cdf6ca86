"""NCCL's rule on a CPU machine: a collective takes only tensors on the process group's device.

gloo takes CPU tensors where NCCL refuses them, so the two-process CPU tests cannot see a CPU
tensor reaching a collective in a GPU run. Here one process plays rank 0 of two whose group
lives on `meta`, a device no CPU tensor is on, while the model trains on the CPU; every
collective is intercepted and refuses a tensor off the group's device, as NCCL does. Copies to
`meta` keep their data aside (`MetaShadow`), so the run continues with real numbers: the other
rank contributes zeros, so each sum returns this rank's own value.
"""

import torch
from test_adapters import tiny_llava
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode

from minimcit import distributed as dist
from minimcit.data import Collator
from minimcit.methods import make_method
from minimcit.minicoin import minicoin
from minimcit.processing import LlavaPrompt, TextTokenizer
from minimcit.runfolder import seeded_start_task
from minimcit.train import TrainConfig, train_stage

aten = torch.ops.aten
META = torch.device("meta")


class MetaShadow(TorchDispatchMode):
    """A CPU tensor copied to `meta` keeps its values in a shadow; copying it back (to_copy or
    copy_) returns them. Any other op on a meta tensor runs as meta (no data)."""

    def __init__(self):
        super().__init__()
        self.shadow = {}

    def values(self, t):
        return self.shadow[id(t)][1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and args[0].device.type == "cpu" and kwargs.get("device") == META:
            out = func(*args, **kwargs)
            self.shadow[id(out)] = (out, args[0].clone())  # the tensor kept alive: its id stays its own
            return out
        if func is aten._to_copy.default and args[0].device == META and id(args[0]) in self.shadow:
            return self.values(args[0]).to(dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and args[1].device == META and id(args[1]) in self.shadow:
            return args[0].copy_(self.values(args[1]))
        return func(*args, **kwargs)


def tiny_run_parts(folder):
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    collator = Collator(TextTokenizer(folder), LlavaPrompt(num_image_tokens=4, image_token_index=63, image_size=28))
    tasks = minicoin("minicoin", "smoke", 0, n_train=8, n_test=1)
    for t in tasks:
        for s in t.train:
            s.image = s.image.resize((28, 28))
    return collator, tasks


def test_every_collective_of_a_training_stage_takes_tensors_on_the_groups_device(tmp_path, monkeypatch):
    collator, tasks = tiny_run_parts(tmp_path)
    shadow, seen = MetaShadow(), []

    def all_reduce(tensor, op=None, **kwargs):
        seen.append(tensor.device)
        if tensor.device != META:
            raise RuntimeError(f"NCCL refuses a tensor on {tensor.device}: the process group's device is meta")

    monkeypatch.setattr(dist, "active", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "_device", META, raising=False)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    cfg = TrainConfig(epochs=1, batch_size=2, grad_accum=2, lr=1e-2)
    for name, hp in (("branchlora", dict(num_branches=4)), ("lilora", {})):
        model = tiny_llava()
        method = make_method(name, model, r=8, lora_alpha=16, verbose=False, **hp)
        with shadow:
            for k in range(2):  # LiLoRA's L_reg from the second task on
                seeded_start_task(method, k, cfg)
                curve = train_stage(model, method.parameter_groups(), tasks[k].train, collator, cfg,
                                    stage=k + 1, label=name, method=method, task=k, quiet=True)
                for stat in method.statistics():  # BranchLoRA's gate counts, as the run sums them
                    dist.sum_(stat)
                method.end_task(k)
        assert all(torch.isfinite(torch.tensor(losses)).all() for _, *losses in curve)
    # two steps a stage: the step's tokens, its gradients and its loss; then the gate statistics
    assert len(seen) >= 2 * 2 * 3 * 2 and set(seen) == {META}
