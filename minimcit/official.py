"""The benchmarks' own evaluation scripts, rule by rule, quirks included: the `official`
protocol (SPEC §3). Each function gives the score of one item exactly as the named script
computes it, so a number here can stand next to the papers' tables.

CoIN: zackschen/CoIN, ETrain/Eval/LLaVA/CoIN/ (driven by scripts/LLaVA/Eval/*.sh).
CVIT: chanceche/LiLoRA, llava/eval/LiLoRA/Eval/ (driven by scripts/LiLoRA/Eval/eval_task.sh);
its ScienceQA, TextVQA, GQA and VQAv2 accuracy scripts are LLaVA's and CoIN's, the same rules.
The faults these rules carry, and how the robust protocol (metrics.py) fixes each, are listed
in metrics.ROBUST_FIXES.
"""

from __future__ import annotations

import re

from .metrics import SCORERS, caption_tokens, cider, evalai_answer, parse_box, textvqa_scores

# --------------------------------------------------------------------------- CoIN, per task


def scienceqa_letter(pred: str) -> str:
    """eval_science_qa.py, __main__: the exact letter, an "X. " prefix, else the first word of one
    character upper-cased ("a cat" -> "A", "3" -> "3"), else FAILED. Options are A-E."""
    options = ["A", "B", "C", "D", "E"]
    if pred in options:
        return pred
    if len(pred) >= 3 and pred[0] in options and pred[1:3] == ". ":
        return pred[0]
    found = re.findall(r"\b(\w)\b", pred)
    return found[0].upper() if found else "FAILED"


def scienceqa(pred: str, answer: str) -> float:
    """eval_science_qa.py: get_pred_idx maps a letter outside A-E (or past the item's choices) to -1,
    never the gold index, so the item is right exactly when the letter equals the gold letter."""
    letter = scienceqa_letter(pred)
    return float(letter in "ABCDE" and len(letter) == 1 and letter == answer.strip())


def textvqa(pred: str, answers) -> float | None:
    """eval_textvqa.py + m4c_evaluator.TextVQAAccuracyEvaluator.eval_pred_list, against the ten
    answers of TextVQA_0.5.1_val.json. None when the ten are not there (the script would stop)."""
    if isinstance(answers, str) or len(answers) != 10:
        return None
    return textvqa_scores(list(answers)).get(evalai_answer(pred), 0.0)


def imagenet(pred: str, answer: str) -> float:
    """eval_ImagetNet.py, eval_single: raw, case-sensitive substring either way; an empty
    prediction is inside every label."""
    return float(answer in pred or pred in answer)


def gqa(pred: str, answer: str) -> float:
    """convert_gqa_for_eval.py (rstrip('.').lower()) then eval_gqa.py (predicted == gold)."""
    return float(pred.rstrip(".").lower() == answer)


def upper_equal(pred: str, answer: str) -> float:
    """eval_vizwiz.py and eval_vqav2.py, eval_single: pred.upper() == ground_truth.upper()."""
    return float(pred.upper() == answer.upper())


def ocrvqa(pred: str, answer: str) -> float:
    """eval_ocrvqa.py, eval_single: 0 when "Unanswerable" appears anywhere, else lower-case equality."""
    if "Unanswerable" in pred:
        return 0.0
    return float(pred.lower() == answer.lower())


def _iou(b1, b2) -> float:  # eval_grounding.py calculate_iou: corners as given, never sorted
    x1, y1, x2, y2 = b1
    x21, y21, x22, y22 = b2
    inter = max(0, min(x2, x22) - max(x1, x21)) * max(0, min(y2, y22) - max(y1, y21))
    union = (x2 - x1) * (y2 - y1) + (x22 - x21) * (y22 - y21) - inter
    return inter / union if union > 0 else 0


def grounding(pred: str, answer_bbox: str, size=None) -> float:
    """eval_grounding.py, eval_single: brackets removed, then one character sliced off each end
    before splitting on commas ("[0.1, 0.2, 0.5, 0.6]" is read as .1, 0.2, 0.5, 0.), anything that
    fails to parse or is not four numbers scores 0, and IoU > 0.5 counts. Both boxes are scaled
    by the image's longer side (`size` = [w, h] from test.json) first: that leaves IoU unchanged in
    exact arithmetic but not always in floating point, so it is done here too (no size: 1)."""
    gold = [float(x) for x in answer_bbox.replace("[", "").replace("]", "").split(",")]
    try:
        text = pred.replace("[", "").replace("]", "")
        box = [float(x) for x in text[1:-1].split(",")]
    except ValueError:
        return 0.0
    if len(box) != 4:
        return 0.0
    max_wh = max(size) if size else 1
    return float(_iou([x * max_wh for x in box], [x * max_wh for x in gold]) > 0.5)


COIN_RULES = {"ScienceQA": scienceqa, "TextVQA": textvqa, "ImageNet": imagenet, "GQA": gqa, "VizWiz": upper_equal,
              "Grounding": grounding, "VQAv2": upper_equal, "OCRVQA": ocrvqa}

# --------------------------------------------------------------------------- CVIT


def flickr30k_cider(preds: list[str], refs: list[list[str]]) -> list[float]:
    """eval_flickr30k_cider.py, eval_cider, on raw text (no PTB tokenizer; words split on spaces):
    per item, CIDEr-D of the prediction against each reference alone, the five pairs forming the
    corpus, picks the best reference; then `cider_scorer.compute_score(res, final_gts)` passes
    the predictions as the references and the best references as the hypotheses. Per-item
    scores of that second call (the script reports their mean x 100)."""
    best = []
    for pred, rs in zip(preds, refs):
        per_ref = cider([pred] * len(rs), [[r] for r in rs])
        best.append(rs[max(range(len(rs)), key=lambda i: (per_ref[i], -i))])  # np.argmax: the first maximum
    return cider(best, [[p] for p in preds])


def mif_format(scorer: str, pred: str, answer, refs=None) -> bool:
    """The CVIT format checks (MIF, LiLoRA Eq. 11), as LiLoRA's scripts apply them:
    eval_scienceqa_instruction.py: strip().upper() is one letter A-Z;
    eval_vqa_instruction.py: at most two words, or equal to the answer ignoring case;
    eval_caption_instruction.py: ends with "." and has more than four words, or (ending with ".")
    is inside a reference ignoring case. Boxes (CoIN only, no script): four numbers parse."""
    pred = pred.strip()
    if scorer == "letter":
        up = pred.upper()
        return len(up) == 1 and "A" <= up <= "Z"
    if scorer == "caption":
        if not pred.endswith("."):
            return False
        return len(pred.split()) > 4 or any(pred.lower() in r.lower() for r in (refs or []))
    if scorer == "box":
        return parse_box(pred) is not None
    return len(pred.split()) <= 2 or pred.lower() == str(answer).lower()


# --------------------------------------------------------------------------- one task under both protocols

# The official rule of each task, by the CoIN or CVIT task whose script scores it. MiniCoIN's
# tasks name their CoIN analog, so the built-in benchmarks show both protocols too.
OFFICIAL_RULES = {**COIN_RULES, "Flickr30k": flickr30k_cider}


def score_items(scorer: str, rule: str | None, preds: list[str], golds: list, sizes=None) -> dict:
    """Per-item scores of one task's predictions: `robust` (metrics.py, by scorer kind),
    `official` (the benchmark's script, by rule name; None where the rule cannot run) and
    `format` (the MIF checks). `golds[i]` is the answer, or a list (VQA answers, captions);
    `sizes[i]` the image's [w, h] where the official Grounding rule wants it."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} answers")
    if not preds:
        raise ValueError("no predictions to score")
    first = [g if isinstance(g, str) else g[0] for g in golds]
    if scorer == "caption":
        robust = cider([caption_tokens(p) for p in preds], [[caption_tokens(r) for r in rs] for rs in golds])
    else:
        robust = [SCORERS[scorer](p, g) for p, g in zip(preds, golds)]
    official = None
    if rule == "Flickr30k":
        official = flickr30k_cider(preds, golds)
    elif rule in COIN_RULES:
        fn, sizes = COIN_RULES[rule], sizes or [None] * len(preds)
        if rule == "Grounding":
            official = [fn(p, f, s) for p, f, s in zip(preds, first, sizes)]
        else:
            official = [fn(p, g if rule == "TextVQA" else f) for p, g, f in zip(preds, golds, first)]
        if any(v is None for v in official):
            official = None  # e.g. TextVQA without the ten answers of TextVQA_0.5.1_val.json
    fmt = [mif_format(scorer, p, f, refs=g if scorer == "caption" else None) for p, g, f in zip(preds, golds, first)]
    return {"robust": robust, "official": official, "format": fmt}


def percent(values) -> float | None:
    """A task's score in percent from its per-item scores (CIDEr x 100); None stays None."""
    return None if values is None else round(100 * sum(values) / len(values), 2)
