"""Task data: `Sample` and `Task`, the real CoIN and CVIT files, and collation into batches.

A task is two lists of `Sample`s and the name of its scorer in metrics.py. The synthetic
MiniCoIN tasks are made in minicoin.py; the real benchmarks are read here from their JSON
files, with image paths decoded only when a batch is collated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_json
from .metrics import parse_option
from .official import OFFICIAL_RULES
from .processing import IGNORE_INDEX, TextTokenizer


@dataclass
class Sample:
    task: str
    question: str  # the (first) instruction, without "<image>"
    answer: str  # the training target (of the first turn)
    answers: Any = None  # what the scorer compares with: a list for VQA and captions; None means `answer`
    image: Any = None  # a PIL image, a path read at collation, or None for a text-only item
    id: str = ""
    later_turns: tuple = ()  # (question, answer) pairs after the first, all trained on
    size: list | None = None  # the image's [w, h] where a scorer needs it (CoIN Grounding's test.json)

    @property
    def target(self):
        return self.answer if self.answers is None else self.answers


@dataclass
class Task:
    name: str
    scorer: str  # the robust scorer: a metrics.SCORERS key, or "caption" (CIDEr)
    official: str | None = None  # the official rule: the CoIN/CVIT task whose script scores it (official.py)
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    test_file: str = ""  # where the test items came from, as a researcher would cite it


# CoIN's instruction suffixes, reused by MiniCoIN so both read the same.
# --------------------------------------------------------------------------- real CoIN and CVIT

COIN = [("ScienceQA", "letter"), ("TextVQA", "vqa"), ("ImageNet", "substring"), ("GQA", "exact"),
        ("VizWiz", "exact"), ("Grounding", "box"), ("VQAv2", "exact"), ("OCRVQA", "exact")]
CVIT = [("ScienceQA", "letter"), ("TextVQA", "vqa"), ("Flickr30k", "caption"), ("ImageNet", "substring"),
        ("GQA", "exact"), ("VQAv2", "exact")]
# The file each benchmark's evaluation scripts read; the rest read test.json. CoIN: scripts/LLaVA/Eval/
# *.sh in zackschen/CoIN (its README lists only train and test); CVIT: scripts/LiLoRA/Eval/*.sh.
EVAL_FILES = {"coin": {"TextVQA": "val.json", "VizWiz": "val.json", "VQAv2": "val.json"},
              "cvit": {"TextVQA": "val.json", "Flickr30k": "val.json", "VQAv2": "val.json"}}
# CoIN's instruction sets; its README spells the folders Instruction_*, its scripts Instructions_*.
INSTRUCTIONS = {"original": ("Instructions_Original", "Instruction_Original"),
                "type2": ("Instructions_Type2", "Instruction_Type2")}
# The ten TextVQA answers the official scorer needs, where CoIN and LiLoRA keep them under the image root.
TEXTVQA_ANSWERS = Path("TextVQA") / "TextVQA_0.5.1_val.json"


def require_folder(path, what: str) -> Path:
    """`path` as a Path, refused unless it is a folder; the message says whether it is missing or a file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} is not a folder: {path}" if path.exists() else f"{what} not found: {path}")
    return path


def read_json_list(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def _field(item, key, path: Path, i: int, types=(str,)):
    if not isinstance(item, dict) or key not in item:
        raise ValueError(f"{path}: item {i} has no field {key!r}")
    if not isinstance(item[key], types):
        raise ValueError(f"{path}: item {i} field {key!r} should be {' or '.join(t.__name__ for t in types)}")
    return item[key]


def _image(item, path: Path, i: int, image_root: Path):
    """The item's image path, or None: LLaVA data has text-only items (ScienceQA has many)."""
    return image_root / _field(item, "image", path, i) if isinstance(item, dict) and "image" in item else None


def _strip_image(text: str) -> str:
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()


def _turns(item, path: Path, i: int) -> list[tuple[str, str]]:
    """A LLaVA conversation as (human, gpt) pairs: turns must alternate, human first, and end on gpt."""
    turns = _field(item, "conversations", path, i, (list,))
    roles = [t.get("from") if isinstance(t, dict) else None for t in turns]
    if len(turns) < 2 or len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
        raise ValueError(f"{path}: item {i} field 'conversations' must alternate human and gpt turns, human "
                         f"first, ending on gpt; got roles {roles}")
    for k, t in enumerate(turns):
        if not isinstance(t.get("value"), str):
            raise ValueError(f"{path}: item {i} turn {k} has no text field 'value'")
        if t["from"] == "gpt" and not t["value"].strip():
            raise ValueError(f"{path}: item {i} turn {k} is an empty gpt answer: nothing to learn from")
    return [(_strip_image(turns[k]["value"]), turns[k + 1]["value"]) for k in range(0, len(turns), 2)]


def train_sample(item, path: Path, i: int, task: str, image_root: Path) -> Sample:
    """A LLaVA conversation: every (human, gpt) turn is trained on; the first is the sample's question."""
    (question, answer), *later = _turns(item, path, i)
    return Sample(task, question, answer, None, _image(item, path, i, image_root), id=str(item.get("id", i)),
                  later_turns=tuple(later))


def _train_samples(path: Path, task: str, image_root: Path, cap) -> list[Sample]:
    return [train_sample(item, path, i, task, image_root) for i, item in enumerate(read_json_list(path)[:cap])]


def parse_gold_box(text, path: Path, i: int) -> str:
    """A gold box must be four numbers in [0, 1], comma-separated as CoIN writes them ("[x1, y1,
    x2, y2]", normalised to the padded square), or a JSON list of four numbers; anything else would
    score 0 for every prediction without a word, or fail in the scorer after hours of training."""
    if isinstance(text, list):
        ok = len(text) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in text)
        nums = [float(v) for v in text] if ok else []
        text = "[" + ", ".join(f"{v:g}" for v in nums) + "]"
    else:
        parts = str(text).strip().strip("[]").split(",")
        try:
            nums = [float(v) for v in parts]
        except ValueError:
            nums = []
    if len(nums) != 4 or not all(0 <= v <= 1 for v in nums):
        raise ValueError(f"{path}: item {i} field 'answer_bbox' should be four comma-separated numbers in [0, 1] "
                         f"(normalised [x1, y1, x2, y2]), got {text!r}")
    return text


def test_sample(item, path: Path, i: int, task: str, scorer: str, image_root: Path, answers_by_id=None) -> Sample:
    key = "answer_bbox" if scorer == "box" else "answer"
    answer = _field(item, key, path, i, (str, list))
    if scorer == "box":
        answer = parse_gold_box(answer, path, i)  # a box may be a list of four numbers
    elif not answer or (isinstance(answer, str) and not answer.strip()) or (
            isinstance(answer, list) and not all(isinstance(a, str) and a.strip() for a in answer)):
        raise ValueError(f"{path}: item {i} field {key!r} is empty" if not answer or isinstance(answer, str) else
                         f"{path}: item {i} field {key!r} should be a string or a list of non-empty strings")
    elif scorer == "letter" and parse_option(answer if isinstance(answer, str) else answer[0]) is None:
        raise ValueError(f"{path}: item {i} field 'answer' should name an option letter for the letter scorer, "
                         f"got {answer!r}")
    qid = item.get("question_id", i)
    first = answer if isinstance(answer, str) else answer[0]
    answers = None if isinstance(answer, str) else list(answer)
    if answers_by_id is not None and str(qid) in answers_by_id:
        answers = answers_by_id[str(qid)]  # TextVQA: the ten annotator answers
    size = item.get("size") if scorer == "box" else None
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, (int, float))
                                                                                   and v > 0 for v in size)):
        raise ValueError(f"{path}: item {i} field 'size' should be [width, height], got {size!r}")
    return Sample(task, _strip_image(_field(item, "text", path, i)), first, answers,
                  _image(item, path, i, image_root), id=str(qid), size=size)


def _test_samples(path: Path, task: str, scorer: str, image_root: Path, cap, answers_by_id=None) -> list[Sample]:
    return [test_sample(item, path, i, task, scorer, image_root, answers_by_id)
            for i, item in enumerate(read_json_list(path)[:cap])]


def read_textvqa_answers(path: Path) -> dict:
    data = read_json(path)
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected TextVQA's {{'data': [...]}} layout")
    out = {}
    for n, x in enumerate(items):
        if not isinstance(x, dict) or "question_id" not in x or not isinstance(x.get("answers"), list):
            continue
        if not all(isinstance(a, str) for a in x["answers"]):
            raise ValueError(f"{path}: data item {n} field 'answers' should be a list of strings, got {x['answers']!r}")
        out[str(x["question_id"])] = list(x["answers"])
    return out


def task_folder_root(name: str, data_root: Path, instructions: str = "original") -> Path:
    """Where the task folders are: CoIN's Instructions_<set>/ (either spelling), CVIT's
    Instructions_Single/ (or CoIN-style Instructions_Original/), or the data root itself."""
    if name == "coin":
        for folder in INSTRUCTIONS[instructions]:
            if (data_root / folder).is_dir():
                return data_root / folder
        if instructions != "original":
            raise FileNotFoundError(f"--instructions {instructions}: none of {list(INSTRUCTIONS[instructions])} "
                                    f"is in {data_root}")
    elif instructions != "original":
        raise ValueError(f"--instructions {instructions}: {name} has one instruction set")
    for folder in ("Instructions_Single", *INSTRUCTIONS["original"]):  # CVIT's layout in LiLoRA's scripts
        if (data_root / folder).is_dir():
            return data_root / folder
    return data_root


def task_files(name: str, data_root: Path, image_root: Path, instructions="original", textvqa_answers=None):
    """Per task: (name, scorer, folder, the file its evaluation script reads, TextVQA's answer file)."""
    base = task_folder_root(name, data_root, instructions)
    out = []
    for task, scorer in {"coin": COIN, "cvit": CVIT}[name]:
        folder = base / task
        test_file = folder / EVAL_FILES[name].get(task, "test.json")
        if not test_file.is_file():
            test_file = folder / "test.json"
        ann = None
        if task == "TextVQA":
            ann = Path(textvqa_answers) if textvqa_answers else image_root / TEXTVQA_ANSWERS
            if textvqa_answers and not ann.is_file():
                raise FileNotFoundError(f"--textvqa-answers: missing file: {ann}")
        out.append((task, scorer, folder, test_file, ann))
    return out


def load_benchmark(name: str, data_root, image_root, max_per_task: int | None = None, *, instructions="original",
                   textvqa_answers=None, max_test: int | None = None) -> list[Task]:
    """CoIN or CVIT from `<data_root>/Instructions_<set>/<Task>/train.json` and the file each
    task's evaluation script reads (EVAL_FILES: val.json where the script reads it and the folder
    has it, else test.json), image paths relative to `image_root`. TextVQA's ten answers come
    from `textvqa_answers` or `<image_root>/TextVQA/TextVQA_0.5.1_val.json`; without them the
    official TextVQA score is unavailable. `max_per_task` caps both splits, `max_test` the test
    split alone."""
    order = {"coin": COIN, "cvit": CVIT}[name]
    data_root, image_root = require_folder(data_root, "data root"), require_folder(image_root, "image root")
    tasks = []
    for task, scorer, folder, test_file, ann in task_files(name, data_root, image_root, instructions,
                                                           textvqa_answers):
        if not folder.is_dir():
            raise FileNotFoundError(f"missing task folder: {folder} ({name} needs {[t for t, _ in order]})")
        by_id = read_textvqa_answers(ann) if ann is not None and ann.is_file() else None
        tasks.append(_load_task(task, scorer, task, folder, test_file, image_root, max_per_task,
                                max_test or max_per_task, by_id))
    return tasks


def _load_task(name: str, scorer: str, official, folder: Path, test_file: Path, image_root: Path, cap, test_cap,
               answers_by_id=None) -> Task:
    """One task from `folder/train.json` and `test_file`; an empty split is an error naming its file."""
    t = Task(name, scorer, official, _train_samples(folder / "train.json", name, image_root, cap),
             _test_samples(test_file, name, scorer, image_root, test_cap, answers_by_id), test_file=str(test_file))
    for split, path in (("train", folder / "train.json"), ("test", test_file)):
        if not getattr(t, split):
            raise ValueError(f"{path}: no items")
    return t


SCORER_NAMES = ("letter", "vqa", "substring", "exact", "box", "caption")


def load_custom(task_dir, image_root, max_per_task: int | None = None, *, max_test: int | None = None) -> list[Task]:
    """The user's own tasks in CoIN's file format: `<task_dir>/<Task>/train.json` and `test.json`
    (or `val.json`), in name order unless --task-order says otherwise. `<task_dir>/tasks.json`
    ({"Task": "letter" | "vqa" | "substring" | "exact" | "box" | "caption"}) names every task's
    robust scorer (without the file: "exact" for all); a task named like a CoIN or CVIT task is
    also scored by that task's official rule."""
    image_root = require_folder(image_root, "image root")
    # A task named like a CoIN or CVIT one takes that task's official rule only with that task's scorer:
    # CoIN's Grounding rule reads a box, whatever a custom "Grounding" holds.
    known = dict(COIN + CVIT)
    return [_load_task(task, scorer, task if task in OFFICIAL_RULES and known.get(task) == scorer else None, folder,
                       test_file, image_root, max_per_task, max_test or max_per_task)
            for task, scorer, folder, test_file, _ in custom_task_files(task_dir)]


def custom_task_files(task_dir) -> list[tuple]:
    """Per custom task, as task_files gives them: (name, scorer, folder, test file, None). The names
    in tasks.json and the folders on disk must agree both ways: a typo would score a task by exact
    match without a word."""
    task_dir = require_folder(task_dir, "--task-dir")
    scorers = read_json(task_dir / "tasks.json") if (task_dir / "tasks.json").is_file() else {}
    if not isinstance(scorers, dict) or any(v not in SCORER_NAMES for v in scorers.values()):
        raise ValueError(f"{task_dir / 'tasks.json'}: expected {{task: scorer}} with scorers from {SCORER_NAMES}")
    folders = sorted(p for p in task_dir.iterdir() if (p / "train.json").is_file())
    if not folders:
        raise FileNotFoundError(f"--task-dir {task_dir}: no <Task>/train.json inside")
    strays = sorted(p.name for p in task_dir.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and not (p / "train.json").is_file())
    if strays:  # a folder that looks like a task would be left out without a word
        raise FileNotFoundError(f"--task-dir {task_dir}: {strays} hold no train.json; every folder there is a task")
    odd = [f.name for f in folders if "," in f.name or f.name != f.name.strip()]
    if odd:
        raise ValueError(f"--task-dir {task_dir}: task folder names {odd} contain a comma or surrounding spaces, "
                         "which --task-order cannot name; rename them")
    unknown = sorted(set(scorers) - {f.name for f in folders})
    if unknown:
        raise ValueError(f"{task_dir / 'tasks.json'} names {unknown}, which have no <Task>/train.json in {task_dir}; "
                         f"the task folders are {[f.name for f in folders]}")
    if scorers and len(scorers) != len(folders):
        unnamed = [f.name for f in folders if f.name not in scorers]
        raise ValueError(f"{task_dir / 'tasks.json'} gives no scorer for {unnamed}: name one for every task "
                         f"(from {SCORER_NAMES}), or drop tasks.json to score every task by exact match")
    out = []
    for folder in folders:
        test_file = folder / "test.json" if (folder / "test.json").is_file() else folder / "val.json"
        if not test_file.is_file():
            raise FileNotFoundError(f"{folder}: no test.json (or val.json) beside train.json: a task needs test items")
        out.append((folder.name, scorers.get(folder.name, "exact"), folder, test_file, None))
    return out


def order_tasks(tasks: list[Task], order: str | None) -> list[Task]:
    """--task-order: a comma-separated subset or permutation of the benchmark's task names."""
    if not order:
        return tasks
    by_name = {t.name: t for t in tasks}
    names = [n.strip() for n in order.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"--task-order {order!r}: give distinct names from {list(by_name)}"
                         + (f"; unknown: {unknown}" if unknown else ""))
    return [by_name[n] for n in names]


def missing_images(tasks: list[Task]) -> list[Path]:
    """Every image file the run will read that is not there, or is empty: one stat per file, no
    decoding (--check-data decodes), so a missing image of the last task is found before the
    first one trains."""
    paths = {s.image for t in tasks for s in (*t.train, *t.test) if isinstance(s.image, (str, Path))}
    return sorted(Path(p) for p in paths if not Path(p).is_file() or Path(p).stat().st_size == 0)


# --------------------------------------------------------------------------- collation


class Collator:
    """Samples -> a batch dict: input_ids, attention_mask, pixel_values, instruction_mask (the
    question's tokens, which the task selector reads) and, for training, labels (answers and eos
    only). The backbone's `prompt` (processing.LlavaPrompt, qwen2_vl.Qwen2VLPrompt) says how a sample
    becomes tokens and its image pixels; pixel_values holds the images of the samples that have one,
    in order (None if none has), as the model writes each image's features at its sample's image
    tokens. Right padding for training; left padding and no answer with `prompt_only=True`, the
    prompts `generate` continues."""

    def __init__(self, tokenizer: TextTokenizer, prompt):
        self.tok, self.prompt = tokenizer, prompt

    def encode(self, s: Sample, prompt_only: bool = False, slots: int | None = None):
        """`slots`: its image's tokens; None: as many as the image takes (read from its header)."""
        if slots is None:
            slots = 0 if s.image is None else self.prompt.image_tokens(s.image)
        return self.prompt.encode(self.tok, s, slots, prompt_only)

    def prompt_length(self, s: Sample) -> int:
        """Tokens of the prompt `generate` continues (image tokens included), without decoding its image."""
        return len(self.encode(s, prompt_only=True).ids)

    def prompts(self, samples: list[Sample]) -> dict:
        """The left-padded prompt batch of `samples` (a DataLoader's collate_fn at evaluation)."""
        return self(samples, prompt_only=True)

    def __call__(self, samples: list[Sample], prompt_only: bool = False) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        pixels = [None if s.image is None else self.prompt.image(s.image) for s in samples]
        rows = [self.encode(s, prompt_only, 0 if p is None else self.prompt.slots(p)) for s, p in zip(samples, pixels)]
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
        images = [p for p in pixels if p is not None]  # text-only samples have none
        batch = {"input_ids": ids, "attention_mask": mask, "instruction_mask": instruction,
                 "pixel_values": self.prompt.images(images) if images else None}
        if not prompt_only:
            batch["labels"] = labels
        return batch
