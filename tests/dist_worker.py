"""Run by test_distributed.py under torchrun: train a tiny BranchLoRA (with its selector) and a
tiny LiLoRA for two tasks across processes, then check that every process holds exactly the same
adapter tensors (selector keys, routers, gate statistics, B0 and its snapshot, phi) afterwards."""

import sys
from pathlib import Path

import torch
from test_adapters import tiny_llava
from tokenizers import Tokenizer, models, pre_tokenizers

from minimcit import distributed as dist
from minimcit.methods import make_method
from minimcit.data import Collator
from minimcit.minicoin import minicoin
from minimcit.processing import LlavaPrompt, TextTokenizer
from minimcit.runfolder import seeded_start_task
from minimcit.train import TrainConfig, train_stage


def main(folder: Path) -> None:
    dist.init("cpu")
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        tok.save(str(folder / "tokenizer.json"))
    dist.barrier()
    collator = Collator(TextTokenizer(folder), LlavaPrompt(num_image_tokens=4, image_token_index=63, image_size=28))
    tasks = minicoin("minicoin", "smoke", 0, n_train=8, n_test=1)
    for t in tasks:
        for s in t.train:
            s.image = s.image.resize((28, 28))
    cfg = TrainConfig(epochs=1, batch_size=2, grad_accum=2, lr=1e-2)
    for name, hp in (("branchlora", dict(num_branches=4)), ("lilora", {})):
        model = tiny_llava()
        method = make_method(name, model, r=8, lora_alpha=16, verbose=False, **hp)
        for k in range(2):
            seeded_start_task(method, k, cfg)
            train_stage(model, method.parameter_groups(), tasks[k].train, collator, cfg, stage=k + 1,
                        label=name, method=method, task=k, quiet=True)
            for stat in method.statistics():
                dist.sum_(stat)
            method.end_task(k)
        state = {n: v.detach().clone() for n, v in method.adapter_state_dict().items()}
        frozen = sorted(n for n, v in method.adapter_tensors().items() if getattr(v, "requires_grad", False))
        every = dist.gather((state, frozen))
        if dist.is_main():
            for other, other_frozen in every[1:]:
                assert other_frozen == frozen, name
                for n, v in state.items():
                    assert torch.equal(v, other[n]), f"{name}: {n} differs across processes"
            (folder / f"{name}.ok").write_text(str(len(state)))
    dist.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
