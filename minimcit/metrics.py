"""Per-task scorers of the robust protocol (SPEC §3), the answer processing and CIDEr-D both
protocols share, and continual metrics from the accuracy matrix (SPEC §4).

Scores are fractions in [0, 1] per sample (CIDEr: its own scale); task scores and continual
metrics are percentages. The official protocol, the benchmarks' own scripts with their quirks,
is in official.py; ROBUST_FIXES lists where the two differ and why.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter

# What the robust protocol fixes in the official scripts (official.py), task by task.
ROBUST_FIXES = {
    "ScienceQA": "letters are read case-insensitively and after 'answer'/'option' ('Answer: B', 'the answer is "
                 "(b)'); a one-character word that is no option ('a cat' -> 'A') is not a letter",
    "TextVQA": "soft accuracy against whatever answers an item has (one answer: equality after normalising), so "
               "it never stops for want of the ten; casefold",
    "ImageNet": "normalised both sides; containment by whole words either way; an empty or one-letter "
                "prediction is no hit (officially '' and 'b' are inside 'bird')",
    "GQA, VizWiz, VQAv2": "the EvalAI answer normaliser on both sides (case, punctuation, articles, number words)",
    "OCRVQA": "no veto for 'Unanswerable' inside the prediction (a real title may contain it); normalised equality",
    "Grounding": "the first four numbers wherever they stand, corners sorted, clipped to [0, 1] (officially one "
                 "character is sliced off each end first, so '[0.1, 0.2, 0.5, 0.6]' is read as ending in 0.)",
    "Flickr30k": "pycocoevalcap's CIDEr-D on PTB-tokenised captions, each prediction against all its references "
                 "(officially raw words, one best reference, and the two roles swapped)",
}

# --------------------------------------------------------------------------- the EvalAI answer processor

# ETrain/Eval/LLaVA/CoIN/m4c_evaluator.py, EvalAIAnswerProcessor (copied there from mmf, and in
# turn from the VQA evaluation code), kept character for character.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ["a", "an", "the"]
# "(?!<=\d)" is a lookahead for the text "<=" and a digit, not the lookbehind it was meant to be:
# every period not followed by a digit is stripped, "5." included.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]


@functools.lru_cache(maxsize=1 << 17)  # a run scores the same golds after every stage
def evalai_answer(item: str, lower=str.lower) -> str:
    """EvalAIAnswerProcessor.__call__: word_tokenize, then process_punctuation, then
    process_digit_article. `lower` is str.lower there; the robust protocol passes str.casefold."""
    item = lower(item).replace(",", "").replace("?", "").replace("'s", " 's").strip()  # word_tokenize
    item = item.replace("\n", " ").replace("\t", " ").strip()
    out = item  # process_punctuation
    for p in PUNCTUATIONS:
        # A digit-comma-digit anywhere (none is left after word_tokenize) or a punctuation mark next to a
        # space deletes the mark; otherwise it becomes a space.
        if (p + " " in item or " " + p in item) or re.search(COMMA_STRIP, item) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = PERIOD_STRIP.sub("", out, re.UNICODE)  # re.UNICODE lands in `count`: at most 32 periods go
    words = []  # process_digit_article
    for word in lower(out).split():
        word = NUMBER_MAP.setdefault(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def textvqa_scores(answers: list[str], lower=str.lower) -> dict:
    """TextVQAAccuracyEvaluator._compute_answer_scores: for each distinct processed answer, the
    mean over the ten leave-one-out subsets of min(1, matches / 3). The script asserts ten."""
    return dict(_textvqa_scores(tuple(answers), lower))


@functools.lru_cache(maxsize=1 << 15)
def _textvqa_scores(answers: tuple, lower) -> tuple:
    answers = [evalai_answer(a, lower) for a in answers]
    scores = {}
    for unique in set(answers):
        accs = [min(1.0, sum(1 for j, a in enumerate(answers) if j != i and a == unique) / 3)
                for i in range(len(answers))]
        scores[unique] = sum(accs) / len(accs)
    return tuple(scores.items())



# --------------------------------------------------------------------------- robust per-sample scorers


def normalize_answer(text: str) -> str:
    """The EvalAI answer normaliser, with casefold for lower."""
    return evalai_answer(text, str.casefold)


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
    return textvqa_scores(list(answers), str.casefold).get(normalize_answer(pred), 0.0)


def substring_match(pred: str, answer: str) -> float:
    """ImageNet: the label's words inside the prediction's, or the prediction's inside the
    label's; a prediction of less than two characters is never inside a label."""
    p, a = normalize_answer(pred), normalize_answer(answer)
    return float(bool(a) and (f" {a} " in f" {p} " or (len(p) > 1 and f" {p} " in f" {a} ")))


# "B", "b.", "(B)", "b) cat", "B cat"; not "a cat" or "I think"
_LETTER = re.compile(r"^\(?([A-Za-z])(?:[).:]|$)|^([A-HJ-Z])\s")
_LETTER_IN_TEXT = re.compile(r"\b(?:answer|option)\s*(?:is\s*)?:?\s*\(?([A-Za-z])\b(?!['’])", re.IGNORECASE)


def parse_option(pred: str) -> str | None:
    """The option letter a prediction names: a leading letter ("B", "b.", "(c)"), or one after
    "answer"/"option" ("Answer: B", "the answer is (b)"); upper case."""
    pred = pred.strip()
    m = _LETTER.match(pred) or _LETTER_IN_TEXT.search(pred)
    return next(g for g in m.groups() if g).upper() if m else None


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


# pycocoevalcap's PTBTokenizer runs Stanford's PTBTokenizer (-preserveLines -lowerCase) and drops
# these tokens. Lower-casing turns "-LRB-" into "-lrb-", which is then not on the list and stays.
PTB_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "etc.", "vs.", "inc.", "ltd.", "co.",
                  "mt.", "p.m.", "a.m."}
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
                "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
_TRAILING = re.compile(r"^(.*?)(\.\.\.|[,;:!?]+|\.|%)$")


def _ptb_word(word: str) -> list[str]:
    """One whitespace-separated chunk -> PTB tokens (lower case already)."""
    if not word:
        return []
    if word in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.){2,}", word) or word in ("--", "...", "-"):
        return [word]
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    if word[0] in "$#'" and len(word) > 1 and not word.startswith("'n'"):
        return [word[0]] + _ptb_word(word[1:])  # "$5" -> "$ 5", "#1" -> "# 1", "'single" -> "' single"
    m = _TRAILING.match(word)
    if m and m.group(1):
        return _ptb_word(m.group(1)) + [m.group(2)]  # "dog." -> "dog ."; "50%" -> "50 %"; "wow!!" -> "wow !!"
    if word.endswith("'") and len(word) > 1 and not word.endswith("n'"):
        return _ptb_word(word[:-1]) + ["'"]  # "dogs'" -> "dogs '"
    m = _CLITIC.match(word)  # "isn't" -> "is n't", "can't" -> "ca n't", "man's" -> "man 's"
    return list(m.groups()) if m else [word]


def ptb_tokens(text: str) -> list[str]:
    """The PTB tokenizer rules pycocoevalcap applies before CIDEr, without Java: lower case;
    brackets as -lrb- and kin; double quotes and backticks dropped; clitics split ("is n't",
    "ca n't", "man 's", "can not"); "$", "#" and "%" split off; sentence punctuation split off;
    hyphenated words, decimals, "5:30", "1,000", "3/4" and abbreviations ("mr.", "u.s.") kept."""
    text = text.replace("\n", " ").lower()
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r'["“”`]+', " ", text)
    tokens = [t for chunk in text.split() for t in _ptb_word(chunk)]
    return [t for t in tokens if t not in PTB_DROPPED]


def caption_tokens(text: str) -> str:
    """A caption as pycocoevalcap hands it to CIDEr: PTB tokens joined by spaces."""
    return " ".join(ptb_tokens(text))


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


# --------------------------------------------------------------------------- robust scorers by kind

SCORERS = {"letter": option_accuracy, "vqa": vqa_accuracy, "substring": substring_match,
           "exact": exact_match, "box": grounding_accuracy}


# --------------------------------------------------------------------------- continual metrics


def tasks_answered_per_stage(stages: list, n: int) -> list[int]:
    """Per stage (0 = the base model), how many of the n tasks (in order) it answers: every one at
    the base, then after each stage the tasks trained so far and the next. No metric reads a later
    task's score (FWT reads a[k][k+1]), and on real data answering every test set after every
    stage would be most of the evaluation's time; those cells stay None."""
    counts, furthest = [n], -1
    for stage in stages:
        furthest = max(furthest, *stage)
        counts.append(min(n, furthest + 2))
    return counts


def tasks_answered_per_row(stages: list, n: int) -> list[int]:
    """tasks_answered_per_stage per row of the accuracy matrix: a stage that trains several tasks gives each
    of them its row."""
    counts = tasks_answered_per_stage(stages, n)
    return [counts[0]] + [c for c, stage in zip(counts[1:], stages) for _ in stage]


def continual_summary(acc_matrix, format_matrix=None) -> dict:
    """Continual metrics from a[k][j] = score on task j after training task k; row 0 is the
    model before any task, so the matrix is (T+1) x T. Returns the final-stage values AP, MAP,
    BWT, ACC, MFT, FWT (and MIF) plus the per-stage AP_k, MAP_k (and MIF_k)."""
    # Row 0 may be missing (--skip-base-eval: None cells); only FWT needs it.
    a = [[math.nan if v is None else float(v) for v in row] for row in acc_matrix]
    T = len(a[0]) if a else 0
    if T == 0 or len(a) != T + 1 or any(len(row) != T for row in a):
        raise ValueError(f"acc_matrix must be (T+1) x T with row 0 the base model; got {len(a)} rows "
                         f"of lengths {[len(r) for r in a]}")
    ap = [sum(a[k][:k]) / k for k in range(1, T + 1)]  # AP_k = mean_{j<=k} a[k][j], LiLoRA Eq. 9
    map_ = [sum(ap[:k]) / k for k in range(1, T + 1)]  # MAP_k = mean_{i<=k} AP_i, LiLoRA Eq. 9
    out = {
        "AP": ap[-1], "MAP": map_[-1],
        # One task has nothing to forget and no later task to transfer to: BWT and FWT are undefined (None).
        "BWT": sum(a[T][j] - a[j + 1][j] for j in range(T - 1)) / (T - 1) if T > 1 else None,  # LiLoRA Eq. 10, k = T
        "ACC": ap[-1],  # = MFN = AP_T
        "MFT": sum(a[j + 1][j] for j in range(T)) / T,  # score on each task right after learning it
        "FWT": sum(a[j][j] - a[0][j] for j in range(1, T)) / (T - 1) if T > 1 else None,  # before learning j vs base
        "AP_k": ap, "MAP_k": map_,
    }
    if out["FWT"] is not None and math.isnan(out["FWT"]):
        out["FWT"] = None  # the base model was not evaluated
    if format_matrix is not None:
        f = [[math.nan if v is None else float(v) for v in row] for row in format_matrix]
        if len(f) != T + 1 or any(len(row) != T for row in f):
            raise ValueError("format_matrix must have the accuracy matrix's shape")
        mif = [sum(f[k][:k]) / k for k in range(1, T + 1)]  # MIF_k = mean_{j<=k} f[k][j], LiLoRA Eq. 11
        out.update(MIF=mif[-1], MIF_k=mif)
    return out
