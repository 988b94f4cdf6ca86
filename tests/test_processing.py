"""Image preprocessing against transformers' CLIP image processor; prompt and labels by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from minimcit.processing import (IGNORE_INDEX, PAD_COLOUR, SYSTEM, TextTokenizer, build_prompt,
                                 encode_example, expand2square, preprocess_image)


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def clip_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def test_expand2square_pads_with_mean_colour_centred():
    img = noise_image(6, 2)
    sq = np.asarray(expand2square(img))
    assert sq.shape == (6, 6, 3)
    assert PAD_COLOUR == (122, 116, 104)
    assert (sq[:2] == PAD_COLOUR).all() and (sq[4:] == PAD_COLOUR).all()  # 2 rows above, 2 below
    assert (sq[2:4] == np.asarray(img)).all()


@pytest.mark.parametrize("w,h,size", [(61, 37, 28), (23, 50, 30), (336, 200, 336)])
def test_padded_preprocessing_equals_clip_image_processor(w, h, size):
    img = noise_image(w, h)
    want = clip_processor(size)(expand2square(img), return_tensors="pt")["pixel_values"][0]
    got = preprocess_image(img, size)
    assert got.shape == (3, size, size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("w,h", [(61, 37), (37, 61)])
def test_unpadded_preprocessing_resizes_short_side_and_centre_crops(w, h):
    img = noise_image(w, h, seed=3)
    want = clip_processor(28)(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(preprocess_image(img, 28, pad=False), want, rtol=0, atol=1e-5)


@pytest.fixture
def word_tokenizer(tmp_path):
    words = ["<unk>", "<s>", "</s>", "<pad>", "A", "chat", "USER", ":", "ASSISTANT", "what", "colour", "?",
             "red", "light"] + SYSTEM.replace(".", " .").replace(",", " ,").replace("'", " ' ").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # whitespace (the prompt's "\n" too) separates words and is dropped
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return TextTokenizer(tmp_path), vocab


def test_prompt_is_vicuna_v1():
    assert build_prompt("Q?", "A") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nQ? ASSISTANT: A</s>")


def test_prompt_without_system_line(word_tokenizer):
    """MiniCoIN's prompt (system=""): the conversation starts at USER, and a text-only sample's
    instruction still starts at its question."""
    assert build_prompt("Q?", "A", system="") == "USER: <image>\nQ? ASSISTANT: A</s>"
    tok, vocab = word_tokenizer
    ids, labels, instruction = encode_example(tok, "what colour?", "red", num_image_tokens=2, image_token_index=99,
                                              system="")
    assert ids == [vocab[w] for w in ["<s>", "USER", ":"]] + [99, 99] + [
        vocab[w] for w in ["what", "colour", "?", "ASSISTANT", ":", "red", "</s>"]]
    ids, _, instruction = encode_example(tok, "what colour?", "red", num_image_tokens=2, image_token_index=99,
                                         with_image=False, system="")
    assert ids[instruction] == [vocab[w] for w in ["what", "colour", "?", "ASSISTANT", ":"]]


def test_only_answer_and_eos_carry_loss(word_tokenizer):
    tok, vocab = word_tokenizer
    ids, labels, instruction = encode_example(tok, "what colour?", "light red", num_image_tokens=4,
                                              image_token_index=-200)
    assert len(ids) == len(labels)
    assert ids[0] == vocab["<s>"] and ids.count(-200) == 4
    start = ids.index(-200)
    assert ids[start:start + 4] == [-200] * 4
    # hand-tokenised tail: "what colour ? ASSISTANT : light red </s>"
    assert ids[start + 4:] == [vocab[w] for w in ["what", "colour", "?", "ASSISTANT", ":", "light", "red", "</s>"]]
    assert labels[:-3] == [IGNORE_INDEX] * (len(ids) - 3)
    assert labels[-3:] == [vocab["light"], vocab["red"], vocab["</s>"]]
    assert ids[instruction] == [vocab[w] for w in ["what", "colour", "?", "ASSISTANT", ":"]]  # what the selector reads


def test_prompt_without_answer_ends_at_assistant(word_tokenizer):
    tok, vocab = word_tokenizer
    ids, labels, instruction = encode_example(tok, "what colour?", None, num_image_tokens=2, image_token_index=99)
    assert ids[-2:] == [vocab["ASSISTANT"], vocab[":"]]
    assert set(labels) == {IGNORE_INDEX} and instruction.stop == len(ids)


def test_tokenizer_special_tokens_and_errors(word_tokenizer, tmp_path):
    tok, vocab = word_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<s>"], vocab["</s>"], vocab["<pad>"])
    assert tok.decode(tok.encode("light red")) == "light red"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextTokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(ValueError, match=r"<\|end\|>"):
        TextTokenizer(tmp_path)


def test_plain_stage1_template_is_image_then_caption(word_tokenizer):
    from minimcit.processing import encode_plain

    tok, vocab = word_tokenizer
    ids, labels, instruction = encode_plain(tok, "light red", num_image_tokens=3, image_token_index=-200)
    assert ids == [vocab["<s>"], -200, -200, -200, vocab["light"], vocab["red"], vocab["</s>"]]
    assert labels == [IGNORE_INDEX] * 4 + [vocab["light"], vocab["red"], vocab["</s>"]]
    assert ids[instruction] == []  # no question in stage 1
