"""Qwen2-VL written out: its image inputs, its vision tower, and a Qwen2 decoder with M-RoPE.

Read from transformers' `qwen2_vl` files (5.24): image_processing_pil_qwen2_vl.py (`smart_resize`,
`_preprocess`, `patchify`) and modeling_qwen2_vl.py (PatchEmbed, Qwen2VLVisionRotaryEmbedding,
VisionAttention, Qwen2VLVisionBlock, PatchMerger, Qwen2VisionTransformerPretrainedModel,
Qwen2VLRotaryEmbedding, Qwen2VLAttention, get_rope_index), the code that defines the Qwen2-VL
paper's naive dynamic resolution and M-RoPE (arXiv 2409.12191; its text is not in ../shared/papers
and was not read: every rule here is transformers', cited at the line). Module names follow transformers'
tree without its `model.` prefix (`visual.blocks.0.attn.qkv`, `language_model.layers.0.mlp.up_proj`,
`lm_head`), so the decoder's linears carry the LLaMA names every adapter targets. The decoder is
model.py's LLaMA one: Qwen2 differs only in biases on q, k and v (TextConfig.qkv_bias) and in the
rotary positions this file computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .model import (ACT, IGNORE_INDEX, Backbone, Linear, LlamaModel, TextConfig, Tokens, apply_rope, check_config,
                    masked_mean, per_image_instruction, rope_cos_sin)
from .processing import CLIP_MEAN, CLIP_STD, Encoded, read_image  # CLIP's normalisation, as LLaVA's tower

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
    mlp_ratio: float = 4  # an int in transformers 5's strict config
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


def vision_positions(grid, merge: int, device=None):  # [(t, h, w)] -> (N, 2): each patch's (row, column)
    """In the patches' order (image_patches): 2 x 2 merge blocks row-major, patches within a block
    row-major (get_vision_position_ids); a video's frames repeat the grid."""
    out = []
    for t, h, w in grid:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows, cols = (p.reshape(block).transpose(1, 2).flatten() for p in (rows, cols))
        out.append(torch.stack([rows, cols], -1).repeat(t, 1))
    return torch.cat(out).to(device)


def vision_rotary(positions, head_dim: int, theta: float):  # (N, 2) -> cos, sin (N, head_dim)
    """2D RoPE: a quarter of the frequencies for the row, a quarter for the column, the pair repeated
    over the whole head (Qwen2VLVisionRotaryEmbedding, axial)."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float, device=positions.device) / half)
    freqs = positions[..., None].float() * inv_freq  # (N, 2, head_dim / 4)
    f = torch.cat([freqs[:, 0], freqs[:, 1]], -1)  # (N, head_dim / 2): rows, then columns
    emb = torch.cat([f, f], -1)  # (N, head_dim)
    return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_head, self.head_dim = c.num_heads, c.embed_dim // c.num_heads
        self.qkv = nn.Linear(c.embed_dim, 3 * c.embed_dim)
        self.proj = nn.Linear(c.embed_dim, c.embed_dim)

    def forward(self, x, cos, sin, frames: list[int]):  # x (N, C); frames: patches of each frame, in order
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.n_head, self.head_dim).unbind(1)  # each (N, h, hd)
        # Rotated in float32 and cast back to q's own dtype, as apply_rotary_pos_emb_vision does: under
        # autocast x is the LayerNorm's float32 but q, k, v the Linear's bf16, and one dtype for all three
        # keeps SDPA on its fused kernels (mixed, it falls back to materialising (h, N, N) float32 scores).
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, hd)
        q, k = apply_rope(q.float(), cos, sin).to(v.dtype), apply_rope(k.float(), cos, sin).to(v.dtype)
        # Every patch attends to the patches of its own frame only (cu_seqlens in transformers): one
        # attention per frame, not one masked (N, N) attention, which at 8 x 1280 merged tokens would
        # hold 16 x 40960^2 scores.
        # 4-D (1, h, n, hd) inputs: the fused kernels take no other rank.
        y = torch.cat([F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in qkv))[0].transpose(0, 1)
                       for qkv in zip(q.split(frames), k.split(frames), v.split(frames))])  # (N, h, hd)
        return self.proj(y.reshape(N, -1))


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

    def forward(self, x, cos, sin, frames: list[int]):
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each 2 x 2 block's four patches (contiguous in the patches' order) side by side
    through Linear -> GELU -> Linear to the LLM's width: Qwen2-VL's projector. Its linears take the
    images' Tokens, one row per image, as LLaVA's projector's do, so an adapter there routes per image."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.width = c.embed_dim * c.spatial_merge_size ** 2
        self.ln_q = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(Linear(self.width, self.width), nn.GELU(), Linear(self.width, c.hidden_size))

    def forward(self, x, sizes: list[int], tokens: Tokens | None = None):  # x (N, embed_dim) -> (N / 4, hidden)
        x = self.ln_q(x).view(-1, self.width)  # (M, 4 embed_dim): M merged tokens, image after image
        rows = nn.utils.rnn.pad_sequence(x.split(sizes), batch_first=True)  # (images, P, 4 embed_dim)
        mask = torch.arange(rows.shape[1], device=x.device) < torch.tensor(sizes, device=x.device)[:, None]
        t = Tokens(mask=mask, instruction=None if tokens is None else tokens.instruction)
        return self.mlp[2](self.mlp[1](self.mlp[0](rows, t)), t)[mask]  # (M, hidden)


class VisionTower(nn.Module):
    """Patches of any number of images, each its own grid -> merged features (sum of t h w / 4, hidden_size)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)

    def encode(self, pixel_values, grid):  # (N, C t p p), [(t, h, w)] per image -> (N, embed_dim) before the merger
        c = self.config
        cos, sin = vision_rotary(vision_positions(grid, c.spatial_merge_size, pixel_values.device),
                                 c.embed_dim // c.num_heads, c.rope_theta)
        frames = [h * w for t, h, w in grid for _ in range(t)]  # patches per frame
        x = self.patch_embed(pixel_values)
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        return x

    def forward(self, pixel_values, grid, tokens: Tokens | None = None):
        sizes = [t * h * w // self.config.spatial_merge_size ** 2 for t, h, w in grid]  # merged tokens per image
        return self.merger(self.encode(pixel_values, grid), sizes, tokens)


# --------------------------------------------------------------------------- config

# Qwen2VLTextConfig's defaults where they differ from TextConfig's, for a config.json that omits them.
TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                     max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645)


@dataclass
class Qwen2VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(**TEXT_DEFAULTS, qkv_bias=True))
    # M-RoPE: how many of the head's head_dim / 2 rotary frequencies go to time, height and width.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    image_token_index: int = 151655  # <|image_pad|>
    vision_start_token_id: int = 151652  # <|vision_start|>
    vision_end_token_id: int = 151653  # <|vision_end|>

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen2VLConfig":
        """From a Qwen2-VL `config.json`: the hub's flat spelling (text fields at the top, `rope_scaling`)
        or transformers 5's (`text_config` with `rope_parameters`). `source` names the file in errors."""
        if not isinstance(d.get("vision_config"), dict):
            raise ValueError(f"{source}: missing field 'vision_config'")
        text = dict(d["text_config"]) if isinstance(d.get("text_config"), dict) else dict(d)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise ValueError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                             "(Qwen2-VL uses M-RoPE)")
        text["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", TEXT_DEFAULTS["rope_theta"]))
        if text.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (Qwen2-VL's checkpoints set false)")
        tie = d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)  # v5 keeps it at the top
        vision = dict(d["vision_config"])
        vision.setdefault("in_channels", vision.get("in_chans", 3))  # the hub's spelling
        t = {**TEXT_DEFAULTS, **{k: text[k] for k in (f.name for f in fields(TextConfig)) if text.get(k) is not None}}
        eos = t["eos_token_id"]
        cfg = cls(
            vision=VisionConfig(**{f.name: vision[f.name] for f in fields(VisionConfig)
                                   if vision.get(f.name) is not None}),
            text=TextConfig(**{**t, "eos_token_id": eos[0] if isinstance(eos, list) else eos, "qkv_bias": True,
                               "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": bool(tie),
                               "head_dim": None}),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            image_token_index=d.get("image_token_id", 151655),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
        )
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict:
        """transformers 5's config.json spelling, so a saved model reads back through from_dict (and
        transformers' Qwen2VLForConditionalGeneration.from_pretrained)."""
        v, t = self.vision, self.text
        text = {f: getattr(t, f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                           "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id",
                                           "pad_token_id")}
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "text_config": {"model_type": "qwen2_vl_text", **text, "rope_parameters": {
                "rope_type": "default", "mrope_section": list(self.mrope_section), "rope_theta": t.rope_theta}},
            "vision_config": {"model_type": "qwen2_vl", **{f.name: getattr(v, f.name) for f in fields(VisionConfig)}},
            "image_token_id": self.image_token_index, "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id, "tie_word_embeddings": t.tie_word_embeddings,
        }

    # What the memory plan (plan.py) needs to know of a backbone (LlavaConfig's).
    def build(self) -> "Qwen2VL":
        return Qwen2VL(self)

    @property
    def vision_layers(self) -> int:
        return self.vision.depth

    def with_layers(self, text: int, vision: int) -> "Qwen2VLConfig":
        return replace(self, text=replace(self.text, num_hidden_layers=text), vision=replace(self.vision, depth=vision))

    def tiny(self) -> "Qwen2VLConfig":
        """The same layers, patches and vocabulary at a tiny width (head_dim kept: M-RoPE's sections fit it)."""
        return replace(self, vision=replace(self.vision, embed_dim=32, num_heads=2, hidden_size=2 * self.text.head_dim),
                       text=replace(self.text, hidden_size=2 * self.text.head_dim, intermediate_size=128,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=None))

    def fake_images(self, n: int, slots: int | None, generator):  # -> ImagePatches of n images, ~slots tokens each
        """n images of one grid near square with `slots` merged tokens (the default: 1280, max_pixels's)."""
        v, slots = self.vision, slots or 1280
        h = max(d for d in range(1, math.isqrt(slots) + 1) if slots % d == 0)
        m = v.spatial_merge_size
        grid = ((1, h * m, slots // h * m),) * n
        width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        return ImagePatches(torch.randn(n * slots * m * m, width, generator=generator), grid), slots

    def vision_layer(self) -> nn.Module:
        return VisionBlock(self.vision)

    def validate(self, source: str = "config") -> None:
        t, v = self.text, self.vision
        check_config(source, v, t, [
            (sum(self.mrope_section) * 2 == t.head_dim and len(self.mrope_section) == 3, "rope mrope_section",
             f"{list(self.mrope_section)} (three sections summing to head_dim / 2 = {t.head_dim // 2})"),
            (t.num_attention_heads * t.head_dim == t.hidden_size, "text_config.num_attention_heads",
             t.num_attention_heads),
            (t.num_attention_heads % t.num_key_value_heads == 0, "text_config.num_key_value_heads",
             t.num_key_value_heads),
            (t.hidden_act == "silu", "text_config.hidden_act", t.hidden_act),
            (v.hidden_act in ACT, "vision_config.hidden_act", v.hidden_act),
            (v.embed_dim % v.num_heads == 0, "vision_config.num_heads", v.num_heads),
            (v.hidden_size == t.hidden_size, "vision_config.hidden_size",
             f"{v.hidden_size} (the merger's output must be the LLM's width, {t.hidden_size})"),
        ], sizes=("_size", "_layers", "_heads", "_dim", "depth"))


# --------------------------------------------------------------------------- M-RoPE


def rope_index(input_ids, attention_mask, grid, image_token_index: int, merge: int):  # -> (3, B, T)
    """Each token's (time, height, width) position (get_rope_index): text tokens on the diagonal,
    counting real tokens only; an image's tokens on its merged grid, offset by the position it
    starts at; the text after an image resumes at that offset plus the grid's longer side. Pads: 0.

    Written with cumulative sums instead of get_rope_index's loop over each row's runs, so that no
    step depends on the values (the memory plan runs it on fake tensors): a real token advances the
    position by 1, an image by the longer side of its grid (counted at its first token)."""
    B, T = input_ids.shape
    dev = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_image = (input_ids == image_token_index) & real  # (B, T)
    text = real & ~is_image
    if grid:  # each image token's image (in slot order, as the features are scattered) and rank within it
        g = torch.tensor([(t, h // merge, w // merge) for t, h, w in grid], device=dev)  # (N, 3) merged grid
        ends = (g[:, 0] * g[:, 1] * g[:, 2]).cumsum(0)  # (N,) slots up to each image's end
        rank = is_image.flatten().cumsum(0).view(B, T) - 1  # (B, T) rank among all image slots
        image = torch.searchsorted(ends, rank.clamp(min=0), right=True).clamp(max=len(grid) - 1)  # (B, T)
        k = rank - (ends - g[:, 0] * g[:, 1] * g[:, 2])[image]  # (B, T) index within its image
        h, w = g[image, 1], g[image, 2]
        first = is_image & (k == 0)
        advance = text.long() + torch.where(first, torch.maximum(h, w), 0)
    else:
        advance = text.long()
    start = advance.cumsum(-1) - advance  # (B, T): the position each token starts at
    pos = start.expand(3, B, T).clone()  # text: the same on every axis
    if grid:
        start_img = torch.gather(start, 1, torch.where(is_image, torch.arange(T, device=dev) - k, 0))
        grid_pos = torch.stack([k // (h * w), (k // w) % h, k % w])  # (3, B, T): time, row, column
        pos = torch.where(is_image, start_img + grid_pos, pos)
    return pos.masked_fill(~real, 0)


def mrope_cos_sin(positions, head_dim: int, theta: float, section, dtype):  # (3, B, T) -> 2 x (B, 1, T, hd)
    """M-RoPE's tables (Qwen2VLRotaryEmbedding): LLaMA's frequencies, the first section[0] of them
    turned by the time position, the next section[1] by the height, the last by the width. On text
    all three positions are equal, so a text token is rotated exactly as in plain RoPE."""
    axis = [i for i, n in enumerate(section) for _ in range(n)] * 2  # the axis turning each of the hd columns
    tables = [rope_cos_sin(p, head_dim, theta, dtype) for p in positions]  # per axis (cos, sin), (B, 1, T, hd)
    index = torch.tensor(axis, device=positions.device).expand(1, *tables[0][0].shape)  # (1, B, 1, T, hd)
    return tuple(torch.stack(t).gather(0, index)[0] for t in zip(*tables))  # column j from axis[j]


# --------------------------------------------------------------------------- Qwen2-VL


@dataclass
class ImagePatches:
    """A batch's images as Qwen2-VL takes them, its `pixel_values`: every image's patches one image
    after another (image_patches), and each image's (t, h, w) grid of patches."""
    patches: torch.Tensor  # (sum of t h w, 3 * temporal * patch^2)
    # Each image's (t, h, w) in patches, as plain integers: every shape of the step follows from them
    # without reading a tensor (no device sync; the memory plan's fake run sees them too).
    grid: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, images: list) -> "ImagePatches":  # [image_patches(...) of each image]
        return cls(torch.cat([p for p, _ in images]), tuple(tuple(g) for _, g in images))

    @property
    def grid_thw(self) -> torch.Tensor:  # (images, 3): transformers' image_grid_thw
        return torch.tensor(self.grid, dtype=torch.long)

    def to(self, device, non_blocking: bool = False) -> "ImagePatches":
        return ImagePatches(self.patches.to(device, non_blocking=non_blocking), self.grid)

    def pin_memory(self) -> "ImagePatches":  # DataLoader(pin_memory=True) calls it
        return ImagePatches(self.patches.pin_memory(), self.grid)

    def __len__(self) -> int:
        return len(self.grid)


class Qwen2VL(Backbone):
    TOWER = r"visual\.(?!merger\.).*"  # the merger is the projector
    PROJECTOR = r"visual\.merger\.mlp\.[02]"
    projector_name = "visual.merger"

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.language_model = LlamaModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None) -> "Qwen2VL":
        """Load a Qwen2-VL folder as the hub holds it or transformers saves it (single or sharded)."""
        from .checkpoint import load_weights, read_json, weight_files

        path = Path(path)
        config = Qwen2VLConfig.from_dict(read_json(path / "config.json"), source=str(path / "config.json"))
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, [(f, LAYOUT) for f in weight_files(path)], dtype or torch.float32, device or "cpu")
        return model

    @property
    def image_embedding_dim(self) -> int:
        return self.config.vision.embed_dim

    def image_embedding(self, pixel_values: ImagePatches):  # -> (N, embed_dim)
        """Each image's mean patch feature after the tower's last block, before the merger (Decision:
        the counterpart of LLaVA's CLIP patches, which are read before its projector)."""
        x = self.visual.encode(pixel_values.patches, pixel_values.grid).float()  # (sum t h w, E)
        return torch.stack([p.mean(0) for p in x.split([t * h * w for t, h, w in pixel_values.grid])])

    def embed(self, input_ids, pixel_values: ImagePatches | None = None, instruction_mask=None):
        """Token embeddings (B, T, C) with each image's merged features written, in order, at its
        <|image_pad|> slots; and, given `instruction_mask`, each row's mean input embedding over that
        span (B, C) float32, else None (Llava.embed's)."""
        is_image = input_ids == self.config.image_token_index  # (B, T)
        x = self.language_model.embed_tokens(input_ids)  # (B, T, C); the pad rows are overwritten below
        instruction = None if instruction_mask is None else masked_mean(x.detach().float(), instruction_mask)
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image tokens but no pixel_values were given")
            return x, instruction
        grid = pixel_values.grid
        starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # (B, T): each image's first slot
        per_image = per_image_instruction(instruction, starts.sum(1))
        feats = self.visual(pixel_values.patches.to(self.lm_head.weight.dtype), grid,
                            None if per_image is None else Tokens(instruction=per_image))  # (M, C)
        if n_slots != len(feats):
            raise ValueError(f"input_ids hold {n_slots} image tokens (id {self.config.image_token_index}) but "
                             f"{len(grid)} image(s) give {len(feats)} features")
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype)), instruction

    def positions(self, input_ids, attention_mask, pixel_values: ImagePatches | None = None):  # -> (3, B, T)
        return rope_index(input_ids, attention_mask, None if pixel_values is None else pixel_values.grid,
                          self.config.image_token_index, self.config.vision.spatial_merge_size)

    def rope(self, positions, dtype):
        c = self.config
        return mrope_cos_sin(positions, c.text.head_dim, c.text.rope_theta, c.mrope_section, dtype)


def save_qwen2_vl(model: "Qwen2VL", folder) -> None:
    """config.json + model.safetensors in transformers 5's layout (model.visual., model.language_model.),
    each written atomically."""
    from .checkpoint import save

    save(model, folder, {"visual.": "model.visual.", "language_model.": "model.language_model."})


# The hub's keys (visual., model., lm_head.) and transformers 5's (model.visual., model.language_model.)
# -> ours; checkpoint.load_weights applies the first rule that matches and reports any key left over.
LAYOUT = [
    (r"^(model\.)?visual\.", "visual."),
    (r"^model\.language_model\.", "language_model."),
    (r"^model\.", "language_model."),
    (r"^lm_head\.", "lm_head."),
]


# --------------------------------------------------------------------------- the chat template

SYSTEM = "You are a helpful assistant."  # the chat template's system message when a conversation gives none
TURN_END = "<|im_end|>"  # ends every turn; generation stops at it (the Instruct generation_config's eos)


class Qwen2VLPrompt:
    """How Qwen2-VL makes a sample's model inputs (processing.LlavaPrompt's four calls): the Instruct
    chat template (its chat_template.json; Qwen2VLProcessor expands each <|image_pad|> to the image's
    merged tokens),

        <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|image_pad|> x n
        <|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

    with later turns appended as `\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>`,
    labels on each answer and its <|im_end|> only (Decision: the newline after it, which the template
    writes before the next turn, carries no loss), and the image in patches at its own resolution
    (image_patches). system="" drops the system turn."""

    def __init__(self, config: Qwen2VLConfig, system: str = SYSTEM, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280):
        self.c, self.system, self.min_pixels, self.max_pixels = config, system, min_pixels, max_pixels
        self.factor = config.vision.patch_size * config.vision.spatial_merge_size

    def image(self, image):  # a PIL image or a path -> (patches, (1, gh, gw))
        v = self.c.vision
        if isinstance(image, Image.Image):
            return image_patches(image, v.patch_size, v.spatial_merge_size, v.temporal_patch_size,
                                 self.min_pixels, self.max_pixels)
        return read_image(image, self.image)

    EOS = TURN_END  # whatever the tokenizer's own eos (the base model's is <|endoftext|>)

    @classmethod
    def for_model(cls, config: Qwen2VLConfig, folder, system: str | None = None) -> "Qwen2VLPrompt":
        """With the image limits of the checkpoint's preprocessor_config.json, where it has one: min_pixels
        and max_pixels (the hub's spelling) or size.shortest_edge / longest_edge (transformers 5's).
        system None: the template's own system message."""
        system = SYSTEM if system is None else system
        file = Path(folder) / "preprocessor_config.json"
        if not file.is_file():
            return cls(config, system)
        from .checkpoint import read_json

        raw = read_json(file)
        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        low, high = raw.get("min_pixels", size.get("shortest_edge", 56 * 56)), \
            raw.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))
        if not (isinstance(low, int) and isinstance(high, int) and 0 < low <= high):
            raise ValueError(f"{file}: min_pixels {low!r} and max_pixels {high!r} must be integers, 0 < min <= max")
        return cls(config, system, low, high)

    def check_tokenizer(self, tok, where, c: Qwen2VLConfig) -> None:
        """The ids the template writes itself must be the tokenizer's: a tokenizer of another model gives
        itself away by them."""
        for name, want in (("<|image_pad|>", c.image_token_index), ("<|vision_start|>", c.vision_start_token_id),
                           ("<|vision_end|>", c.vision_end_token_id)):
            ours = tok.tok.token_to_id(name)
            if ours != want:
                raise ValueError(f"{where}: the tokenizer's {name} token is id {ours} but the model's config says "
                                 f"{want}; use the tokenizer that belongs to the model (--tokenizer)")

    def images(self, pixels: list) -> ImagePatches:
        return ImagePatches.of(pixels)

    def slots(self, pixels) -> int:  # merged tokens of an image(): its grid over merge^2
        _, (t, h, w) = pixels
        return t * h * w // self.c.vision.spatial_merge_size ** 2

    @property
    def max_slots(self) -> int:  # an image at max_pixels
        return (self.max_pixels // self.factor ** 2)

    def image_tokens(self, image) -> int:  # the same from the image's size, read from its header
        w, h = image.size if isinstance(image, Image.Image) else read_image(image, lambda img: img.size)
        gh, gw = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        return (gh // self.factor) * (gw // self.factor)

    def encode(self, tok, s, slots: int, prompt_only: bool = False) -> Encoded:
        end = tok.tok.token_to_id(TURN_END)
        if end is None or tok.eos_id != end:
            raise ValueError(f"the tokenizer must end turns with {TURN_END!r} (TextTokenizer(path, eos={TURN_END!r}))")
        head = (f"<|im_start|>system\n{self.system}{TURN_END}\n" if self.system else "") + "<|im_start|>user\n"
        ids = tok.encode(head)
        if s.image is not None:
            ids += [self.c.vision_start_token_id] + [self.c.image_token_index] * slots + [self.c.vision_end_token_id]
        question = tok.encode(f"{s.question}{TURN_END}\n<|im_start|>assistant\n")
        instruction = slice(len(ids), len(ids) + len(question))  # the question through "assistant\n"
        ids = ids + question
        labels = [IGNORE_INDEX] * len(ids)
        turns = [] if prompt_only else [(None, s.answer), *s.later_turns]
        for q, a in turns:
            if q is not None:  # a later turn's question carries no loss
                text = tok.encode(f"\n<|im_start|>user\n{q}{TURN_END}\n<|im_start|>assistant\n")
                ids, labels = ids + text, labels + [IGNORE_INDEX] * len(text)
            answer = tok.encode(a) + [end]
            ids, labels = ids + answer, labels + answer
        return Encoded(ids, labels, instruction)
