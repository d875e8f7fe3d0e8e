"""
LongBench v1's English datasets (the paper's Table 1 uses only those) for evaluate.py --task
longbench: the records, the official prompts and their middle truncation, and the official
metrics. A port of LongBench's scorer (THUDM/LongBench, LongBench/metrics.py and eval.py, with
pred.py's prompt handling): same names, signatures and behaviour, quirks included, so scores
here equal the official ones (tests/test_evaluate.py checks them against values worked by
hand). Do not edit it casually: a "fix" to a metric makes every score incomparable with the
paper's Table 1 and with LongBench's leaderboard.

Reads --data_dir (DATASET.jsonl of LongBench's data.zip) and --config_dir (LongBench/config:
dataset2prompt.json, dataset2maxlen.json, optional model2maxlen.json). Writes nothing.
"""

import json
import os
import re
import string
import warnings
from collections import Counter

from models import UserError

with warnings.catch_warnings():     # "using slow pure-python SequenceMatcher": as LongBench
    warnings.simplefilter("ignore")
    from fuzzywuzzy import fuzz
from rouge import Rouge

# ----------------------------------------------------------------------------------------
# metrics.py

def normalize_answer(s):
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())

# passage_count: 'There are 7 paragraphs' -> 1.0 when the gold is 7; '7 or 8' -> 0.5.
def count_score(prediction, ground_truth, **kwargs):
    """Fraction of the numbers in the prediction that equal the gold count."""
    numbers = re.findall(r"\d+", prediction)
    right = sum(str(n) == str(ground_truth) for n in numbers)
    return 0.0 if not numbers else float(right / len(numbers))  # no number at all: 0, not 0 / 0

# passage_retrieval_en: gold 'Paragraph 12'; a reply 'Paragraph 3 or Paragraph 12' -> 0.5.
def retrieval_score(prediction, ground_truth, **kwargs):
    """Fraction of the numbers in the prediction that equal the gold 'Paragraph N'."""
    gold = re.findall(r"Paragraph (\d+)", ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    right = sum(str(n) == str(gold) for n in numbers)
    return 0.0 if not numbers else float(right / len(numbers))

# lcc / repobench-p: the gold is the next line of code; the first reply line that is no
# code fence or comment is taken as the model's attempt at it.
def code_sim_score(prediction, ground_truth, **kwargs):
    """fuzz.ratio / 100 between the gold line and the first prediction line that holds no
    backtick, '#' or '//' (an empty string if none)."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz.ratio(line, ground_truth) / 100

# trec: all_classes lists the dataset's class names; a reply naming several
# classes splits the credit between them.
def classification_score(prediction, ground_truth, **kwargs):
    """1 / (number of class names found in the prediction) when the gold class is among them.

    Class names that are substrings of the gold class are removed first, but with
    LongBench's quirk kept on purpose: they are removed from the list *while iterating over
    it*, so the element after each removed one is skipped and may stay."""
    matches = [c for c in kwargs["all_classes"] if c in prediction]
    for term in matches:
        if term in ground_truth and term != ground_truth:
            matches.remove(term)              # mutates the list being iterated: the quirk
    return 1.0 / len(matches) if ground_truth in matches else 0.0

def rouge_score(prediction, ground_truth, **kwargs):
    """ROUGE-L F of the `rouge` package (summary-level LCS over '.'-split sentences, word
    counts over distinct words, case-sensitive); 0 when it refuses (an empty prediction)."""
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except (ValueError, RecursionError):      # LongBench: a bare except returning 0
        return 0.0
    return scores["rouge-l"]["f"]

def f1_score(prediction, ground_truth, **kwargs):
    """Token-multiset F1 of two token lists."""
    # multiset &: a shared token counts min(n_pred, n_gold) times
    num_same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if num_same == 0:
        return 0
    precision, recall = num_same / len(prediction), num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)

def qa_f1_score(prediction, ground_truth, **kwargs):
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())

# ----------------------------------------------------------------------------------------
# eval.py and pred.py

# eval.py's dataset2metric: the official metric of every English LongBench v1 dataset. The
# Chinese ones (multifieldqa_zh, dureader, vcsum, lsht, passage_retrieval_zh: jieba-segmented
# metrics) are not ported; the paper reports none of them.
dataset2metric = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum"}              # eval.py
# pred.py leaves these prompts raw ('chat models are better off without build prompts on
# these tasks'): fed as plain text, no chat turn.
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}  # pred.py
# The paper's Table 1 categories (LongBench's own grouping, English); Avg excludes Code, as the paper.
CATEGORIES = {
    "S-Doc QA": ["narrativeqa", "qasper", "multifieldqa_en"],
    "M-Doc QA": ["hotpotqa", "2wikimqa", "musique"],
    "Summ": ["gov_report", "qmsum", "multi_news"],
    "Few-shot": ["trec", "triviaqa", "samsum"],
    "Synthetic": ["passage_count", "passage_retrieval_en"],
    "Code": ["lcc", "repobench-p"],
}
# Table 1: the 14 datasets of the five categories (3 + 3 + 3 + 3 + 2; Code excluded, as the paper)
PAPER_DATASETS = [d for c, names in CATEGORIES.items() if c != "Code" for d in names]

def first_line(dataset, prediction):
    """What eval.py scores: for the few-shot datasets, the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0] if dataset in FIRST_LINE_ONLY else prediction

def scorer(dataset, predictions, answers, all_classes):
    """LongBench eval.py's scorer: mean over samples of the max over gold answers, x100,
    rounded to 2 decimals; first line of the prediction only for the few-shot datasets."""
    total = 0.0
    for prediction, ground_truths in zip(predictions, answers):
        prediction = first_line(dataset, prediction)
        # [0.0]: eval.py's running max starts at 0, so a record with no gold answer scores 0
        total += max([0.0] + [dataset2metric[dataset](prediction, g, all_classes=all_classes)
                              for g in ground_truths])
    return round(100 * total / len(predictions), 2)

def category_scores(per_dataset):
    """{dataset: score} -> {category: mean over its evaluated datasets, ..., 'Avg': mean of
    the five non-code categories present} (Table 1: e.g. 39.3 36.2 24.8 63.5 39.9 -> 40.7)."""
    out = {}
    for cat, names in CATEGORIES.items():
        # a category none of whose datasets ran is left out, never scored 0
        got = [per_dataset[d] for d in names if d in per_dataset]
        if got:
            out[cat] = round(sum(got) / len(got), 2)
    # Avg: the mean of the categories, not of the datasets (each category weighs the same,
    # however many of its datasets ran)
    five = [v for k, v in out.items() if k != "Code"]
    if five:
        out["Avg"] = round(sum(five) / len(five), 2)
    return out

def truncate_middle(tok, prompt, max_length):
    """pred.py: if the prompt is over max_length tokens, keep the first and last
    max_length // 2 tokens (decoded back to text, specials dropped). The budget is fixed per
    model, never reduced from sample to sample."""
    ids = tok(prompt, truncation=False).input_ids  # specials (BOS) in, as pred.py
    if len(ids) <= max_length:
        return prompt
    half = int(max_length / 2)  # as pred.py: an odd budget keeps max_length - 1
    # As in pred.py the budget is the raw prompt's: the chat template comes on top, and
    # text decoded then encoded again need not give the same tokens.
    return (tok.decode(ids[:half], skip_special_tokens=True)
            + tok.decode(ids[-half:], skip_special_tokens=True))

def budget(args, model2maxlen, preset, adapter_target_len, window):
    """The prompt budget LongBench would give a model: --max_length; an adapter trained to a
    longer window K gets K - 500; a plain model its model2maxlen.json entry or window - 500."""
    if args.max_length:
        return args.max_length
    if adapter_target_len:
        return adapter_target_len - 500
    return model2maxlen.get(preset["name"]) or (preset["native_len"] or window) - 500

# ----------------------------------------------------------------------------------------
# Reading the files: every one checked before any model loads.

def read_json(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} not found ({path}); point --config_dir at LongBench's "
                        "LongBench/config folder (dataset2prompt.json, dataset2maxlen.json)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON: {e.msg} ({path}:{e.lineno}); "
                        "restore it from a LongBench checkout") from None

def read_jsonl(path, required, what):
    """Records of a JSONL file (LongBench's, or evaluate.py qa's --data); every line must be
    an object holding the required fields, a tuple meaning any one of its fields."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():  # blank lines (a trailing newline) are no records
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{what}: malformed JSON, {e.msg} ({path}:{lineno}); "
                                "fix or remove that line") from None
            need = [k if isinstance(k, tuple) else (k,) for k in required]
            missing = [" or ".join(k) for k in need
                       if not isinstance(rec, dict) or not any(x in rec for x in k)]
            if missing:
                raise UserError(f"{what}: record without {', '.join(missing)} ({path}:{lineno}); "
                                f"every line needs {', '.join(' or '.join(k) for k in need)}")
            records.append(rec)
    if not records:
        raise UserError(f"{what}: no records ({path}); check the file")
    return records

# The fields of every LongBench v1 record (data.zip), all required: a file from elsewhere
# fails at its first line.
FIELDS = ["input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"]

def load(args):
    """The records of --datasets ('paper': Table 1's 14 datasets; 'all': the 16 English ones),
    first --max_samples of each, with the config tables:
    {"records": {dataset: [record]}, "prompts", "maxgen", "model2maxlen"}."""
    if not args.data_dir or not args.config_dir:
        raise UserError("--task longbench needs --data_dir (LongBench's data/ folder of "
                        "DATASET.jsonl) and --config_dir (its LongBench/config folder); pass both")
    cfg = lambda name: os.path.join(args.config_dir, name)
    prompts = read_json(cfg("dataset2prompt.json"), "dataset2prompt.json")
    maxgen = read_json(cfg("dataset2maxlen.json"), "dataset2maxlen.json")
    # optional: without it the budget is the window - 500 (budget())
    model2maxlen = read_json(cfg("model2maxlen.json"), "model2maxlen.json") \
        if os.path.isfile(cfg("model2maxlen.json")) else {}
    datasets = {"paper": PAPER_DATASETS, "all": list(dataset2metric)}.get(args.datasets) or \
        [d.strip() for d in args.datasets.split(",") if d.strip()]
    records = {}
    for d in datasets:
        for table, name in ((prompts, "dataset2prompt.json"), (maxgen, "dataset2maxlen.json")):
            if d not in table:
                raise UserError(f"no entry for dataset {d!r} in {name} ({cfg(name)}); add it "
                                f"or drop {d} from --datasets")
        if d not in dataset2metric:
            raise UserError(f"no LongBench metric for dataset {d!r} (the English datasets are "
                            f"ported: {', '.join(dataset2metric)}); drop it from --datasets")
        path = os.path.join(args.data_dir, f"{d}.jsonl")
        if not os.path.isfile(path):
            raise UserError(f"LongBench file not found ({path}); download LongBench's data.zip "
                            f"into --data_dir or drop {d} from --datasets")
        recs = read_jsonl(path, FIELDS, f"LongBench {d}")
        # the template filled with the first record: another LongBench version's config fails
        # here, not mid-run
        try:
            prompts[d].format(**recs[0])
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"the {d} prompt template does not fit its records ({e}) "
                            f"({cfg('dataset2prompt.json')}); use LongBench's own config "
                            "files") from None
        records[d] = recs[:args.max_samples] if args.max_samples else recs
    if not records:
        raise UserError(f"--datasets {args.datasets!r} names no dataset; pass 'paper', 'all' or a comma list")
    return {"records": records, "prompts": prompts, "maxgen": maxgen, "model2maxlen": model2maxlen}
