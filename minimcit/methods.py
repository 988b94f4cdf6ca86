"""Every method by its run.py name, and parameter accounting on any model shape."""

from __future__ import annotations

from dataclasses import replace

import torch

from .adapters import BranchLoRA, DirLoRA, Joint, LiLoRA, MoELoRA, SeqLoRA, SMoLoRA
from .baselines import EWC, OLoRA, LwF, Replay
from .method import Method
from .model import LlavaConfig, TextConfig, VisionConfig
from .qwen2_vl import Qwen2VLConfig
from .qwen2_vl import VisionConfig as QwenVisionConfig

METHODS = {"seqlora": SeqLoRA, "dirlora": DirLoRA, "joint": Joint, "moelora": MoELoRA,
           "branchlora": BranchLoRA, "lilora": LiLoRA, "smolora": SMoLoRA,
           "replay": Replay, "ewc": EWC, "lwf": LwF, "olora": OLoRA}


def make_method(name: str, model, **hparams) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](model, **hparams)


def check_hparams(name: str, backbone: str = "llava", **hparams) -> None:
    """Build `name` on a tiny model of the backbone ("llava" or "qwen2_vl", config.json's model_type) on the
    meta device: every check its constructor makes (r divisible by N, top-k within N, flags that exclude
    each other, a --target that matches) runs before a checkpoint loads."""
    text = TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1)
    if backbone == "qwen2_vl":
        c = Qwen2VLConfig(vision=QwenVisionConfig(depth=1, embed_dim=8, hidden_size=8, num_heads=1),
                          text=replace(text, qkv_bias=True), mrope_section=(1, 1, 2), image_token_index=7)
    else:
        c = LlavaConfig(vision=VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1, image_size=4, patch_size=2),
                        text=text, image_token_index=7)
    with torch.device("meta"):
        model = c.build().requires_grad_(False)
    make_method(name, model, verbose=False, **hparams)


def parameter_report(config, method: str, num_tasks: int, **hparams) -> dict:
    """Parameter counts of `method` on a model of `config`, built on the meta device (a 7B
    shape costs no memory): `trainable` while the first task trains, `total_added` after
    `num_tasks` tasks (TP), `per_task` added by each task after the first (EP). A fully
    trained projector is not an adapter and is not counted."""
    with torch.device("meta"):
        model = config.build()
    m = make_method(method, model, verbose=False, **hparams)
    added = []  # adapter parameters after each task has started
    for t in range(max(num_tasks, 2)):
        m.start_task(t)
        if t == 0:
            trainable = sum(p.numel() for p in m.trainable_parameters())
        added.append(sum(p.numel() for p in m.adapter_parameters()))
    return {"method": method, "trainable": trainable, "total_added": added[num_tasks - 1],
            "per_task": added[1] - added[0], "first_task": added[0], "wrapped": len(m.names)}
