"""The data checker: `run.py --tasks coin --check-data --data-root D --image-root I` (or
`--tasks custom --task-dir T --image-root I`).

Reads every file a CoIN, CVIT or custom run would read, item by item, through the loaders' own
checks, and counts what would stop or silently spoil a run: JSON that does not parse, items the
loader refuses (conversations that do not alternate human/gpt, missing fields, empty answers,
gold boxes that are not four normalised numbers), splits with no usable item, images that are
missing or do not decode to the end, and duplicate ids. No model, no training; unlike the
loader it does not stop at the first fault.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from .data import (custom_task_files, read_json_list, read_textvqa_answers, require_folder, task_files, test_sample,
                   train_sample)
from .metrics import tasks_answered_per_stage

COLUMNS = ["items", "text-only", "bad items", "missing images", "unreadable images", "duplicate ids"]


def _image_fault(path: Path, seen: dict) -> str | None:
    """'missing', 'unreadable' or None; each file is decoded once however many items share it, to
    the end (a truncated JPEG has a good header)."""
    if path not in seen:
        if not path.is_file():
            seen[path] = "missing"
        else:
            try:
                with Image.open(path) as img:
                    img.convert("RGB").load()
                seen[path] = None
            except Exception:  # noqa: BLE001 - pillow raises many kinds for a broken file
                seen[path] = "unreadable"
    return seen[path]


def check_file(path: Path, make, split: str) -> tuple[dict, list[str]]:
    """Counts of COLUMNS for one file, and the first few faults in words."""
    counts, faults, images = Counter(), [], {}
    try:
        items = read_json_list(path)
    except (FileNotFoundError, ValueError) as e:
        return {"items": 0, "bad items": 1}, [str(e)]
    ids = Counter()
    for i, item in enumerate(items):
        counts["items"] += 1
        try:
            sample = make(item, i)
        except ValueError as e:
            counts["bad items"] += 1
            faults.append(str(e))
            continue
        ids[sample.id] += 1
        if sample.image is None:
            counts["text-only"] += 1
            continue
        fault = _image_fault(Path(sample.image), images)
        if fault:
            counts[f"{fault} images"] += 1
            faults.append(f"{path}: item {i} image {sample.image} is {fault}")
    dups = {k: n for k, n in ids.items() if n > 1}
    counts["duplicate ids"] = sum(n - 1 for n in dups.values())
    faults += [f"{path}: {split} id {k!r} appears {n} times" for k, n in list(dups.items())[:5]]
    if counts["items"] == counts["bad items"]:  # the loader refuses a split with nothing in it
        faults.append(f"{path}: no items" if not counts["items"] else f"{path}: no item the loader accepts")
    return {c: counts[c] for c in COLUMNS}, faults


def check_benchmark(name: str, data_root, image_root, instructions: str = "original",
                    textvqa_answers=None, task_dir=None) -> tuple[str, list[str], list[str]]:
    """(table, faults, notes) for every task and split of `name` (coin, cvit, or custom from
    `task_dir`); faults make the check fail, notes (e.g. official TextVQA unavailable) do not."""
    if name != "custom":
        data_root = require_folder(data_root, "data root")
    image_root = require_folder(image_root, "image root")
    rows, faults, notes = [], [], []
    files = custom_task_files(task_dir) if name == "custom" else task_files(name, data_root, image_root,
                                                                             instructions, textvqa_answers)
    for task, scorer, folder, test_file, ann in files:
        by_id = None
        if ann is not None:
            if ann.is_file():
                try:
                    by_id = read_textvqa_answers(ann)
                except ValueError as e:
                    faults.append(str(e))
            else:
                notes.append(f"{ann} not found: the official TextVQA score will be unavailable")
        train = check_file(folder / "train.json", lambda item, i: train_sample(item, folder / "train.json", i,
                                                                                task, image_root), "train")
        test = check_file(test_file, lambda item, i: test_sample(item, test_file, i, task, scorer, image_root,
                                                                  by_id), "test")
        for split, file, (counts, found) in (("train", folder / "train.json", train), ("test", test_file, test)):
            rows.append((task, split, file.name, counts))
            faults += found
    sizes = [c["items"] - c["bad items"] for _, split, _, c in rows if split == "test"]
    upto = tasks_answered_per_stage([[t] for t in range(len(sizes))], len(sizes))
    notes.append(f"test sets {' '.join(map(str, sizes))}: the protocol answers {sum(sum(sizes[:u]) for u in upto)} "
                 f"items over {sum(upto)} task evaluations; its time at 7B on one H100: python benchmarks/bench_7b.py "
                 f"--eval-time --sizes {' '.join(map(str, sizes))}")
    width = max(len(r[0]) for r in rows) + 2
    head = "task".ljust(width) + "split  file        " + "".join(c.rjust(len(c) + 2) for c in COLUMNS)
    lines = [head] + [t.ljust(width) + s.ljust(7) + f.ljust(12) + "".join(str(c.get(k, 0)).rjust(len(k) + 2)
                                                                         for k in COLUMNS) for t, s, f, c in rows]
    return "\n".join(lines), faults, notes
