"""Per-task scorers (SPEC §3) and continual metrics from the accuracy matrix (SPEC §4).

Scores are fractions in [0, 1] per sample; task scores and continual metrics are percentages.
"""

from __future__ import annotations

import math
import re
from collections import Counter

# --------------------------------------------------------------------------- answer normalisation

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_APOSTROPHE = re.compile(r"(?<=\w)['’](?=\w)")  # inside a word: "don't", "o’clock"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")  # 1,000
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point
_PUNCT = re.compile(r"[;:/\[\]\"'’()=+\\_<>@`,?!*#%&{}|~^$-]")


def normalize_answer(text: str) -> str:
    """The standard VQA answer normalisation: lower case; punctuation removed (decimal
    points and thousands separators kept as numbers); number words as digits; articles
    dropped; contractions folded. The VQA evaluator maps "dont" to "don't"; folding both
    sides to the apostrophe-free spelling matches the same pairs, since prediction and
    answers go through the same function here."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _APOSTROPHE.sub("", text)
    text = _THOUSANDS.sub("", text)
    text = _PERIOD.sub(" ", text)
    text = _PUNCT.sub(" ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in ARTICLES)


# --------------------------------------------------------------------------- per-sample scorers


def exact_match(pred: str, answer: str) -> float:
    """GQA, VizWiz, VQAv2, OCR-VQA: equal after normalisation (case, punctuation, "two" = "2")."""
    return float(normalize_answer(pred) == normalize_answer(answer))


def vqa_accuracy(pred: str, answers) -> float:
    """TextVQA's soft accuracy: min(#annotators agreeing / 3, 1), averaged over the leave-one-out
    subsets of the answers (10-choose-9 for the usual ten). A single answer is exact match."""
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 1:
        return exact_match(pred, answers[0])
    p = normalize_answer(pred)
    gts = [normalize_answer(a) for a in answers]
    return sum(min(1.0, sum(g == p for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


def substring_match(pred: str, answer: str) -> float:
    """ImageNet: the label inside the prediction or the prediction inside the label."""
    p, a = normalize_answer(pred), normalize_answer(answer)
    return float(bool(p) and bool(a) and (a in p or p in a))


_LETTER = re.compile(r"^\(?([A-Z])(?:[).:\s]|$)")  # "B", "B.", "(B)", "B) cat", "B: cat"
_LETTER_IN_TEXT = re.compile(r"\b(?:answer|option) (?:is )?\(?([A-Z])\b", re.IGNORECASE)


def parse_option(pred: str) -> str | None:
    """The option letter a prediction names: a leading letter, or "the answer is (B)"."""
    pred = pred.strip()
    m = _LETTER.match(pred) or _LETTER_IN_TEXT.search(pred)
    return m.group(1).upper() if m else None


def option_accuracy(pred: str, answer: str) -> float:
    """ScienceQA: the predicted option letter equals the answer's."""
    return float(parse_option(pred) is not None and parse_option(pred) == parse_option(answer))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def parse_box(text) -> tuple[float, float, float, float] | None:
    """A normalised box [x1, y1, x2, y2] from text: the first four numbers, wherever they are
    (CoIN's own parser drops a character at each end of the string instead). Corners in any
    order are sorted; coordinates are clipped to the image [0, 1]. None if fewer than four."""
    if not isinstance(text, str):
        text = str(list(text))
    nums = [float(n) for n in _NUMBER.findall(text)[:4]]
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in nums)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 for empty ones."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(pred: str, answer) -> float:
    """Grounding: Acc@IoU>0.5; an unparsable prediction scores 0."""
    p, a = parse_box(pred), parse_box(answer)
    if p is None or a is None:
        return 0.0
    return float(box_iou(p, a) > 0.5)


# --------------------------------------------------------------------------- CIDEr


def caption_tokens(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: what pycocoevalcap's PTB tokenizer
    feeds CIDEr, without its Java dependency."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _ngrams(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider(preds: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """CIDEr-D per prediction, as pycocoevalcap's Cider computes it on tokenised text:
    tf-idf n-gram vectors (n = 1..4) with document frequencies over the references of the whole
    corpus, hypothesis counts clipped to the reference's, a Gaussian length penalty, mean over
    n-gram orders and references, x10. Like pycocoevalcap, the "length" in the penalty counts
    bigrams, not words. The corpus score is the mean; CVIT reports it x100."""
    if len(preds) != len(refs):
        raise ValueError(f"cider: {len(preds)} predictions for {len(refs)} reference sets")
    ref_counts = [[_ngrams(r, n) for r in rs] for rs in refs]
    df = Counter(g for rcs in ref_counts for g in set().union(*rcs))
    log_n_docs = math.log(float(len(refs)))

    def vec(counts):
        v = [{} for _ in range(n)]
        norm = [0.0] * n
        for g, tf in counts.items():
            w = tf * (log_n_docs - math.log(max(1.0, df[g])))
            v[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
        bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
        return v, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for pred, rcs in zip(preds, ref_counts):
        vh, nh, lh = vec(_ngrams(pred, n))
        total = [0.0] * n
        for rc in rcs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(10.0 * sum(total) / n / len(rcs))
    return scores


# --------------------------------------------------------------------------- tasks: scoring and format

SCORERS = {"letter": option_accuracy, "vqa": vqa_accuracy, "substring": substring_match,
           "exact": exact_match, "box": grounding_accuracy}


def format_ok(kind: str, pred: str, answer) -> bool:
    """MIF's format checks: a single letter; a box; a caption ending in "." with more than four
    words; anything else (VQA-type) at most two words or an exact match."""
    pred = pred.strip()
    if kind == "letter":
        return re.fullmatch(r"[A-Z]", pred) is not None
    if kind == "box":
        return parse_box(pred) is not None
    if kind == "caption":
        return pred.endswith(".") and len(pred.split()) > 4
    answers = [answer] if isinstance(answer, str) else list(answer)
    return len(pred.split()) <= 2 or any(exact_match(pred, a) for a in answers)


def score_task(kind: str, preds: list[str], answers: list) -> tuple[float, float]:
    """(score, format rate) of one task's predictions, both in percent. `answers[i]` is a string,
    or a list (VQA answers, caption references)."""
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} answers")
    if not preds:
        raise ValueError("no predictions to score")
    if kind == "caption":
        scores = cider([caption_tokens(p) for p in preds], [[caption_tokens(r) for r in rs] for rs in answers])
        score = 100 * sum(scores) / len(scores)  # CIDEr x 100
    else:
        scorer = SCORERS[kind]
        score = 100 * sum(scorer(p, a) for p, a in zip(preds, answers)) / len(preds)
    fmt = 100 * sum(format_ok(kind, p, a) for p, a in zip(preds, answers)) / len(preds)
    return score, fmt


# --------------------------------------------------------------------------- continual metrics


def continual_summary(acc_matrix, format_matrix=None) -> dict:
    """Continual metrics from a[k][j] = score on task j after training task k; row 0 is the
    model before any task, so the matrix is (T+1) x T. Returns the final-stage values AP, MAP,
    BWT, ACC, MFT, FWT (and MIF) plus the per-stage AP_k, MAP_k (and MIF_k)."""
    a = [list(map(float, row)) for row in acc_matrix]
    T = len(a[0]) if a else 0
    if T == 0 or len(a) != T + 1 or any(len(row) != T for row in a):
        raise ValueError(f"acc_matrix must be (T+1) x T with row 0 the base model; got {len(a)} rows "
                         f"of lengths {[len(r) for r in a]}")
    ap = [sum(a[k][:k]) / k for k in range(1, T + 1)]  # AP_k = mean_{j<=k} a[k][j], LiLoRA Eq. 9
    map_ = [sum(ap[:k]) / k for k in range(1, T + 1)]  # MAP_k = mean_{i<=k} AP_i, LiLoRA Eq. 9
    out = {
        "AP": ap[-1], "MAP": map_[-1],
        "BWT": sum(a[T][j] - a[j + 1][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0,  # LiLoRA Eq. 10, k = T
        "ACC": ap[-1],  # = MFN = AP_T
        "MFT": sum(a[j + 1][j] for j in range(T)) / T,  # score on each task right after learning it
        "FWT": sum(a[j][j] - a[0][j] for j in range(1, T)) / (T - 1) if T > 1 else 0.0,  # before learning j vs base
        "AP_k": ap, "MAP_k": map_,
    }
    if format_matrix is not None:
        f = [list(map(float, row)) for row in format_matrix]
        if len(f) != T + 1 or any(len(row) != T for row in f):
            raise ValueError("format_matrix must have the accuracy matrix's shape")
        mif = [sum(f[k][:k]) / k for k in range(1, T + 1)]  # MIF_k = mean_{j<=k} f[k][j], LiLoRA Eq. 11
        out.update(MIF=mif[-1], MIF_k=mif)
    return out
