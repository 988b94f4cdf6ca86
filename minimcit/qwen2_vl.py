"""Qwen2-VL, the second backbone (issue 26), written from transformers' `qwen2_vl` files.

In progress: so far its image inputs, as transformers' Qwen2VLImageProcessorPil makes them
(image_processing_pil_qwen2_vl.py: `smart_resize`, `_preprocess`, `patchify`). The vision tower,
the decoder with M-RoPE, the chat template and the loader follow in this file; nothing else in
minimcit uses it yet.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

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
