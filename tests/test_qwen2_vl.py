"""Qwen2-VL's inputs (issue 26, in progress) against transformers' own PIL image processor
(Qwen2VLImageProcessorPil, which needs no torchvision) and its smart_resize."""

import numpy as np
import pytest
import torch
from PIL import Image

from minimcit.qwen2_vl import image_patches, smart_resize

pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


@pytest.mark.parametrize("hw", [(28, 28), (100, 200), (1080, 1920), (17, 3000), (5000, 4000), (56, 57)])
def test_smart_resize_equals_transformers(hw):
    assert smart_resize(*hw) == pil.smart_resize(*hw, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def test_smart_resize_by_hand():
    assert smart_resize(100, 200) == (112, 196)  # round(100/28)*28 = 112, round(200/28)*28 = 196, within bounds
    assert smart_resize(20, 20) == (56, 56)  # 28 x 28 < 56 x 56: scaled up by 56/20, ceil to multiples of 28
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300)


@pytest.mark.parametrize("size", [(84, 56), (200, 100), (333, 517)])  # (w, h): several sizes and aspect ratios
def test_image_patches_equal_the_processors(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = pil.Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    patches, grid = image_patches(image)
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    assert patches.shape == ref["pixel_values"].shape and patches.shape[1] == 3 * 2 * 14 * 14
    torch.testing.assert_close(patches, torch.from_numpy(ref["pixel_values"]), rtol=0, atol=1e-5)
