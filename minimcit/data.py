"""Task data: `Sample` and `Task`, the real CoIN and CVIT files, and collation into batches.

A task is two lists of `Sample`s and the name of its scorer in metrics.py. The synthetic
MiniCoIN tasks are made in minicoin.py; the real benchmarks are read here from their JSON
files, with image paths decoded only when a batch is collated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .processing import IGNORE_INDEX, TextTokenizer, encode_example, encode_plain, load_image, preprocess_image


@dataclass
class Sample:
    task: str
    question: str  # the instruction after "<image>\n"
    answer: str  # the training target
    answers: Any = None  # what the scorer compares with: a list for VQA and captions; None means `answer`
    image: Any = None  # a PIL image, or a path read at collation
    id: str = ""

    @property
    def target(self):
        return self.answer if self.answers is None else self.answers


@dataclass
class Task:
    name: str
    scorer: str  # metrics.SCORERS key, or "caption" (CIDEr)
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)


# CoIN's instruction suffixes, reused by MiniCoIN so both read the same.
# --------------------------------------------------------------------------- real CoIN and CVIT

COIN = [("ScienceQA", "letter"), ("TextVQA", "vqa"), ("ImageNet", "substring"), ("GQA", "exact"),
        ("VizWiz", "exact"), ("Grounding", "box"), ("VQAv2", "exact"), ("OCRVQA", "exact")]
CVIT = [("ScienceQA", "letter"), ("TextVQA", "vqa"), ("Flickr30k", "caption"), ("ImageNet", "substring"),
        ("GQA", "exact"), ("VQAv2", "exact")]


def _read_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def _field(item, key, path: Path, i: int, types=(str,)):
    if not isinstance(item, dict) or key not in item:
        raise ValueError(f"{path}: item {i} has no field {key!r}")
    if not isinstance(item[key], types):
        raise ValueError(f"{path}: item {i} field {key!r} should be {' or '.join(t.__name__ for t in types)}")
    return item[key]


def _train_samples(path: Path, task: str, image_root: Path, cap) -> list[Sample]:
    """LLaVA conversations: the first human turn (minus <image>) and the gpt turn after it."""
    out = []
    for i, item in enumerate(_read_list(path)[:cap]):
        turns = _field(item, "conversations", path, i, (list,))
        if len(turns) < 2 or not all(isinstance(t, dict) and "value" in t for t in turns[:2]):
            raise ValueError(f"{path}: item {i} field 'conversations' needs a human and a gpt turn with 'value'")
        question = turns[0]["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
        out.append(Sample(task, question, turns[1]["value"], None, image_root / _field(item, "image", path, i),
                          id=str(item.get("id", i))))
    return out


def _test_samples(path: Path, task: str, scorer: str, image_root: Path, cap) -> list[Sample]:
    out = []
    for i, item in enumerate(_read_list(path)[:cap]):
        answer = _field(item, "answer_bbox" if scorer == "box" else "answer", path, i, (str, list))
        if scorer == "box" and isinstance(answer, list):
            answer = str(answer)
        first = answer if isinstance(answer, str) else answer[0]
        question = _field(item, "text", path, i).replace("<image>", "").strip()
        out.append(Sample(task, question, first, None if isinstance(answer, str) else answer,
                          image_root / _field(item, "image", path, i), id=str(item.get("question_id", i))))
    return out


def load_benchmark(name: str, data_root, image_root, max_per_task: int | None = None) -> list[Task]:
    """CoIN or CVIT from `<data_root>/Instructions_Original/<Task>/{train,test}.json` (CoIN's
    layout; `<data_root>/<Task>/` also works) with image paths relative to `image_root`."""
    order = {"coin": COIN, "cvit": CVIT}[name]
    data_root, image_root = Path(data_root), Path(image_root)
    for p, what in ((data_root, "data root"), (image_root, "image root")):
        if not p.is_dir():
            raise FileNotFoundError(f"{what} not found: {p}")
    base = data_root / "Instructions_Original" if (data_root / "Instructions_Original").is_dir() else data_root
    tasks = []
    for task, scorer in order:
        folder = base / task
        if not folder.is_dir():
            raise FileNotFoundError(f"missing task folder: {folder} ({name} needs {[t for t, _ in order]})")
        t = Task(task, scorer, _train_samples(folder / "train.json", task, image_root, max_per_task),
                 _test_samples(folder / "test.json", task, scorer, image_root, max_per_task))
        for split in ("train", "test"):
            if not getattr(t, split):
                raise ValueError(f"{folder / (split + '.json')}: no items")
        tasks.append(t)
    return tasks


# --------------------------------------------------------------------------- collation


class Collator:
    """Samples -> a batch dict: input_ids, attention_mask, pixel_values, instruction_mask (the
    question's tokens, which the task selector reads) and, for training, labels (answer and eos
    only). Right padding for training; left padding and no answer with `prompt_only=True`, the
    prompts `Llava.generate` continues. `plain=True` uses the stage-1 template (image, then
    caption) instead of the conversation."""

    def __init__(self, tokenizer: TextTokenizer, num_image_tokens: int, image_token_index: int, image_size: int,
                 plain: bool = False):
        self.tok, self.n_img, self.img_id, self.image_size = tokenizer, num_image_tokens, image_token_index, image_size
        self.plain = plain

    def pixels(self, s: Sample) -> torch.Tensor:
        if isinstance(s.image, Image.Image):
            return preprocess_image(s.image, self.image_size)
        return load_image(s.image, self.image_size)

    def __call__(self, samples: list[Sample], prompt_only: bool = False) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        if self.plain:
            rows = [encode_plain(self.tok, "" if prompt_only else s.answer, num_image_tokens=self.n_img,
                                 image_token_index=self.img_id) for s in samples]
            if prompt_only:  # the prompt is the image alone: drop the empty caption's eos
                rows = [r._replace(ids=r.ids[:-1], labels=r.labels[:-1]) for r in rows]
        else:
            rows = [encode_example(self.tok, s.question, None if prompt_only else s.answer,
                                   num_image_tokens=self.n_img, image_token_index=self.img_id) for s in samples]
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        instruction = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            shift = width - len(r.ids) if prompt_only else 0  # left padding for generation
            sl = slice(shift, shift + len(r.ids))
            ids[i, sl], labels[i, sl], mask[i, sl] = torch.tensor(r.ids), torch.tensor(r.labels), 1
            instruction[i, shift + r.instruction.start:shift + r.instruction.stop] = True
        batch = {"input_ids": ids, "attention_mask": mask, "instruction_mask": instruction,
                 "pixel_values": torch.stack([self.pixels(s) for s in samples])}
        if not prompt_only:
            batch["labels"] = labels
        return batch
