"""The official protocol against scores worked out by hand from the benchmarks' own scripts.

Every expected value below was derived by reading the named script's rule and applying it to
the case with pencil and paper, not by running our code. Each case names the rule it exercises.
CoIN: zackschen/CoIN ETrain/Eval/LLaVA/CoIN/; CVIT: chanceche/LiLoRA llava/eval/LiLoRA/Eval/.
"""

import pytest

from minimcit import official

# ScienceQA, eval_science_qa.py: exact letter A-E, else "X. " prefix, else the first one-character
# word upper-cased, else FAILED; right when it equals the gold letter.
SCIENCEQA = [
    ("B", "B", 1, "exact letter"),
    ("A", "B", 0, "exact letter, wrong"),
    ("B. cat", "B", 1, "'X. ' prefix"),
    ("B.", "B", 1, "too short for the prefix rule; 'B' is a one-character word"),
    ("b", "B", 1, "one-character word upper-cased"),
    ("Answer: B", "B", 1, "first one-character word"),
    ("The answer is B", "B", 1, "first one-character word"),
    ("a cat", "A", 1, "the article 'a' read as the letter A"),
    ("a cat", "B", 0, "the article 'a' read as the letter A"),
    ("(B)", "B", 1, "'(' is no option; B is a one-character word"),
    ("F", "B", 0, "F is outside A-E"),
    ("", "B", 0, "nothing found: FAILED"),
    ("BC", "B", 0, "no one-character word: FAILED"),
    ("B) dog", "B", 1, "') ' is not '. '; B is a one-character word"),
    ("I think C", "C", 0, "the pronoun 'I' comes first"),
    ("1", "B", 0, "a digit is a one-character word, no option"),
    ("E", "E", 1, "exact letter E"),
    ("C. The answer", "C", 1, "'X. ' prefix"),
    ("c.", "C", 1, "one-character word upper-cased"),
    ("D is correct", "D", 1, "first one-character word"),
    ("Option A", "A", 1, "first one-character word"),
    ("x", "B", 0, "one-character word X, no option"),
    ("A.", "A", 1, "one-character word"),
    ("E. none", "E", 1, "'X. ' prefix"),
    ("e", "E", 1, "one-character word upper-cased"),
    ("The answer is (C).", "C", 1, "first one-character word"),
    ("Answer:C", "C", 1, "':' is a word boundary"),
    ("A B", "B", 0, "the first one-character word wins"),
    ("ABCDE", "A", 0, "no one-character word: FAILED"),
    ("B.C.", "B", 1, "first one-character word"),
]

# TextVQA, eval_textvqa.py + m4c_evaluator: EvalAI processing of both sides, then for the processed
# prediction the mean over the ten leave-one-out subsets of min(1, matches / 3).
CAFE = ["cafe"] * 2 + ["coffee"] * 8
YES_NO_5 = ["yes"] * 5 + ["no"] * 5
YES_2 = ["yes"] * 2 + ["no"] * 8
YES_1 = ["yes"] + ["no"] * 9
TEXTVQA = [
    ("stop", ["stop"] * 10, 1.0, "all ten agree"),
    ("STOP", ["stop"] * 10, 1.0, "lower-cased"),
    ("Stop.", ["stop"] * 10, 1.0, "a period not before a digit is stripped"),
    ("stop sign", ["stop"] * 10, 0.0, "no partial credit"),
    ("cafe", CAFE, 0.6, "(2 x 1/3 + 8 x 2/3) / 10"),
    ("coffee", CAFE, 1.0, "7 or 8 matches: min(1, .)"),
    ("1", ["one"] * 3 + ["1"] * 7, 1.0, "number words become digits"),
    ("one", ["one"] * 3 + ["1"] * 7, 1.0, "number words become digits"),
    ("Bank", ["the bank"] * 4 + ["bank"] * 6, 1.0, "articles dropped"),
    ("dont walk", ["don't walk"] * 10, 1.0, "'dont' becomes \"don't\""),
    ("3.5", ["3.5"] * 5 + ["35"] * 5, 1.0, "a decimal point is kept: 4 or 5 matches"),
    ("35", ["3.5"] * 5 + ["35"] * 5, 1.0, "5 or 4 matches"),
    ("coffee.", CAFE, 1.0, "trailing period stripped"),
    ("coffee, please", CAFE, 0.0, "comma removed, two words remain"),
    ("new york", ["new-york"] * 10, 1.0, "a hyphen inside a word becomes a space"),
    ("new - york", ["new-york"] * 10, 1.0, "a hyphen next to a space is deleted"),
    ("5:30", ["5:30"] * 10, 1.0, "':' is not on the punctuation list"),
    ("5 30", ["5:30"] * 10, 0.0, "':' is kept, so '5 30' differs"),
    ("hello", ["hello!"] * 10, 1.0, "'!' becomes a space"),
    ("yes", YES_NO_5, 1.0, "4 or 5 matches"),
    ("yes", YES_2, 0.6, "(2 x 1/3 + 8 x 2/3) / 10"),
    ("yes", YES_1, 0.3, "(1 x 0 + 9 x 1/3) / 10"),
    ("nope", YES_NO_5, 0.0, "no match"),
    ("7up", ["7 up"] * 10, 0.0, "spaces matter"),
    ("coca cola", ["coca-cola"] * 10, 1.0, "a hyphen inside a word becomes a space"),
    ("its", ["it's"] * 10, 0.0, "\"'s\" is split off as \" 's\", never dropped"),
    ("it's", ["it's"] * 10, 1.0, "both become \"it 's\""),
    ("mr smith", ["Mr. Smith"] * 10, 1.0, "periods not before a digit stripped"),
    ("ten", ["10"] * 10, 1.0, "'ten' becomes '10'"),
    ("5", ["$5"] * 10, 0.0, "'$' is not on the punctuation list"),
    ("stop", ["stop"] * 9, None, "nine answers: the script asserts ten; unavailable"),
    ("stop", "stop", None, "a single answer: unavailable"),
]

# ImageNet, eval_ImagetNet.py: raw, case-sensitive substring either way.
IMAGENET = [
    ("golden retriever", "golden retriever", 1, "equal"),
    ("a golden retriever dog", "golden retriever", 1, "label inside prediction"),
    ("retriever", "golden retriever", 1, "prediction inside label"),
    ("Golden Retriever", "golden retriever", 0, "case-sensitive"),
    ("", "golden retriever", 1, "the empty prediction is inside every label"),
    ("g", "golden retriever", 1, "a one-letter prediction inside the label"),
    ("cat", "golden retriever", 0, "neither way"),
    ("golden  retriever", "golden retriever", 0, "a double space breaks both ways"),
    ("golden retriever.", "golden retriever", 1, "label inside prediction"),
    ("tabby cat", "tabby", 1, "label inside prediction"),
    ("tab", "tabby", 1, "prediction inside label"),
    ("dog", "hotdog", 1, "prediction inside label, mid-word"),
    ("Tabby", "tabby", 0, "case-sensitive"),
    ("tabby", "Tabby cat", 0, "case-sensitive both ways"),
]

# GQA, convert_gqa_for_eval.py + eval_gqa.py: pred.rstrip('.').lower() == gold.
GQA = [
    ("yes", "yes", 1, "equal"),
    ("Yes", "yes", 1, "lower-cased"),
    ("Yes.", "yes", 1, "trailing period stripped"),
    ("yes..", "yes", 1, "every trailing period stripped"),
    ("yes!", "yes", 0, "only periods are stripped"),
    (" yes", "yes", 0, "no whitespace strip"),
    ("the table", "table", 0, "articles are not dropped"),
    ("table", "Table", 0, "the gold is not lower-cased"),
    ("left.", "left", 1, "trailing period stripped"),
    ("no", "yes", 0, "wrong"),
    ("Left", "left", 1, "lower-cased"),
    ("LEFT.", "left", 1, "both"),
    ("yes .", "yes", 0, "rstrip('.') leaves 'yes '"),
]

# VizWiz and VQAv2, eval_vizwiz.py / eval_vqav2.py: pred.upper() == gold.upper().
UPPER = [
    ("unanswerable", "unanswerable", 1, "equal"),
    ("Unanswerable", "unanswerable", 1, "case-insensitive"),
    ("unanswerable.", "unanswerable", 0, "punctuation counts"),
    ("2", "2", 1, "equal"),
    ("two", "2", 0, "no number words"),
    ("Yes", "yes", 1, "case-insensitive"),
    ("yes ", "yes", 0, "no whitespace strip"),
    ("red", "Red", 1, "case-insensitive"),
    ("straße", "STRASSE", 1, "str.upper turns ß into SS"),
    ("a dog", "dog", 0, "articles count"),
    ("UNANSWERABLE", "unanswerable", 1, "case-insensitive"),
]

# OCR-VQA, eval_ocrvqa.py: 0 if "Unanswerable" appears in the prediction, else lower-case equality.
OCRVQA = [
    ("The Hobbit", "the hobbit", 1, "lower-case equality"),
    ("Unanswerable", "Unanswerable", 0, "the veto, even when the gold says so"),
    ("unanswerable", "Unanswerable", 1, "the veto is case-sensitive"),
    ("The Unanswerable Question", "The Unanswerable Question", 0, "the veto hits a real title"),
    ("J.K. Rowling", "j.k. rowling", 1, "lower-case equality"),
    ("Rowling", "J.K. Rowling", 0, "no partial credit"),
    ("yes", "Yes", 1, "lower-case equality"),
    ("the hobbit.", "The Hobbit", 0, "punctuation counts"),
    ("Unanswerable.", "x", 0, "the veto"),
    ("THE HOBBIT", "The Hobbit", 1, "lower-case equality"),
]

# Grounding, eval_grounding.py: brackets removed, one character sliced off each end, split on
# commas, four floats or 0; IoU > 0.5 with corners as given.
GOLD = "[0.10, 0.20, 0.50, 0.60]"  # scored with size [640, 480]: boxes x 640, all exact in floating point
GROUNDING = [
    ("[0.10, 0.20, 0.50, 0.60]", GOLD, 1, "slicing eats '0' and '0': .10 ... 0.6"),
    ("[0.1, 0.2, 0.5, 0.6]", GOLD, 0, "slicing leaves y2 = 0.: IoU 0"),
    ("0.10, 0.20, 0.50, 0.60", GOLD, 1, "no brackets: the slice eats real digits, still 0.1 and 0.6"),
    ("[0.10,0.20,0.50,0.60]", GOLD, 1, "no spaces"),
    ("[0.11, 0.21, 0.51, 0.61]", GOLD, 1, "read as 0.11, 0.21, 0.51, 0.6: IoU 0.93"),
    ("the box is [0.10, 0.20, 0.50, 0.60]", GOLD, 0, "text before the numbers: float() fails"),
    ("[0.10, 0.20, 0.50]", GOLD, 0, "three numbers"),
    ("", GOLD, 0, "nothing to parse"),
    ("[0.10, 0.20, 0.50, 0.60, 0.70]", GOLD, 0, "five numbers"),
    ("[0.50, 0.60, 0.10, 0.20]", GOLD, 0, "corners are never sorted"),
    ("[0.10, 0.20, 0.50, 0.35]", GOLD, 0, "read as y2 = 0.3: IoU 0.25"),
    ("[0.10, 0.20, 0.50, 0.45]", GOLD, 0, "read as y2 = 0.4: IoU exactly 0.5 is not > 0.5"),
    ("[0.10, 0.20, 0.50, 0.55]", GOLD, 1, "read as y2 = 0.5: IoU 0.75"),
    ("x[0.10, 0.20, 0.50, 0.60]y", GOLD, 1, "the slice removes x and y: parsed exactly"),
    ("[ 0.10, 0.20, 0.50, 0.60 ]", GOLD, 1, "the slice removes the spaces: parsed exactly"),
    ("[0.10, 0.20, 0.50, 0.60]", "[0.1, 0.2, 0.5, 0.6]", 1, "the gold is parsed without slicing"),
    ("[0.10, 0.20, 0.50, 0.60)", GOLD, 1, "')' survives the bracket strip and is what the slice removes"),
    ("(0.10, 0.20, 0.50, 0.60)", GOLD, 1, "parentheses: the slice removes both, parsed exactly"),
    ("[0.10, 0.20, 0.50, 0.60].", GOLD, 1, "the slice eats the period and the leading '0'"),
]

# CVIT format checks (MIF), LiLoRA's eval_*_instruction.py.
REFS = ["A man rides a horse on the beach.", "A horse on the beach."]
MIF = [
    ("letter", "B", "B", None, True, "one letter"),
    ("letter", "b", "B", None, True, "upper-cased first"),
    ("letter", "B.", "B", None, False, "a period is a second character"),
    ("letter", " C ", "C", None, True, "stripped"),
    ("letter", "AB", "A", None, False, "two letters"),
    ("letter", "Z", "A", None, True, "any of A-Z"),
    ("letter", "1", "A", None, False, "a digit"),
    ("letter", "", "A", None, False, "empty"),
    ("vqa", "red", "red", None, True, "one word"),
    ("vqa", "light red", "blue", None, True, "two words, even wrong"),
    ("vqa", "it is red", "blue", None, False, "three words"),
    ("vqa", "The Big Red", "the big red", None, True, "three words equal to the answer ignoring case"),
    ("vqa", "", "red", None, True, "zero words"),
    ("vqa", "big red car", "the big red car", None, False, "three words, not equal"),
    ("caption", "A man rides a horse.", None, REFS, True, "ends with '.', five words"),
    ("caption", "A horse.", None, REFS, False, "short and not inside a reference ('a horse.' is not)"),
    ("caption", "the beach.", None, REFS, True, "short but inside a reference"),
    ("caption", "A man rides a horse", None, REFS, False, "no final period"),
    ("caption", "Horse on the beach.", None, REFS, True, "four words, inside a reference"),
    ("caption", "Beach.", None, REFS, True, "inside a reference ignoring case"),
    ("caption", "A dog runs on the grass.", None, REFS, True, "long enough; content is not checked"),
    ("caption", ".", None, REFS, True, "a lone period is inside a reference"),
    ("box", "[0.1, 0.2, 0.3, 0.4]", "", None, True, "four numbers"),
    ("box", "left", "", None, False, "no numbers"),
]


def _ids(cases):
    return [f"{i}-{c[-1]}" for i, c in enumerate(cases)]


def test_the_fixture_holds_at_least_150_hand_worked_cases():
    n = sum(map(len, (SCIENCEQA, TEXTVQA, IMAGENET, GQA, UPPER, OCRVQA, GROUNDING, MIF)))
    assert n >= 150, n


@pytest.mark.parametrize("pred,gold,want,rule", SCIENCEQA, ids=_ids(SCIENCEQA))
def test_scienceqa(pred, gold, want, rule):
    assert official.scienceqa(pred, gold) == want


@pytest.mark.parametrize("pred,answers,want,rule", TEXTVQA, ids=_ids(TEXTVQA))
def test_textvqa(pred, answers, want, rule):
    got = official.textvqa(pred, answers)
    assert got == want if want is None else got == pytest.approx(want)


@pytest.mark.parametrize("pred,gold,want,rule", IMAGENET, ids=_ids(IMAGENET))
def test_imagenet(pred, gold, want, rule):
    assert official.imagenet(pred, gold) == want


@pytest.mark.parametrize("pred,gold,want,rule", GQA, ids=_ids(GQA))
def test_gqa(pred, gold, want, rule):
    assert official.gqa(pred, gold) == want


@pytest.mark.parametrize("pred,gold,want,rule", UPPER, ids=_ids(UPPER))
def test_vizwiz_and_vqav2(pred, gold, want, rule):
    assert official.COIN_RULES["VizWiz"](pred, gold) == official.COIN_RULES["VQAv2"](pred, gold) == want


@pytest.mark.parametrize("pred,gold,want,rule", OCRVQA, ids=_ids(OCRVQA))
def test_ocrvqa(pred, gold, want, rule):
    assert official.ocrvqa(pred, gold) == want


@pytest.mark.parametrize("pred,gold,want,rule", GROUNDING, ids=_ids(GROUNDING))
def test_grounding(pred, gold, want, rule):
    assert official.grounding(pred, gold, [640, 480]) == want


@pytest.mark.parametrize("scorer,pred,answer,refs,want,rule", MIF, ids=_ids(MIF))
def test_mif_format_checks(scorer, pred, answer, refs, want, rule):
    assert official.mif_format(scorer, pred, answer, refs=refs) is want


def test_flickr30k_cider_as_lilora_script_runs_pycocoevalcap():
    """The script's flow replayed with pycocoevalcap's Cider (CIDEr-D), the scorer it imports: best
    reference per item by single-reference CIDEr, then compute_score(res, final_gts) with the roles
    swapped, on raw text."""
    import numpy as np

    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    preds = ["A man rides a horse on the beach.", "two dogs play", "A red car parked on a street."]
    refs = [["A man rides a horse on the beach.", "A horse and rider near the sea.", "Someone on a horse."],
            ["Two dogs play in the snow.", "Dogs running.", "A pair of dogs playing outside."],
            ["A car on a road.", "A red car is parked by the street.", "Cars in a city."]]
    final_gts = {}
    for i, (p, rs) in enumerate(zip(preds, refs)):
        _, scores = Cider().compute_score({str(k + 1): [r] for k, r in enumerate(rs)},
                                          {str(k + 1): [p] for k in range(len(rs))})
        final_gts[str(i)] = [rs[int(np.argmax(scores))]]
    res = {str(i): [p] for i, p in enumerate(preds)}
    want_mean, want = Cider().compute_score(res, final_gts)
    got = official.flickr30k_cider(preds, refs)
    assert got == pytest.approx(list(want), abs=1e-9)
    assert 100 * sum(got) / len(got) == pytest.approx(100 * want_mean)


def test_grounding_scales_by_the_longer_side_as_the_script_does():
    """IoU exactly 0.5 in exact arithmetic: scaled by 640 every coordinate is an exact float and the
    item fails (> 0.5 is false); unscaled, 0.4 - 0.2 rounds up to 0.20000000000000004 and it passes."""
    assert official.grounding("[0.10, 0.20, 0.50, 0.45]", GOLD, [640, 480]) == 0.0
    assert official.grounding("[0.10, 0.20, 0.50, 0.45]", GOLD, None) == 1.0


def test_score_items_runs_both_protocols_and_marks_the_unavailable():
    per = official.score_items("letter", "ScienceQA", ["a", "B", "Answer: c"], ["A", "A", "C"])
    assert per["official"] == [1.0, 0.0, 1.0]  # 'a' is read as A officially
    assert per["robust"] == [1.0, 0.0, 1.0]
    assert per["format"] == [True, True, False]
    per = official.score_items("vqa", "TextVQA", ["stop"], [["stop"]])  # no ten answers
    assert per["official"] is None and per["robust"] == [1.0]
    per = official.score_items("substring", "ImageNet", ["", "b"], ["bird", "bird"])
    assert per["official"] == [1.0, 1.0] and per["robust"] == [0.0, 0.0]  # the robust fix
    assert official.percent([1.0, 0.0, 0.5]) == 50.0 and official.percent(None) is None
