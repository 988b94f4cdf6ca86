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


# --------------------------------------------------------------------------- the whole model against transformers

IMAGE, VIDEO, START, END = 120, 123, 121, 122  # the tiny vocabulary's <|image_pad|>, video, vision start/end

# Three tiny shapes: GQA with tied embeddings; one KV head, untied, one vision block; plain multi-head with
# head_dim 8 (M-RoPE sections of 1, 1, 2 frequencies).
CONFIGS = [
    dict(hidden=64, heads=4, kv=2, layers=2, section=[2, 3, 3], tie=True, depth=2),
    dict(hidden=48, heads=2, kv=1, layers=2, section=[4, 4, 4], tie=False, depth=1),
    dict(hidden=64, heads=8, kv=8, layers=3, section=[1, 1, 2], tie=True, depth=2),
]


def hf_qwen2_vl(folder, hidden, heads, kv, layers, section, tie, depth, seed=0):
    """A random transformers Qwen2VLForConditionalGeneration, weights scaled so that attention is far from
    uniform (positions and masks then show in the logits), saved by save_pretrained into `folder`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, eos_token_id=3, bos_token_id=None,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                          "rope_theta": 10000.0}),
        vision_config=dict(depth=depth, embed_dim=32, hidden_size=hidden, num_heads=4, mlp_ratio=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=tie)
    ref = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
            elif "norm" in name or "ln_q" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3)  # biases: q/k/v's matter to the rotary
    ref.save_pretrained(folder)
    return ref


def images(sizes, seed=1):  # [(h, w)] -> [image_patches of a random image of each size]
    rng = np.random.default_rng(seed)
    return [image_patches(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for h, w in sizes]


def slots(part):  # the text of one image: <|vision_start|> <|image_pad|> x (merged tokens) <|vision_end|>
    _, (t, h, w) = part
    return [START] + [IMAGE] * (t * h * w // 4) + [END]


def batch(rows, left: bool):
    T = max(map(len, rows))
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def hf_inputs(ids, mask, px):
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px.patches, image_grid_thw=px.grid_thw,
                mm_token_type_ids=(ids == IMAGE).int())  # transformers 5 needs the token types with images


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "qwen2vl"


@pytest.mark.parametrize("shape", CONFIGS, ids=["gqa-tied", "one-kv-untied", "mha-hd8"])
def test_logits_equal_transformers(folder, shape):
    """Images of three sizes and aspect ratios (4 x 6, 8 x 4 and 4 x 4 patches), a row with two images, a
    text-only row, right padding; our model loaded by from_pretrained from transformers' own save."""
    from minimcit.qwen2_vl import ImagePatches, Qwen2VL

    ref = hf_qwen2_vl(folder, **shape)
    ours = Qwen2VL.from_pretrained(folder).eval()
    a, b, c = images([(56, 84), (112, 56), (56, 56)])
    rows = [[5, 6, *slots(a), 7, 8, 9], [5, *slots(b), 10, 11, 12, 13, 14, 15, 16, 17], [9, 8, 7, 6],
            [5, *slots(c), 7, *slots(a), 8]]
    px = ImagePatches.of([a, b, c, a])  # in the order the slots come
    ids, mask = batch(rows, left=False)
    with torch.no_grad():
        want = ref(**hf_inputs(ids, mask, px)).logits
        got = ours(ids, px, mask)
    real = mask.bool()
    assert want[real].abs().max() > 1  # logits far from zero: a wrong position would show
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_text_only_logits_equal_transformers(folder):
    from minimcit.qwen2_vl import Qwen2VL

    ref = hf_qwen2_vl(folder, **CONFIGS[0])
    ours = Qwen2VL.from_pretrained(folder).eval()
    ids, mask = batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]], left=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, None, mask)[mask.bool()], ref(input_ids=ids, attention_mask=mask).logits[
            mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", CONFIGS[:2], ids=["gqa-tied", "one-kv-untied"])
def test_greedy_generation_equals_transformers_on_a_left_padded_batch(folder, shape):
    from minimcit.qwen2_vl import ImagePatches, Qwen2VL

    ref = hf_qwen2_vl(folder, **shape)
    ours = Qwen2VL.from_pretrained(folder).eval()
    a, b = images([(84, 56), (56, 112)], seed=2)
    ids, mask = batch([[5, *slots(a), 7, 8], [5, 6, 7, 8, 9, *slots(b), 10, 11, 12], [13, 14]], left=True)
    px = ImagePatches.of([a, b])
    new = 8
    want = ref.generate(**hf_inputs(ids, mask, px), max_new_tokens=new, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, px, mask, max_new_tokens=new, eos_token_id=None)
    assert len(set(map(tuple, want.tolist()))) > 1  # the rows differ: the images and positions matter
    assert got.tolist() == want.tolist()
