"""MiniCoIN's guarantees: determinism, disjoint splits, answers that fit their scorers, tasks
that need the image, the grid world, and one preset table."""

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from minimcit.metrics import SCORERS, box_iou
from minimcit.official import mif_format, percent, score_items
from minimcit.minicoin import GENERATORS, GRID, PRESETS, Drawn, _cells, caption_corpus, minicoin


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
            assert mif_format(task.scorer, s.answer, s.answer, refs=s.answers), (task.name, s.answer)
            if task.scorer != "caption":
                assert SCORERS[task.scorer](s.answer, s.target) == 1.0, (task.name, s.answer)
        if task.scorer == "caption":
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
        score = percent(score_items(task.scorer, task.official, guesses, [s.target for s in task.test])["robust"])
        assert score <= 45, f"{task.name}: text-only baseline scores {score:.1f}"


def test_objects_sit_in_distinct_grid_cells_and_the_cell_passes_grounding():
    """The grid world's promise (minicoin._cells): every block lies inside its own cells, blocks never
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




def test_one_preset_table_holds_every_size():
    """The images a preset draws are the size its base model's vision tower reads: one number."""
    for name, p in PRESETS.items():
        task = minicoin("minicoin", name, 0, n_train=1, n_test=1)[0]
        assert task.train[0].image.size == (p.image_size, p.image_size) == (p.vision["image_size"],) * 2
        assert p.image_size % p.vision["patch_size"] == 0
        assert {"epochs", "batch_size", "lr"} <= set(p.recipe) and set(p.adapter) == {"r", "lora_alpha"}
        assert p.base_spec()["corpus"] == p.stage1["corpus"] and p.base_spec()["vision"] is p.vision


def test_generators_return_named_fields():
    rng = np.random.default_rng(0)
    for name, gen in GENERATORS.items():
        d = gen(rng, 32)
        assert isinstance(d, Drawn) and d.image.size == (32, 32), name
        assert d.question and d.answer and d.caption.endswith("."), name


def test_gqa_asks_about_the_half_it_names_and_the_caption_binds_each_side():
    """GQA's answer is the object in the named half (read off the pixels: an object's fill colour
    lies only in its own half), and the stage-1 caption names each half's object right after
    the side, sides in either order (minicoin._two_stacked)."""
    from minimcit.minicoin import COLOURS, SIDES, gen_gqa

    rng, orders = np.random.default_rng(5), Counter()
    for _ in range(200):
        d = gen_gqa(rng, 64)
        px = np.asarray(d.image)
        halves = [px[:32], px[32:]]
        found = [{c for c, rgb in COLOURS.items() if (h == rgb).all(-1).sum() >= 6} for h in halves]
        assert all(len(f) == 1 for f in found), found  # one object in each half
        side = [i for i, s in enumerate(SIDES) if s in d.question]
        assert len(side) == 1
        (colour,), (other,) = found[side[0]], found[1 - side[0]]
        named = dict(re.findall(r"(at the (?:top|bottom)) an? (\w+ \w+)", d.caption.lower()))
        assert set(named) == set(SIDES) and named[SIDES[side[0]]].split()[0] == colour, d.caption
        assert named[SIDES[1 - side[0]]].split()[0] == other
        if "color" in d.question:
            assert d.answer == colour
        else:
            assert d.answer == named[SIDES[side[0]]].split()[1]
        orders[d.caption.lower().startswith(SIDES[0])] += 1
    assert min(orders.values()) > 60  # both orders, so the side, not the position in the caption, names the object
