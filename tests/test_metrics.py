"""Scorers on hand-made cases, CIDEr against pycocoevalcap, continual metrics by hand."""

import math

import pytest

from minimcit.metrics import (box_iou, caption_tokens, cider, continual_summary, exact_match, format_ok,
                              grounding_accuracy, normalize_answer, option_accuracy, parse_box, parse_option,
                              score_task, substring_match, vqa_accuracy)


@pytest.mark.parametrize("text,want", [
    ("  Two Dogs. ", "2 dogs"), ("the cat", "cat"), ("An apple!", "apple"), ("don't", "dont"),
    ("dont", "dont"), ("3.5", "3.5"), ("1,000", "1000"), ("yes.", "yes"), ("red/blue", "red blue"),
    ("", ""), ("NONE", "0"), ("o’clock", "oclock")])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_edge_cases():
    assert exact_match("Two", "2") == 1.0
    assert exact_match("  YES  ", "yes") == 1.0
    assert exact_match("", "yes") == 0.0
    assert exact_match("a red car", "red car") == 1.0
    assert exact_match("red", "blue") == 0.0


def test_vqa_soft_accuracy_by_hand():
    answers = ["cat"] * 2 + ["dog"] * 8
    # "cat" matches 2 of 10. Leaving out a "cat": 1 match (1/3); leaving out a "dog": 2 matches (2/3).
    assert vqa_accuracy("cat", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("dog", answers) == 1.0  # 7 or 8 matches -> min(., 1)
    assert vqa_accuracy("Dog.", answers) == 1.0
    assert vqa_accuracy("bird", answers) == 0.0
    three = ["cat"] * 3 + ["dog"] * 7  # leave a cat out: 2/3; leave a dog out: 3/3
    assert vqa_accuracy("cat", three) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert vqa_accuracy("two", ["2"]) == 1.0  # a single answer is exact match
    assert vqa_accuracy("two", "2") == 1.0


def test_substring_match_either_way():
    assert substring_match("a golden retriever dog", "golden retriever") == 1.0
    assert substring_match("retriever", "golden retriever") == 1.0
    assert substring_match("cat", "golden retriever") == 0.0
    assert substring_match("", "cat") == 0.0


@pytest.mark.parametrize("pred,letter", [("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) a cat", "B"),
                                         ("The answer is C.", "C"), ("b", None), ("", None), ("Both", None)])
def test_parse_option(pred, letter):
    assert parse_option(pred) == letter


def test_option_accuracy():
    assert option_accuracy(" A ", "A") == 1.0
    assert option_accuracy("(D)", "D") == 1.0
    assert option_accuracy("C", "A") == 0.0
    assert option_accuracy("", "A") == 0.0


def test_boxes_parsing_order_and_range():
    assert parse_box("[0.1, 0.2, 0.5, 0.6]") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box("[0.5, 0.6, 0.1, 0.2]") == (0.1, 0.2, 0.5, 0.6)  # corners swapped
    assert parse_box("box: (0.1,0.2) to (0.5,0.6)") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box("[-0.2, 0.2, 1.4, 0.6]") == (0.0, 0.2, 1.0, 0.6)  # clipped to the image
    assert parse_box("[0.1, 0.2, 0.5]") is None
    assert parse_box("no idea") is None
    assert parse_box([0.1, 0.2, 0.5, 0.6]) == (0.1, 0.2, 0.5, 0.6)


def test_box_iou_by_hand():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_grounding_accuracy_threshold_and_garbage():
    gt = "[0.00, 0.00, 0.50, 0.50]"
    assert grounding_accuracy("[0.0, 0.0, 0.5, 0.4]", gt) == 1.0  # IoU 0.8
    assert grounding_accuracy("[0.0, 0.0, 0.5, 0.25]", gt) == 0.0  # IoU exactly 0.5 is not > 0.5
    assert grounding_accuracy("[0.5, 0.5, 0.0, 0.0]", gt) == 1.0  # swapped corners
    assert grounding_accuracy("the dog", gt) == 0.0
    assert grounding_accuracy("", gt) == 0.0


def test_cider_equals_pycocoevalcap():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    refs = [["a red circle on a grey background", "there is a red circle", "a picture of a red circle"],
            ["two blue squares and a star", "a star and two squares", "blue squares with a yellow star"],
            ["a green triangle", "the triangle is green", "one green triangle in the image"],
            ["an orange cross next to a circle", "a cross and a circle", "orange cross and purple circle"]]
    preds = ["a red circle", "two squares and a star", "a purple square", "an orange cross and a circle"]
    want_mean, want = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)})
    got = cider(preds, refs)
    assert got == pytest.approx(list(want), abs=1e-6)
    assert sum(got) / len(got) == pytest.approx(want_mean, abs=1e-6)


def test_caption_tokens():
    assert caption_tokens("A Red circle, on grey.") == "a red circle on grey"


def test_format_checks():
    assert format_ok("letter", "B", "B") and not format_ok("letter", "B.", "B") and not format_ok("letter", "AB", "A")
    assert format_ok("exact", "red", "blue") and format_ok("exact", "light red", "blue")
    assert not format_ok("exact", "it is red", "blue") and format_ok("exact", "the big red car", "big red car")
    assert format_ok("caption", "A red circle on grey.", ["x"]) and not format_ok("caption", "A red circle.", ["x"])
    assert not format_ok("caption", "A red circle on grey", ["x"])
    assert format_ok("box", "[0.1, 0.2, 0.3, 0.4]", "") and not format_ok("box", "left", "")


def test_score_task_percentages():
    score, fmt = score_task("exact", ["red", "blue", "it is green"], ["red", "red", "green"])
    assert score == pytest.approx(100 / 3) and fmt == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score_task("exact", ["a", "b"], ["a"])


def test_continual_metrics_by_hand():
    # rows: base, after task 1, 2, 3; columns: tasks 1..3
    a = [[10, 20, 30],
         [60, 25, 35],
         [50, 70, 40],
         [40, 60, 80]]
    s = continual_summary(a)
    ap = [60, (50 + 70) / 2, (40 + 60 + 80) / 3]  # Eq. 9
    assert s["AP_k"] == pytest.approx(ap)
    assert s["MAP_k"] == pytest.approx([ap[0], (ap[0] + ap[1]) / 2, sum(ap) / 3])  # Eq. 9
    assert s["AP"] == s["ACC"] == pytest.approx(60)
    assert s["MAP"] == pytest.approx((60 + 60 + 60) / 3)
    assert s["BWT"] == pytest.approx(((40 - 60) + (60 - 70)) / 2)  # Eq. 10: a[T][j] - a[j][j], j < T
    assert s["MFT"] == pytest.approx((60 + 70 + 80) / 3)
    assert s["FWT"] == pytest.approx(((25 - 20) + (40 - 30)) / 2)  # a[j-1][j] - a[0][j], j > 1
    f = [[0, 0, 0], [90, 10, 10], [80, 100, 0], [70, 90, 100]]
    s = continual_summary(a, f)
    assert s["MIF_k"] == pytest.approx([90, 90, (70 + 90 + 100) / 3])  # Eq. 11
    assert s["MIF"] == pytest.approx(260 / 3)
    with pytest.raises(ValueError, match="row 0"):
        continual_summary([[1, 2], [3, 4]])
