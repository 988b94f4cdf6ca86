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
        got = ours(pixels, [g for _, g in parts])
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


def hf_qwen2_vl(folder, hidden, heads, kv, layers, section, tie, depth, seed=0, scaled=True):
    """A random transformers Qwen2VLForConditionalGeneration, weights scaled so that attention is far from
    uniform (positions and masks then show in the logits), saved by save_pretrained into `folder`.
    scaled=False keeps transformers' init (std 0.02), whose gradients are far from rounding."""
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
        for name, p in ref.named_parameters() if scaled else ():
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


def test_rope_index_equals_get_rope_index(folder):
    """Our cumulative-sum positions against transformers' loop (Qwen2VLModel.get_rope_index): left padding,
    two images in a row (one right after the other's <|vision_end|>), a text-only row, grids 4x6, 8x4, 4x4."""
    from minimcit.qwen2_vl import ImagePatches, rope_index

    ref = hf_qwen2_vl(folder, **CONFIGS[0])
    a, b, c = images([(56, 84), (112, 56), (56, 56)])
    ids, mask = batch([[5, 6, *slots(a), 7, *slots(b), 8], [9, 10], [5, *slots(c), *slots(a), 11, 12, 13]], left=True)
    px = ImagePatches.of([a, b, c, a])
    want, _ = ref.model.get_rope_index(ids, (ids == IMAGE).int(), px.grid_thw, attention_mask=mask)
    got = rope_index(ids, mask, px.grid, IMAGE, 2)
    assert torch.equal(got, want)
    assert len(set(got[1, 0].tolist())) != len(set(got[2, 0].tolist()))  # height and width differ on a 4 x 6 grid


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


# --------------------------------------------------------------------------- every method through run.py


def qwen_tokenizer(folder, image=IMAGE, start=START, end=END):
    """A word-level tokenizer.json with Qwen2-VL's special tokens at the config's ids (the tiny config's by
    default); spaces and newlines are tokens of their own, so a template's whitespace shows in the ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    special = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 4, "<|image_pad|>": image,
               "<|vision_start|>": start, "<|vision_end|>": end}
    words = ["system", "user", "assistant", "You", "are", "a", "helpful", "What", "is", "in", "the", "picture", "?",
             "thing", "Answer", "question", "using", "single", "word", "or", "phrase", ".", ":", " ", "\n",
             *"0123456789"]
    vocab = {**special, **{w: i for i, w in enumerate(words, start=5)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), "isolated"),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(special))
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    """CoIN's fixture (text-only and multi-turn items, images of several sizes) and a tiny Qwen2-VL saved by
    transformers with its tokenizer: the arguments of a run on them."""
    from test_data import write_fixture

    root = tmp_path_factory.mktemp("qwen_run")
    data, image_root = write_fixture(root / "coin", n=2)
    hf_qwen2_vl(root / "ckpt", **CONFIGS[0])
    qwen_tokenizer(root / "ckpt")
    return root, ["--tasks", "coin", "--data-root", str(data), "--image-root", str(image_root), "--model",
                  str(root / "ckpt"), "--max-new-tokens", "2", "--num-workers", "0", "--quiet"]


def run_methods():
    import run

    return sorted(run.METHODS)


@pytest.mark.parametrize("method", run_methods())
def test_every_method_runs_on_a_tiny_qwen2_vl(method, qwen_run, tmp_path):
    import json

    import run

    root, args = qwen_run
    out = tmp_path / method
    assert run.main(["--method", method, *args, "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["complete"] and len(r["acc_matrix"]) == 9 and r["params"]["trainable"] > 0
    assert all(0 <= v <= 100 for row in r["acc_matrix_robust"] for v in row if v is not None)


# --------------------------------------------------------------------------- the chat template and the loader

# Qwen2-VL-Instruct's chat_template.json, as the checkpoints ship it (copied in, e.g., by repositories that
# override it: it is not in transformers' package). Rendered with jinja2, the engine apply_chat_template uses.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def render(messages, generation_prompt=False):
    import jinja2

    return jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages,
                                                                  add_generation_prompt=generation_prompt)


@pytest.fixture
def qwen_collator(tmp_path):
    from minimcit.data import Collator
    from minimcit.processing import TextTokenizer
    from minimcit.qwen2_vl import TURN_END, Qwen2VLConfig, Qwen2VLPrompt, VisionConfig

    qwen_tokenizer(tmp_path)
    cfg = Qwen2VLConfig(vision=VisionConfig(depth=1, embed_dim=32, hidden_size=64, num_heads=4),
                        image_token_index=IMAGE, vision_start_token_id=START, vision_end_token_id=END)
    return Collator(TextTokenizer(tmp_path, eos=TURN_END), Qwen2VLPrompt(cfg))


@pytest.mark.parametrize("with_image", [True, False])
def test_prompt_equals_the_instruct_chat_template_with_labels_on_the_answers(qwen_collator, with_image):
    """Ids of the rendered template, each <|image_pad|> expanded to the image's merged tokens as Qwen2VLProcessor
    does (replace_image_token: grid.prod() // merge^2), tokenised whole; labels on each answer and its <|im_end|>."""
    from minimcit.data import Sample

    image = Image.fromarray(np.zeros((56, 112, 3), dtype=np.uint8)) if with_image else None  # 2 x 4 merged: 8
    s = Sample("t", "What is in the picture ?", "thing 3", image=image, later_turns=(("Answer the question", "7"),))
    tok, r = qwen_collator.tok, qwen_collator.encode(s)
    first = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": s.question}]
    text = render([{"role": "user", "content": first}, {"role": "assistant", "content": "thing 3"},
                   {"role": "user", "content": "Answer the question"}, {"role": "assistant", "content": "7"}])
    text = text.replace("<|image_pad|>", "<|image_pad|>" * 8).removesuffix("\n")  # we end at the last <|im_end|>
    assert r.ids == tok.encode(text)
    end = tok.tok.token_to_id("<|im_end|>")
    labelled = [i for i, label in zip(r.ids, r.labels) if label != -100]
    assert labelled == tok.encode("thing 3") + [end] + tok.encode("7") + [end]
    assert r.ids[r.instruction] == tok.encode(f"{s.question}<|im_end|>\n<|im_start|>assistant\n")
    prompt = qwen_collator.encode(s, prompt_only=True)
    want = render([{"role": "user", "content": first}], generation_prompt=True).replace("<|image_pad|>",
                                                                                         "<|image_pad|>" * 8)
    assert prompt.ids == tok.encode(want) and set(prompt.labels) == {-100}


def test_collated_batch_feeds_the_model(qwen_collator, folder):
    """Images of two sizes and a text-only sample: pixel_values holds their patches and grids in order, each
    image's slots equal its merged tokens, and prompt_length (from the image's header) equals the prompt."""
    from minimcit.data import Sample
    from minimcit.qwen2_vl import ImagePatches, Qwen2VL

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((56, 112), (140, 84))]
    samples = [Sample("t", "What is in the picture ?", "thing", image=images[0]), Sample("t", "What is 3 ?", "7"),
               Sample("t", "What is in the picture ?", "0", image=images[1])]
    b = qwen_collator(samples)
    px = b["pixel_values"]
    assert isinstance(px, ImagePatches) and px.grid == ((1, 4, 8), (1, 10, 6))
    assert (b["input_ids"] == IMAGE).sum(1).tolist() == [8, 0, 15]
    assert [qwen_collator.prompt_length(s) for s in samples] == qwen_collator.prompts(samples)["attention_mask"].sum(
        1).tolist()
    hf_qwen2_vl(folder, **CONFIGS[0])
    loss, n = Qwen2VL.from_pretrained(folder).loss(b["input_ids"], px, b["attention_mask"], b["labels"])
    assert n == 6 and torch.isfinite(loss)  # "thing", "7" and "0", each with its <|im_end|>


def write_qwen_hub(src, folder):
    """The hub's layout of Qwen/Qwen2-VL-2B-Instruct (transformers 4.45): flat text fields with rope_scaling
    {"type": "mrope"}, vision fields `in_chans`, keys visual.* / model.* / lm_head.*, from transformers' save."""
    import json

    from safetensors.torch import load_file, save_file

    state = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    hub = {}
    for k, v in state.items():
        k = k.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        hub[k] = v
    folder.mkdir()
    save_file(hub, folder / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    text, vision = cfg.pop("text_config"), cfg.pop("vision_config")
    rope = text.pop("rope_parameters")
    vision["in_chans"] = vision.pop("in_channels")
    flat = {**cfg, **text, "model_type": "qwen2_vl", "rope_theta": rope["rope_theta"], "vision_config": vision,
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    (folder / "config.json").write_text(json.dumps(flat))
    return folder


@pytest.mark.parametrize("layout", ["hub", "sharded"])
def test_hub_and_sharded_layouts_load_to_the_same_logits(tmp_path, layout):
    from minimcit.checkpoint import load_model
    from minimcit.qwen2_vl import ImagePatches, Qwen2VL

    ref = hf_qwen2_vl(tmp_path / "v5", **CONFIGS[1])  # untied: lm_head is a key of its own
    if layout == "hub":
        folder = write_qwen_hub(tmp_path / "v5", tmp_path / "hub")
    else:
        folder = tmp_path / "sharded"
        ref.save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    ours = load_model(folder)
    assert isinstance(ours, Qwen2VL) and ours.config.mrope_section == (4, 4, 4)
    a, = images([(56, 84)])
    ids, mask = batch([[5, *slots(a), 7, 8]], left=False)
    px = ImagePatches.of([a])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, px, mask), ref(**hf_inputs(ids, mask, px)).logits, rtol=1e-4, atol=1e-4)


def test_bad_configs_and_checkpoints_are_refused_by_name(tmp_path):
    import json

    from minimcit.checkpoint import load_model

    hf_qwen2_vl(tmp_path / "m", **CONFIGS[0])
    cfg_file = tmp_path / "m" / "config.json"
    good = json.loads(cfg_file.read_text())

    def refused(change, match):
        cfg = json.loads(json.dumps(good))
        change(cfg)
        cfg_file.write_text(json.dumps(cfg))
        with pytest.raises((ValueError, KeyError), match=match):
            load_model(tmp_path / "m")

    refused(lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]), "mrope_section")
    refused(lambda c: c["text_config"].update(use_sliding_window=True), "use_sliding_window")
    refused(lambda c: c["vision_config"].update(hidden_size=32), "vision_config.hidden_size")
    refused(lambda c: c["text_config"].update(num_hidden_layers=3), "found in no checkpoint file")
    refused(lambda c: c["text_config"].update(intermediate_size=64), "has shape")


# --------------------------------------------------------------------------- methods on the backbone


def test_parameter_counts_at_the_qwen2_vl_2b_shape_equal_closed_form():
    """DirLoRA and LiLoRA on the FFN and the merger's two linears (LiLoRA's Table 5 placement), r = 128, 6 tasks."""
    from benchmarks.param_table import QWEN2_VL_2B
    from minimcit.methods import parameter_report

    C, I, L, E = 1536, 8960, 28, 1280 * 4  # the merger's input: four 1280-wide patches side by side
    lin = [(C, I)] * 2 * L + [(I, C)] * L + [(E, E), (E, C)]  # (in, out): gate, up, down per layer; mlp.0, mlp.2
    r, rt = 128, 64
    rep = parameter_report(QWEN2_VL_2B, "dirlora", 6, target="ffn+projector", r=r, lora_alpha=2 * r)
    per = sum(r * (i + o) for i, o in lin)
    assert per == 115_015_680 and rep["total_added"] == 6 * per and rep["wrapped"] == 3 * L + 2
    rep = parameter_report(QWEN2_VL_2B, "lilora", 6, r=r, lora_alpha=2 * r)  # its own default placement
    shared, task = sum(r * (i + o) for i, o in lin), sum(o * rt + rt * r + 1 for _, o in lin)
    assert (rep["total_added"], rep["per_task"]) == (shared + 6 * task, task)


def test_adapters_go_in_the_decoder_and_merger_never_the_tower(folder):
    from minimcit.methods import make_method
    from minimcit.qwen2_vl import Qwen2VL

    hf_qwen2_vl(folder, **CONFIGS[0])
    model = Qwen2VL.from_pretrained(folder).requires_grad_(False)
    m = make_method("lilora", model, r=8, lora_alpha=16, verbose=False)
    assert {n for n in m.names if n.startswith("visual.")} == {"visual.merger.mlp.0", "visual.merger.mlp.2"}
    assert len(m.names) == 2 + 3 * 2  # the merger's two linears, gate/up/down in each of 2 layers
    with pytest.raises(ValueError, match="matches 'visual.blocks.0.attn.qkv'"):
        make_method("seqlora", Qwen2VL.from_pretrained(folder), target=r"visual\.blocks\.0\.attn\.qkv", verbose=False)


def test_merged_adapters_and_the_selector_on_qwen2_vl(folder):
    """With non-zero B everywhere, a merged LoRA gives the unmerged logits (peft's merge test), and the
    selector's e_img is each image's mean patch feature after the tower's last block."""
    from minimcit.methods import make_method
    from minimcit.qwen2_vl import ImagePatches, Qwen2VL
    from minimcit.selector import sample_embeddings

    hf_qwen2_vl(folder, **CONFIGS[0])
    model = Qwen2VL.from_pretrained(folder).eval().requires_grad_(False)
    m = make_method("dirlora", model, r=4, lora_alpha=8, target="ffn+projector", verbose=False)
    m.start_task(0)
    with torch.no_grad():
        for layer in m.layers:
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    a, b = images([(56, 84), (112, 56)])
    ids, mask = batch([[5, *slots(a), 7, 8], [5, 6, *slots(b), 9]], left=True)
    px = ImagePatches.of([a, b])
    with torch.no_grad():
        unmerged = model(ids, px, mask)
        base = Qwen2VL.from_pretrained(folder).eval()(ids, px, mask)
        with m.inference(0):
            assert all(layer.plain for layer in m.layers)  # W0 + s B A written into the weights, merger's too
            merged = model(ids, px, mask)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters change the logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    e_img, _ = sample_embeddings(model, ids, px, ids == 7)
    with torch.no_grad():
        x = model.visual.encode(px.patches, px.grid)
    torch.testing.assert_close(e_img, torch.stack([x[:24].mean(0), x[24:].mean(0)]))  # 4 x 6 and 8 x 4 patches


def test_two_processes_give_the_results_of_one_on_qwen2_vl(qwen_run, tmp_path):
    """torchrun, two CPU processes (gloo), against one: ImagePatches dealt with their micro-batches, dropout
    on (with each process drawing its own masks, 5-10% of the adapters' elements differed after one task)."""
    import json

    from test_distributed import TORCHRUN, adapters, torchrun

    import run

    if TORCHRUN is None:
        pytest.skip("torchrun not found")
    _, args = qwen_run
    flags = ["--method", "branchlora", *args, "--batch-size", "2", "--grad-accum", "2", "--task-identity", "selector"]
    assert run.main([*flags, "--out", str(tmp_path / "one")]) == 0
    done = torchrun("run.py", *flags, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for key in ("acc_matrix", "acc_matrix_robust", "format_matrix", "selector_accuracy", "params"):
        assert one[key] == two[key], key
    # CoIN's recipe: LoRA dropout 0.05 and micro-batches dealt out; each micro-batch draws its own masks
    # whichever process runs it (train_stage), so only summation order may differ.
    for stage in (1, 8):
        a, b = adapters(tmp_path / "one", stage), adapters(tmp_path / "two", stage)
        for k in a["adapters"]:
            torch.testing.assert_close(a["adapters"][k], b["adapters"][k], rtol=1e-5, atol=1e-5)


def test_saved_model_loads_in_transformers_and_back(folder, tmp_path):
    """save_qwen2_vl writes what transformers' from_pretrained reads strictly, with the same logits; and ours
    reads it back (the round trip gpu_check's end-to-end run makes at the 2B shape)."""
    from transformers import Qwen2VLForConditionalGeneration

    from minimcit.qwen2_vl import ImagePatches, Qwen2VL, save_qwen2_vl

    hf_qwen2_vl(folder, **CONFIGS[1])
    ours = Qwen2VL.from_pretrained(folder).eval()
    save_qwen2_vl(ours, tmp_path / "saved")
    theirs = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    back = Qwen2VL.from_pretrained(tmp_path / "saved").eval()
    a, = images([(84, 56)])
    ids, mask = batch([[5, *slots(a), 7, 8, 9]], left=False)
    px = ImagePatches.of([a])
    with torch.no_grad():
        want = ours(ids, px, mask)
        torch.testing.assert_close(theirs(**hf_inputs(ids, mask, px)).logits, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(back(ids, px, mask), want)


def test_a_tokenizer_of_another_model_is_refused_by_its_special_tokens(qwen_run, tmp_path, capsys):
    import run

    _, args = qwen_run
    qwen_tokenizer(tmp_path, image=IMAGE - 1)  # <|image_pad|> one id off
    assert run.main(["--method", "seqlora", *args, "--tokenizer", str(tmp_path), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert f"the tokenizer's <|image_pad|> token is id {IMAGE - 1} but the model's config says {IMAGE}" in err
    assert not (tmp_path / "out" / "results.json").exists()
