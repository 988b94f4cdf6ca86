"""From an image and a question to model inputs: LLaVA's image preprocessing, the
vicuna_v1 prompt, and a `tokenizers` tokenizer read from tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as LLaVA's expand2square
from .model import IGNORE_INDEX  # label of a token that carries no loss

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# --------------------------------------------------------------------------- images


def expand2square(img: Image.Image, colour=PAD_COLOUR) -> Image.Image:
    """Pad the short side equally on both sides (LLaVA `image_aspect_ratio=pad`)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), colour)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(img: Image.Image, image_size: int, pad: bool = True) -> torch.Tensor:
    """PIL image -> normalised (3, image_size, image_size) float32, as CLIPImageProcessor
    does it: bicubic resize of the short side, centre crop, rescale, normalise."""
    img = img.convert("RGB")
    if pad:
        img = expand2square(img)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if w <= h else (new_long, image_size)
    img = img.resize(size, Image.Resampling.BICUBIC)
    top, left = int((img.height - image_size) / 2), int((img.width - image_size) / 2)
    img = img.crop((left, top, left + image_size, top + image_size))
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)  # (S, S, 3)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, S, S)


def read_image(path, read):
    """read(the opened image) for the image file at `path` (only its header is decoded unless read
    asks for the pixels); a file PIL cannot read raises an error naming it."""
    try:
        with Image.open(path) as img:
            return read(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def load_image(path, image_size: int, pad: bool = True) -> torch.Tensor:
    return read_image(path, lambda img: preprocess_image(img, image_size, pad))


# --------------------------------------------------------------------------- text


class TextTokenizer:
    """A tokenizer.json read with `tokenizers`; BOS/EOS are added by us, never by its template,
    so prompts are built the same way whatever the file's post-processor says."""

    def __init__(self, path, eos: str | None = None):
        """`eos`: the token that ends an answer, where the prompt fixes it (Qwen2-VL's <|im_end|>);
        else tokenizer_config.json's eos_token, else '</s>'."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{file}: not a tokenizer.json the tokenizers library can read ({e})") from None
        special = {}
        cfg = file.parent / "tokenizer_config.json"
        if cfg.is_file():
            special = json.loads(cfg.read_text())
        # Optional: Qwen's tokenizers have none (a prompt that needs one says so, LlavaPrompt.encode).
        self.bos_id = self._special(special.get("bos_token"), "<s>", file, required=False)
        self.eos_id = self._special(eos or special.get("eos_token"), "</s>", file)
        pad = self._special(special.get("pad_token"), "<pad>", file, required=False)
        self.pad_id = self.eos_id if pad is None else pad

    def _special(self, token, default: str, file, required=True):
        if isinstance(token, dict):  # old tokenizer_config.json spell AddedToken as a dict
            token = token.get("content")
        token = token or default
        idx = self.tok.token_to_id(token)
        if idx is None and required:
            raise ValueError(f"{file}: special token {token!r} is not in the vocabulary")
        return idx

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """The text of `ids` up to the first eos (generate pads after it), special tokens dropped
        even where the tokenizer file does not mark them special."""
        ids = [int(i) for i in ids]
        ids = ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids
        return self.tok.decode([i for i in ids if i != self.pad_id], skip_special_tokens=True)


def build_prompt(question: str, answer: str | None = None, with_image: bool = True, system: str = SYSTEM) -> str:
    """The vicuna_v1 conversation of one turn, with an image or without. Without an answer it
    ends at 'ASSISTANT:', the point where generation starts. system="" drops the system line
    (MiniCoIN: its base never saw it, and it would be 31 of a sample's ~72 tokens)."""
    image = "<image>\n" if with_image else ""
    prompt = f"{system + ' ' if system else ''}USER: {image}{question} ASSISTANT:"
    return prompt if answer is None else f"{prompt} {answer}</s>"


class Encoded(NamedTuple):
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX except at the answers and their eos
    instruction: slice  # the first question's tokens through "ASSISTANT:": what the task selector reads


def _with_answer(tok: TextTokenizer, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """The answer's ids and eos as the tokenizer gives them after `prompt` (leading space included):
    tokenise prompt + answer and keep the suffix."""
    full = tok.encode(f"{prompt} {answer}")
    if full[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the tokenizer merges answer {answer!r} into its prompt; cannot place labels")
    return full[len(prompt_ids):] + [tok.eos_id]


def encode_example(tok: TextTokenizer, question: str, answer: str | None, *, num_image_tokens: int,
                   image_token_index: int, with_image: bool = True, later_turns=(), system: str = SYSTEM) -> Encoded:
    """Token ids, labels and the instruction span of one example. `<image>` becomes
    num_image_tokens copies of image_token_index; the text on each side of it is tokenised on its
    own, as LLaVA's tokenizer_image_token does, so -200 never passes through the tokenizer. A
    text-only example has no image tokens and is tokenised in one piece, as LLaVA does.
    `later_turns` are the (question, answer) pairs after the first, appended as vicuna_v1 does
    ("USER: q ASSISTANT: a</s>"). Only the answers and their eos carry loss."""
    if with_image:
        head, prompt = build_prompt(question, system=system).split("<image>")  # prompt = "\n{question} ASSISTANT:"
        ids, start = [tok.bos_id] + tok.encode(head) + [image_token_index] * num_image_tokens, 0
    else:
        prompt = build_prompt(question, with_image=False, system=system)
        ids, start = [tok.bos_id], prompt.index("USER: ") + len("USER: ")  # the instruction starts at the question
    enc = tok.tok.encode(prompt, add_special_tokens=False)
    first = next((i for i, (_, end) in enumerate(enc.offsets) if end > start), len(enc.ids))
    instruction = slice(len(ids) + first, len(ids) + len(enc.ids))  # after the image, up to the answer
    ids = ids + enc.ids
    labels = [IGNORE_INDEX] * len(ids)
    turns = ([] if answer is None else [(prompt, enc.ids, answer)])
    for q, a in later_turns:
        text = f"USER: {q} ASSISTANT:"
        turns.append((text, tok.encode(text), a))
    for k, (text, text_ids, a) in enumerate(turns):
        if k:  # a later turn's question carries no loss
            ids, labels = ids + text_ids, labels + [IGNORE_INDEX] * len(text_ids)
        answer_ids = _with_answer(tok, text, text_ids, a)
        ids, labels = ids + answer_ids, labels + answer_ids
    return Encoded(ids, labels, instruction)


def encode_plain(tok: TextTokenizer, caption: str, *, num_image_tokens: int, image_token_index: int) -> Encoded:
    """LLaVA's stage-1 "plain" template: the image tokens, then the caption and eos, which alone
    carry loss. No system prompt and no question: pre-training only aligns image and text."""
    prefix = [tok.bos_id] + [image_token_index] * num_image_tokens
    target = tok.encode(caption) + [tok.eos_id]
    return Encoded(prefix + target, [IGNORE_INDEX] * len(prefix) + target, slice(len(prefix), len(prefix)))


# --------------------------------------------------------------------------- a backbone's prompt


class LlavaPrompt:
    """How LLaVA-1.5 makes a sample's model inputs: the vicuna_v1 conversation (or stage 1's plain
    template) with `<image>` as num_image_tokens slots, and each image padded to a square, resized and
    normalised to (3, image_size, image_size); a batch's images stacked. The Collator asks a backbone's
    prompt for exactly these four things (qwen2_vl.Qwen2VLPrompt is the other)."""

    def __init__(self, num_image_tokens: int, image_token_index: int, image_size: int, system: str = SYSTEM,
                 plain: bool = False):
        self.n_img, self.img_id, self.image_size = num_image_tokens, image_token_index, image_size
        self.system, self.plain = system, plain

    EOS = None  # an answer ends with the tokenizer's own eos (tokenizer_config.json's, else </s>)

    @classmethod
    def for_model(cls, c, folder=None, system: str | None = None) -> "LlavaPrompt":
        """The prompt of a LlavaConfig; system None: the vicuna_v1 line."""
        return cls(c.num_image_tokens, c.image_token_index, c.vision.image_size, SYSTEM if system is None else system)

    def check_tokenizer(self, tok: "TextTokenizer", where, c) -> None:
        """A tokenizer of another model that happens to be no larger: its special tokens give it away."""
        image_id = tok.tok.token_to_id("<image>")
        for what, ours, model_id in (("bos", tok.bos_id, c.text.bos_token_id), ("eos", tok.eos_id, c.text.eos_token_id),
                                     ("<image>", image_id, c.image_token_index if c.image_token_index >= 0 else None)):
            if ours is not None and model_id is not None and ours != model_id:
                raise ValueError(f"{where}: the tokenizer's {what} token is id {ours} but the model's config says "
                                 f"{model_id}; use the tokenizer that belongs to the model (--tokenizer)")

    def image(self, image) -> torch.Tensor:  # a PIL image or a path -> (3, S, S)
        if isinstance(image, Image.Image):
            return preprocess_image(image, self.image_size)
        return load_image(image, self.image_size)

    def images(self, pixels: list) -> torch.Tensor:  # -> pixel_values (N, 3, S, S)
        return torch.stack(pixels)

    def slots(self, pixels) -> int:  # the image tokens of an image()
        return self.n_img

    @property
    def max_slots(self) -> int:  # the most any image takes
        return self.n_img

    def image_tokens(self, image) -> int:  # the same, from a PIL image or a path, without decoding it
        return self.n_img

    def encode(self, tok: TextTokenizer, s, slots: int, prompt_only: bool = False) -> Encoded:
        """One sample's ids, labels and instruction span (`slots`: its image's tokens, always n_img here)."""
        if tok.bos_id is None:
            raise ValueError("LLaVA's prompt starts with bos, but the tokenizer has no '<s>' and its "
                             "tokenizer_config.json names no bos_token; use the tokenizer that belongs to the model")
        if self.plain:
            r = encode_plain(tok, "" if prompt_only else s.answer, num_image_tokens=self.n_img,
                             image_token_index=self.img_id)
            # the prompt is the image alone: drop the empty caption's eos
            return r._replace(ids=r.ids[:-1], labels=r.labels[:-1]) if prompt_only else r
        return encode_example(tok, s.question, None if prompt_only else s.answer, num_image_tokens=self.n_img,
                              image_token_index=self.img_id, with_image=s.image is not None,
                              later_turns=() if prompt_only else s.later_turns, system=self.system)
