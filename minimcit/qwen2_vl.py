"""Qwen2-VL, the second backbone (issue 26), written from transformers' `qwen2_vl` files.

In progress: so far its image inputs, as transformers' Qwen2VLImageProcessorPil makes them
(image_processing_pil_qwen2_vl.py: `smart_resize`, `_preprocess`, `patchify`), and its vision
tower (modeling_qwen2_vl.py: PatchEmbed, Qwen2VLVisionRotaryEmbedding, VisionAttention,
Qwen2VLVisionBlock, PatchMerger, Qwen2VisionTransformerPretrainedModel), with transformers'
module names. The decoder with M-RoPE, the chat template and the loader follow in this file;
nothing else in minimcit uses it yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .model import ACT

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN / _STD, as for LLaVA's tower
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` (patch 14 x merge 2), scaled so that
    min_pixels <= h * w <= max_pixels with the aspect ratio kept as far as the rounding allows
    (transformers' smart_resize; the defaults are Qwen2VLImageProcessorPil's size)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image {width}x{height}: its aspect ratio must be below 200 for Qwen2-VL")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:  # shrink: floor, so the product stays within max_pixels
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # grow: ceil, so the product reaches min_pixels
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def image_patches(image: Image.Image, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                  min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """One image -> (patches (gh * gw, 3 * temporal * patch^2) float32, (1, gh, gw)).

    Resized (bicubic) to smart_resize's size, scaled to [0, 1], CLIP-normalised, then cut into
    patch x patch squares in the order the vision tower expects: each 2 x 2 block of patches that
    the merger will fuse is contiguous (rows of blocks, then blocks within a row, then the block's
    own 2 x 2), each patch flattened as (channel, time, row, column). A still image fills both
    temporal slots with the same frame."""
    h, w = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    x = np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0  # (h, w, 3)
    x = ((x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(2, 0, 1)  # (3, h, w)
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(3, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (block row, block col, row in block, col in block, C, ph, pw)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, -1)), (1, gh, gw)


# --------------------------------------------------------------------------- vision tower


@dataclass
class VisionConfig:
    """Qwen2VLVisionConfig's fields (its defaults: the 7B's tower; the 2B's is the same but hidden_size 1536)."""
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # the merger's output: the LLM's width
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    hidden_act: str = "quick_gelu"


class PatchEmbed(nn.Module):
    """Conv3d over (time 2, 14, 14) with stride equal to its kernel: one linear map per patch."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, x):  # (N, C * t * p * p) -> (N, embed_dim)
        c = self.c
        x = x.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, c.embed_dim)


def vision_positions(grid_thw, merge: int):  # -> (N, 2): each patch's (row, column) in its image
    """In the patches' order (image_patches): 2 x 2 merge blocks row-major, patches within a block
    row-major (get_vision_position_ids); a video's frames repeat the grid."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows, cols = (p.reshape(block).transpose(1, 2).flatten() for p in (rows, cols))
        out.append(torch.stack([rows, cols], -1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def vision_rotary(positions, head_dim: int, theta: float):  # (N, 2) -> cos, sin (N, head_dim)
    """2D RoPE: a quarter of the frequencies for the row, a quarter for the column, the pair repeated
    over the whole head (Qwen2VLVisionRotaryEmbedding, axial)."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float, device=positions.device) / half)
    freqs = positions[..., None].float() * inv_freq  # (N, 2, head_dim / 4)
    f = torch.cat([freqs[:, 0], freqs[:, 1]], -1)  # (N, head_dim / 2): rows, then columns
    emb = torch.cat([f, f], -1)  # (N, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_head, self.head_dim = c.num_heads, c.embed_dim // c.num_heads
        self.qkv = nn.Linear(c.embed_dim, 3 * c.embed_dim)
        self.proj = nn.Linear(c.embed_dim, c.embed_dim)

    def forward(self, x, cos, sin, same_image):  # x (N, C); same_image (N, N) True where two patches share an image
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.n_head, self.head_dim).unbind(1)  # each (N, h, hd)
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, hd): rotated in float32, as apply_rotary_pos_emb_vision
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        # Every patch attends to the patches of its own image only (cu_seqlens in transformers).
        y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=same_image)  # (h, N, hd)
        return self.proj(y.transpose(0, 1).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        hidden = int(c.embed_dim * c.mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(c.embed_dim, hidden), ACT[c.hidden_act], nn.Linear(hidden, c.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.embed_dim, eps=1e-6), nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.attn, self.mlp = VisionAttention(c), VisionMLP(c)

    def forward(self, x, cos, sin, same_image):
        x = x + self.attn(self.norm1(x), cos, sin, same_image)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each 2 x 2 block's four patches (contiguous in the patches' order) side by side
    through Linear -> GELU -> Linear to the LLM's width."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.width = c.embed_dim * c.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, c.hidden_size))

    def forward(self, x):  # (N, embed_dim) -> (N / 4, hidden_size)
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionTower(nn.Module):
    """Patches of any number of images, each its own grid -> merged features (sum of t h w / 4, hidden_size)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)

    def forward(self, pixel_values, grid_thw):  # (N, C t p p), (images, 3)
        c = self.config
        cos, sin = vision_rotary(vision_positions(grid_thw, c.spatial_merge_size), c.embed_dim // c.num_heads,
                                 c.rope_theta)
        frame = torch.repeat_interleave(torch.arange(int(grid_thw[:, 0].sum()), device=grid_thw.device),
                                        (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]))
        same_image = frame[:, None] == frame[None, :]  # (N, N): a frame attends within itself (cu_seqlens)
        x = self.patch_embed(pixel_values)
        for block in self.blocks:
            x = block(x, cos, sin, same_image)
        return self.merger(x)
