"""Robust scorers on hand-made cases, the PTB caption tokenizer and CIDEr against pycocoevalcap,
continual metrics by hand."""

import shutil

import pytest

from minimcit.metrics import (box_iou, caption_tokens, cider, continual_summary, exact_match, grounding_accuracy,
                              normalize_answer, option_accuracy, parse_box, parse_option, ptb_tokens,
                              substring_match, vqa_accuracy)


# The EvalAI answer normaliser, worked by hand: word_tokenize (drop ',' and '?', split "'s"), then
# punctuation (deleted next to a space, else a space), periods not before a digit, number words,
# articles, contractions; casefold for lower.
@pytest.mark.parametrize("text,want", [
    ("  Two Dogs. ", "2 dogs"), ("the cat", "cat"), ("An apple!", "apple"), ("don't", "don't"),
    ("dont", "don't"), ("3.5", "3.5"), ("1,000", "1000"), ("yes.", "yes"), ("red/blue", "red blue"),
    ("", ""), ("NONE", "0"), ("o’clock", "o’clock"), ("it's", "it 's"), ("STRASSE", "strasse"),
    ("Straße", "strasse"), ("new - york", "new york"), ("5:30", "5:30"), ("what?", "what")])
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


def test_substring_match_either_way_by_whole_words():
    assert substring_match("a golden retriever dog", "golden retriever") == 1.0
    assert substring_match("retriever", "golden retriever") == 1.0
    assert substring_match("Golden Retriever.", "golden retriever") == 1.0
    assert substring_match("cat", "golden retriever") == 0.0
    assert substring_match("", "cat") == 0.0  # officially a hit
    assert substring_match("b", "bird") == 0.0  # officially a hit
    assert substring_match("dog", "hotdog") == 0.0  # officially a hit, mid-word


@pytest.mark.parametrize("pred,letter", [("B", "B"), ("B.", "B"), ("(B)", "B"), ("B) a cat", "B"),
                                         ("The answer is C.", "C"), ("b", "B"), ("(c)", "C"), ("Answer: B", "B"),
                                         ("answer is (d)", "D"), ("", None), ("Both", None), ("a cat", None),
                                         ("I think so", None)])
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


# Awkward captions and the tokens Stanford's PTBTokenizer (-preserveLines -lowerCase) gives them
# after pycocoevalcap drops its punctuation list, written out by hand from the PTB rules.
AWKWARD = {
    "A man's dog isn't running.": "a man 's dog is n't running",
    "Two dogs' toys (red) on the well-known 3.5-inch mat...": "two dogs toys -lrb- red -rrb- on the well-known "
                                                              "3.5-inch mat",
    "They can't, won't, and don't go!": "they ca n't wo n't and do n't go",
    'A "quoted" word; and: colons -- dashes - here': "a quoted word and colons dashes here",
    "It's 5:30 p.m. and $5.00 costs 50% more": "it 's 5:30 p.m. and $ 5.00 costs 50 % more",
    "I'm sure you'll say we'd they've gonna cannot": "i 'm sure you 'll say we 'd they 've gon na can not",
    "A man in a hat/cap at the U.S. border.": "a man in a hat/cap at the u.s. border",
    "The cat's 2nd toy, 1,000 pieces & more #1 @home": "the cat 's 2nd toy 1,000 pieces & more # 1 @home",
    "'Single quotes' and `ticks` here": "single quotes and ticks here",
    "e-mail x-ray 10-year-old dog.": "e-mail x-ray 10-year-old dog",
    "Mr. Smith's car was Dr. Who's.": "mr. smith 's car was dr. who 's",
    "O'Neil's hat": "o'neil 's hat",
    "A {curly} [square] <angle> test.": "a -lcb- curly -rcb- -lsb- square -rsb- <angle> test",
    "Wow!! Really?? Yes...": "wow !! really ?? yes",
    "dogs', cats'": "dogs cats",
    "3/4 of the cake": "3/4 of the cake",
    "a man ... walking": "a man walking",
    "'tis the season": "'t is the season",
}


@pytest.mark.parametrize("caption", sorted(AWKWARD))
def test_caption_tokens_follow_the_ptb_rules(caption):
    assert caption_tokens(caption) == AWKWARD[caption]
    assert ptb_tokens(caption) == AWKWARD[caption].split()


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java")
def test_caption_tokens_equal_pycocoevalcaps_ptb_tokenizer():
    PTBTokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer").PTBTokenizer
    caps = sorted(AWKWARD)
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    assert [caption_tokens(c) for c in caps] == [theirs[i][0] for i in range(len(caps))]


def test_cider_on_raw_captions_equals_pycocoevalcap():
    """Raw captions through our tokenizer and our CIDEr-D against pycocoevalcap's Cider on the
    hand-written PTB tokens of the same captions."""
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    caps = sorted(AWKWARD)
    preds, refs = caps[:6], [caps[6:10], caps[10:13], caps[13:16], caps[16:] + caps[:1], caps[2:5], caps[7:9]]
    want_mean, want = Cider().compute_score({i: [AWKWARD[r] for r in rs] for i, rs in enumerate(refs)},
                                            {i: [AWKWARD[p]] for i, p in enumerate(preds)})
    got = cider([caption_tokens(p) for p in preds], [[caption_tokens(r) for r in rs] for rs in refs])
    assert got == pytest.approx(list(want), abs=1e-9)
    assert sum(got) / len(got) == pytest.approx(want_mean)


def test_continual_metrics_by_hand():
    # rows: base, after task 1, 2, 3; columns: tasks 1..3. Every AP_k differs, so MAP is not AP.
    a = [[10, 20, 30],
         [60, 25, 35],
         [50, 80, 40],
         [40, 60, 90]]
    s = continual_summary(a)
    assert s["AP_k"] == pytest.approx([60, 65, 190 / 3])  # LiLoRA Eq. 9: mean of row k over tasks <= k
    assert s["MAP_k"] == pytest.approx([60, 62.5, (60 + 65 + 190 / 3) / 3])  # LiLoRA Eq. 9
    assert s["AP"] == s["ACC"] == pytest.approx(190 / 3)
    assert s["MAP"] == pytest.approx(565 / 9)
    assert s["BWT"] == pytest.approx(((40 - 60) + (60 - 80)) / 2)  # LiLoRA Eq. 10: a[T][j] - a[j][j], j < T
    assert s["MFT"] == pytest.approx((60 + 80 + 90) / 3)
    assert s["FWT"] == pytest.approx(((25 - 20) + (40 - 30)) / 2)  # a[j-1][j] - a[0][j], j > 1
    f = [[0, 0, 0], [90, 10, 10], [80, 100, 0], [70, 90, 100]]
    s = continual_summary(a, f)
    assert s["MIF_k"] == pytest.approx([90, 90, (70 + 90 + 100) / 3])  # LiLoRA Eq. 11
    assert s["MIF"] == pytest.approx(260 / 3)
    with pytest.raises(ValueError, match="row 0"):
        continual_summary([[1, 2], [3, 4]])
