"""BranchLoRA's task selector: identity-free inference from an image key and a text key per task.

Each task t owns k_img^t and k_txt^t, trained on task t with
    L_align = sum_i (1 - cos(e_img_i, k_img^t)) + sum_i (1 - cos(e_txt_i, k_txt^t)),
and at inference a sample goes to t* = argmax_t cos(e_img, k_img^t) + cos(e_txt, k_txt^t).
e_img is the mean of the frozen CLIP patch features, e_txt the mean of the frozen LLM input
embeddings of the instruction. The same selector serves DirLoRA and LiLoRA without task identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskSelector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, init_std: float = 0.02, device=None):
        super().__init__()
        self.vision_dim, self.text_dim, self.init_std, self.device = vision_dim, text_dim, init_std, device
        self.keys_img = nn.ParameterList()
        self.keys_txt = nn.ParameterList()

    def add_task(self) -> None:
        # Small random keys: cosine ignores scale, so a small initial norm lets the optimiser
        # turn a key towards its task's mean direction within a few steps.
        for keys, dim in ((self.keys_img, self.vision_dim), (self.keys_txt, self.text_dim)):
            for k in keys:
                k.requires_grad_(False)  # an earlier task's key stays where its task left it
            keys.append(nn.Parameter(torch.randn(dim, device=self.device) * self.init_std))

    def align_loss(self, e_img, e_txt, task: int):  # e_img (B, Cv), e_txt (B, Ct)
        """L_align of task `task`, summed over the batch."""
        k_img, k_txt = self.keys_img[task], self.keys_txt[task]
        return ((1 - F.cosine_similarity(e_img, k_img[None], dim=-1)).sum()
                + (1 - F.cosine_similarity(e_txt, k_txt[None], dim=-1)).sum())

    def scores(self, e_img, e_txt):  # -> (B, T)
        k_img = torch.stack(list(self.keys_img))  # (T, Cv)
        k_txt = torch.stack(list(self.keys_txt))  # (T, Ct)
        return (F.cosine_similarity(e_img[:, None], k_img[None], dim=-1)
                + F.cosine_similarity(e_txt[:, None], k_txt[None], dim=-1))

    def select(self, e_img, e_txt):  # -> (B,) task index
        return self.scores(e_img, e_txt).argmax(-1)


def sample_embeddings(model, input_ids, pixel_values, instruction_mask):
    """(e_img, e_txt) of each sample, from the frozen model: its image's mean vision feature
    (`image_embedding`: for LLaVA the CLIP patches at the layer it reads, for Qwen2-VL the tower's
    last block), and the mean input embedding of the instruction, the span the collator marks (the
    question through "ASSISTANT:" or "assistant\n"; the system prompt before the image is the same
    for every task and would only dilute the signal)."""
    c = model.config
    with torch.no_grad():
        is_image = input_ids == c.image_token_index  # (B, T)
        # A text-only sample has e_img = 0: cos 0 with every image key, so its text alone decides.
        e_img = torch.zeros(len(input_ids), model.image_embedding_dim, device=input_ids.device)  # (B, Cv)
        if pixel_values is not None:
            e_img[is_image.any(1)] = model.image_embedding(pixel_values)
        e_txt = model.instruction_embedding(input_ids, instruction_mask)  # (B, Ct)
    return e_img, e_txt
