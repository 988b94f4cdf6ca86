"""MiniCoIN's guarantees, the real CoIN/CVIT loaders on a fixture in the exact format, collation."""

import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from minimcit.data import (COIN, CVIT, GRID, Collator, Sample, _cells, caption_corpus, generate, load_benchmark,
                           minicoin)
from minimcit.metrics import SCORERS, box_iou, format_ok, score_task
from minimcit.processing import TextTokenizer


def fingerprint(samples):
    return [(s.question, s.answer, s.image.tobytes()) for s in samples]


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (minicoin("minicoin", "smoke", seed) for seed in (0, 0, 1))
    for ta, tb, tc in zip(a, b, c):
        assert fingerprint(ta.train + ta.test) == fingerprint(tb.train + tb.test)
        assert fingerprint(ta.train) != fingerprint(tc.train)


def test_no_test_item_appears_in_train():
    for task in minicoin("minicoin", "default", 0, n_train=300, n_test=100) + minicoin("minicvit", "smoke", 0):
        train = {(s.question, s.image.tobytes()) for s in task.train}
        assert not any((s.question, s.image.tobytes()) in train for s in task.test), task.name


def test_answers_fit_their_scorer_and_format():
    for task in minicoin("minicoin", "smoke", 3) + minicoin("minicvit", "smoke", 3):
        for s in task.train + task.test:
            assert format_ok(task.kind, s.answer, s.target), (task.name, s.answer)
            if task.kind != "caption":
                assert SCORERS[task.kind](s.answer, s.target) == 1.0, (task.name, s.answer)
        if task.kind == "caption":
            assert all(len(s.answers) == 5 for s in task.test)
        assert len({s.answer for s in task.train}) > 1, task.name


def test_every_task_needs_the_image():
    """A text-only baseline: the most common training answer for the same question text (the
    task's most common answer for unseen questions). Far from solving any task."""
    for task in minicoin("minicoin", "default", 0, n_train=400, n_test=200):
        by_question = defaultdict(Counter)
        for s in task.train:
            by_question[s.question][s.answer] += 1
        overall = Counter(s.answer for s in task.train).most_common(1)[0][0]
        guesses = [by_question[s.question].most_common(1)[0][0] if s.question in by_question else overall
                   for s in task.test]
        score, _ = score_task(task.kind, guesses, [s.target for s in task.test])
        assert score <= 45, f"{task.name}: text-only baseline scores {score:.1f}"


def test_objects_sit_in_distinct_grid_cells_and_the_cell_passes_grounding():
    """The grid world's promise (data._cells): every block lies inside its own cells, blocks never
    share a cell, and the block's own box has IoU >= 0.5 with the object (0.75^2 = 0.5625 at the
    smallest side), so a model that names the right cells scores on Grounding."""
    rng = np.random.default_rng(0)
    for size, n, span in [(64, 4, 1), (64, 16, 1), (64, 2, 2), (224, 3, 1), (32, 1, 2)]:
        cell = size / GRID
        boxes = _cells(rng, size, n, span=span)
        taken = set()
        for x1, y1, x2, y2 in boxes:
            i, j = int(y1 // cell), int(x1 // cell)
            assert x2 <= (j + span) * cell + 1e-9 and y2 <= (i + span) * cell + 1e-9  # inside its block
            block = {(i + a, j + b) for a in range(span) for b in range(span)}
            assert not block & taken
            taken |= block
            cell_box = (j * cell, i * cell, (j + span) * cell, (i + span) * cell)
            assert box_iou(list(cell_box), [x1, y1, x2, y2]) >= 0.5
    with pytest.raises(ValueError, match="do not fit"):
        _cells(rng, 64, 5, span=2)
    for s in minicoin("minicoin", "default", 0, n_train=50, n_test=1)[5].train:  # grounding answers
        x1, y1, x2, y2 = (float(v) for v in s.answer.strip("[]").split(", "))
        j, i = int(x1 * GRID + 1e-6), int(y1 * GRID + 1e-6)
        assert box_iou([j / GRID, i / GRID, (j + 1) / GRID, (i + 1) / GRID], [x1, y1, x2, y2]) > 0.5


def test_presets_and_errors():
    tasks = minicoin("minicvit", "smoke", 0)
    assert [t.name for t in tasks] == ["sciqa", "textvqa", "caption", "imagenet", "gqa", "vqav2"]
    assert tasks[0].train[0].image.size == (32, 32) and len(tasks[0].train) == 12 and len(tasks[0].test) == 6
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        minicoin("minicoin", "huge")
    corpus = caption_corpus(27, 32, 0)
    assert len(corpus) == 27 and all(s.answer.endswith(".") for s in corpus)
    assert not any(re.search(r"\b[Aa] [aeiou]", s.answer) for s in corpus)  # "an orange", never "a orange"
    kinds = Counter(s.answer.split()[-1] for s in corpus)
    assert len(kinds) > 5  # descriptions of every generator's scenes, not one template


# --------------------------------------------------------------------------- real formats


def write_fixture(root, order=COIN, n=3):
    """A handful of items per task in CoIN's exact files, with images written here."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for task, kind in order:
        folder = root / "data" / "Instructions_Original" / task
        folder.mkdir(parents=True)
        train, test = [], []
        for i in range(n):
            name = f"{task}/{i}.jpg"
            (images / task).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(images / name)
            train.append({"id": f"{task}-{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\nWhat is in picture {i}?\nAnswer the question using a single word or phrase."},
                {"from": "gpt", "value": f"thing {i}"}]})
            item = {"question_id": i, "image": name, "text": f"What is in picture {i}?", "answer": f"thing {i}"}
            if kind == "box":
                item.update(answer_bbox="[0.1, 0.2, 0.5, 0.6]", size=[30, 20 + i])
            if kind == "caption":
                item["answer"] = [f"a picture of thing {i}.", f"thing {i} in a photo."]
            test.append(item)
        (folder / "train.json").write_text(json.dumps(train))
        (folder / "test.json").write_text(json.dumps(test))
    return root / "data", images


def test_coin_loader_reads_the_fixture(tmp_path):
    data, images = write_fixture(tmp_path)
    tasks = load_benchmark("coin", data, images)
    assert [t.name for t in tasks] == [name for name, _ in COIN]
    sqa = tasks[0]
    assert sqa.kind == "letter" and len(sqa.train) == 3 and len(sqa.test) == 3
    assert sqa.train[1].question == "What is in picture 1?\nAnswer the question using a single word or phrase."
    assert sqa.train[1].answer == "thing 1" and sqa.train[1].image == images / "ScienceQA/1.jpg"
    grounding = tasks[5]
    assert grounding.kind == "box" and grounding.test[0].answer == "[0.1, 0.2, 0.5, 0.6]"
    assert load_benchmark("coin", data, images, max_per_task=2)[3].train[-1].id == "GQA-1"


def test_cvit_loader_keeps_caption_references(tmp_path):
    data, images = write_fixture(tmp_path, order=CVIT)
    tasks = load_benchmark("cvit", data, images)
    flickr = tasks[2]
    assert flickr.name == "Flickr30k" and flickr.kind == "caption"
    assert flickr.test[0].target == ["a picture of thing 0.", "thing 0 in a photo."]


def test_loader_errors_name_the_file_folder_and_field(tmp_path):
    data, images = write_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="image root not found: .*nope"):
        load_benchmark("coin", data, tmp_path / "nope")
    gqa = data / "Instructions_Original" / "GQA"
    items = json.loads((gqa / "test.json").read_text())
    del items[1]["answer"]
    (gqa / "test.json").write_text(json.dumps(items))
    with pytest.raises(ValueError, match=r"GQA/test\.json: item 1 has no field 'answer'"):
        load_benchmark("coin", data, images)
    (gqa / "test.json").write_text("[{oops")
    with pytest.raises(ValueError, match=r"GQA/test\.json: not valid JSON"):
        load_benchmark("coin", data, images)
    (gqa / "test.json").write_text("[]")
    with pytest.raises(ValueError, match=r"GQA/test\.json: no items"):
        load_benchmark("coin", data, images)
    (gqa / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file: .*GQA/test\.json"):
        load_benchmark("coin", data, images)
    import shutil

    shutil.rmtree(gqa)
    with pytest.raises(FileNotFoundError, match="missing task folder: .*GQA"):
        load_benchmark("coin", data, images)


# --------------------------------------------------------------------------- collation


@pytest.fixture
def collator(tmp_path):
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "red", "blue", "what", "?", "ASSISTANT", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.save(str(tmp_path / "tokenizer.json"))
    return Collator(TextTokenizer(tmp_path), num_image_tokens=4, image_token_index=-200, image_size=28)


def test_collator_pads_right_for_training_left_for_generation(collator):
    img = Image.new("RGB", (40, 20), "red")
    samples = [Sample("t", "what ?", "red", image=img), Sample("t", "what red blue ?", "blue red", image=img)]
    b = collator(samples)
    assert b["pixel_values"].shape == (2, 3, 28, 28)
    assert (b["input_ids"] == -200).sum(1).tolist() == [4, 4]
    assert b["attention_mask"][0, -1] == 0 and b["attention_mask"][1, -1] == 1  # right padding
    lengths = b["attention_mask"].sum(1)
    assert b["labels"][0, lengths[0] - 2:lengths[0]].tolist() == [4, 2]  # "red" </s>
    assert (b["labels"][0, lengths[0]:] == -100).all() and (b["labels"] != -100).sum() == 2 + 3
    g = collator(samples, generate=True)
    assert "labels" not in g and g["attention_mask"][0, 0] == 0 and (g["attention_mask"][:, -1] == 1).all()
    assert g["input_ids"][0, -2:].tolist() == [8, 9]  # prompts end at "ASSISTANT :"


def test_collator_names_unreadable_images(collator, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        collator([Sample("t", "what ?", "red", image=bad)])
    with pytest.raises(ValueError, match="missing.jpg"):
        collator([Sample("t", "what ?", "red", image=tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


def test_plain_collation_for_stage1(collator):
    collator.plain = True
    img = Image.new("RGB", (28, 28), "blue")
    b = collator([Sample("t", "ignored ?", "red", image=img), Sample("t", "x", "red blue", image=img)])
    assert b["input_ids"][1].tolist() == [1, -200, -200, -200, -200, 4, 5, 2]
    assert b["labels"][1].tolist() == [-100] * 5 + [4, 5, 2]
    g = collator([Sample("t", "q", "red", image=img)], generate=True)
    assert g["input_ids"][0].tolist() == [1, -200, -200, -200, -200]  # generation starts right after the image
