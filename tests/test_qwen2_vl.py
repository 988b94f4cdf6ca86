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


def test_vision_tower_equals_transformers_on_images_of_several_grids():
    """Tiny random Qwen2VisionTransformerPretrainedModel, its state dict loaded strictly into ours
    (the same module names), two images of different sizes in one call: the merged features agree."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from minimcit.qwen2_vl import VisionConfig, VisionTower

    torch.manual_seed(0)
    hf_cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=24, num_heads=4, mlp_ratio=2)
    ref = Qwen2VisionTransformerPretrainedModel(hf_cfg).eval()
    with torch.no_grad():  # weights large enough that attention is far from uniform: rotary and masking show
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = VisionTower(VisionConfig(depth=2, embed_dim=32, hidden_size=24, num_heads=4, mlp_ratio=2)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((56, 84), (112, 56))]
    parts = [image_patches(im) for im in images]
    pixels = torch.cat([p for p, _ in parts])
    grid = torch.tensor([g for _, g in parts])
    with torch.no_grad():
        want = ref(pixels, grid_thw=grid).pooler_output
        got = ours(pixels, grid)
    assert got.shape == (pixels.shape[0] // 4, 24)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
