"""prepare.py on the tiny preset (random 2-layer model, byte-level tokenizer: one token per
byte, so token counts can be checked against len(text.encode())) with the real spaCy model.
The generations are garbage; the layout, the scoring and the bookkeeping are what is tested."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import entities
import model_patch
import models
import prepare
from corpus import qa_record
from models import UserError, tiny_tokenizer
from train_helpers import ANSWERS_FINISHED, answers_finished, planted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --threads 1: float sums may round differently across thread counts, and byte-for-byte
# comparisons need the same arithmetic in every run.
TINY = ["--model", "tiny", "--max_new_tokens", "6", "--seed", "0", "--threads", "1"]  # chunk_len 64, N 8, K 4096


@pytest.fixture(autouse=True)
def tiny_answers_finish(monkeypatch):
    """The tiny model's answers count as finished, closed by end-of-turn (train_helpers.answers_finished)."""
    monkeypatch.setattr(models, "generate_batch", answers_finished(models.generate_batch))


@pytest.fixture(scope="module")
def nlp():
    return entities.load_spacy("en_core_web_sm")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """6 built-in records in 3 shards of 2, built once for the tests below."""
    out = str(tmp_path_factory.mktemp("demo"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "generate_batch", answers_finished(models.generate_batch))
        assert prepare.main(TINY + ["--out_dir", out, "--num_samples", "6", "--shard_size", "2"]) == 0
    return out


def shards(out):
    return sorted(f for f in os.listdir(out) if f.startswith("shard_"))


def rows(out):
    """Every packed row of a folder: (input_ids, position_ids, segment_ids) per row."""
    result = []
    for f in shards(out):
        t = load_file(os.path.join(out, f))
        off = t["offsets"].tolist()
        result += [(t["input_ids"][a:b], t["position_ids"][a:b], t["segment_ids"][a:b])
                   for a, b in zip(off[:-1], off[1:])]
    return result


# ---------------------------------------------------------------------------- steps 1-4

def test_chunks_have_exactly_chunk_len_tokens_and_the_remainder_goes_last():
    tok = tiny_tokenizer()
    text = "Ada Lovelace met Charles Babbage in London in 1833. " * 7     # 364 bytes
    ids = tok(text, add_special_tokens=False).input_ids
    chunks = prepare.split_chunks(ids, 64)
    assert [len(c) for c in chunks] == [64] * 5 + [364 - 5 * 64]
    assert sum(chunks, []) == ids


def test_chunk_borders_move_back_to_the_last_sentence_end_that_fits():
    # sentence starts at tokens 0, 30, 50, 70, 130; chunk_len 64
    ids = list(range(150))
    chunks = prepare.split_chunks(ids, 64, starts=[30, 50, 70, 130])
    # [0, 50): 50 is the last start <= 64 and past the middle (32); [50, 70)? no: 70 <= 114
    # but 130 > 114 -> border at 70 would leave 20 tokens; the rule keeps the last start
    # in (50 + 32, 50 + 64] = (82, 114]: none, so the chunk is cut at 114; then [114, 150).
    assert [(c[0], c[-1] + 1) for c in chunks] == [(0, 50), (50, 114), (114, 150)]
    assert sum(chunks, []) == ids and max(map(len, chunks)) <= 64


def test_sentence_starts_map_to_the_first_token_of_the_sentence():
    text = "Ada met Babbage.  He was an engineer. Dr. Lee came too."
    # tokens as a byte-level BPE would cut them, leading spaces inside the token
    words = ["Ada", " met", " Babbage", ".", " ", " He", " was", " an", " engineer", ".",
             " Dr", ".", " Lee", " came", " too", "."]
    offsets, at = [], 0
    for w in words:
        offsets.append((at, at + len(w)))
        at += len(w)
    assert "".join(words) == text
    nlp = entities.load_sentencizer()
    starts = prepare.sentence_token_starts(text, offsets, entities.sentence_starts(nlp(text)))
    # 'He' (token 5) and 'Lee'? spaCy keeps 'Dr.' an abbreviation: only 'Dr' (token 10) starts one
    assert starts == [5, 10]


def test_a_cut_answer_is_trimmed_to_its_last_complete_sentence():
    tok = tiny_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False).input_ids
    trim = lambda s: (lambda r: r if r is None else tok.decode(r))(prepare.trim_to_sentence(tok, ids(s)))
    assert trim("She was born in Boston. Then she moved to") == "She was born in Boston."
    assert trim('He said "yes." Later he wrote about it in 19') == 'He said "yes."'
    assert trim("It cost 3.5 million dollars and") is None            # '3.' is no sentence end
    assert trim("Boston, in the year of") is None
    assert trim("...") is None                                          # no word in it


def test_chunk_scores_count_distinct_entities_shared_with_the_question(nlp):
    chunks = ["In 1994, Maria Lopez joined Acme Group in Boston as a chemist. Maria Lopez liked tea.",
              "Maria Lopez often visited Denver with her brother.",
              "The weather was mild and the river ran slowly past the fields.",
              "Acme Group opened a factory in Boston."]
    question = "When did Maria Lopez join Acme Group in Boston?"
    feats = [entities.doc_features(d) for d in nlp.pipe(chunks + [question])]
    # shared: {Maria Lopez, Acme Group, Boston}, {Maria Lopez}, {}, {Acme Group, Boston};
    # 1994 and Denver are not in the question; Maria Lopez twice in chunk 0 counts once.
    assert prepare.score_chunks(feats[-1], feats[:-1]) == [3, 1, 0, 2]


def test_entity_matching_ignores_case_articles_and_possessives():
    assert entities.normalize("The Acme  Group's") == "acme group"
    assert entities.normalize("BOSTON,") == "boston"


def test_entity_features_leave_out_bare_numbers(nlp):
    doc = nlp("Maria Lopez founded two bakeries in Boston.")
    assert entities.doc_features(doc) == {"maria lopez", "boston"}


def test_chunks_reaching_delta_are_critical_in_original_order():
    assert prepare.select_critical([0, 6, 2, 7, 6], delta=6) == ([1, 3, 4], False)


def test_too_few_chunks_reaching_delta_fall_back_to_rank_order():
    # nothing reaches 6: the best-ranked chunk (score 4) is taken, ties go to the earlier chunk
    assert prepare.select_critical([0, 3, 4, 1, 4], delta=6) == ([2], True)


def test_a_question_sharing_no_entity_gives_no_critical_chunk():
    assert prepare.select_critical([0, 0, 0], delta=1) == ([], True)


def test_max_critical_keeps_the_best_ranked():
    assert prepare.select_critical([6, 9, 7, 8], delta=6, max_critical=2) == ([1, 3], False)


def test_shared_context_keeps_every_critical_chunk_and_the_original_order():
    g = torch.Generator().manual_seed(0)
    ctx = prepare.shared_context(20, [3, 17], 8, g)
    assert len(ctx) == 8 and {3, 17} <= set(ctx) and ctx == sorted(set(ctx))
    assert prepare.shared_context(5, [1], 8, g) == [0, 1, 2, 3, 4]    # short context: all of it


def test_rejected_contexts_hold_irrelevant_chunks_or_half_the_critical_ones():
    chunks = [[10 * i + j for j in range(4)] for i in range(10)]       # chunk i = tokens 10i..10i+3
    g = torch.Generator().manual_seed(0)
    sample = lambda critical: prepare.Sample(0, {}, chunks=chunks, critical=critical,
                                             irrelevant=[0, 1, 6, 7, 9], g=g)
    critical, irrelevant = [2, 5], [0, 1, 6, 7, 9]
    contexts, kinds = prepare.response_contexts(sample(critical), 4, None)
    assert kinds == ["chosen", "irrelevant", "partial", "irrelevant", "partial"]
    assert contexts[0] == chunks[2] + chunks[5]
    chunk_of = lambda ctx: sorted({t // 10 for t in ctx})
    for ctx, kind in zip(contexts[1:], kinds[1:]):
        used = chunk_of(ctx)
        assert len(used) == 2 and used == sorted(used)                # matched: as many chunks
        assert len(set(used) & set(critical)) == (1 if kind == "partial" else 0)
    # one critical chunk: 'partial' takes one half of its tokens
    contexts, _ = prepare.response_contexts(sample([5]), 2, None)
    part = [t for t in contexts[2] if t // 10 == 5]
    assert part in ([50, 51], [52, 53])
    # --rejected_kinds names each slot's kind, M included
    assert prepare.response_contexts(sample(critical), 2, "partial,irrelevant,partial")[1] == \
        ["chosen", "partial", "irrelevant", "partial"]


# ---------------------------------------------------------------------------- steps 6-7

@pytest.mark.parametrize("sparse_ratio", [0.0, 1.0])
def test_packed_row_layout_and_positions(sparse_ratio):
    head, tail = [1, 2, 3], [7, 8]
    chunks = [[10] * 64, [11] * 64, [12] * 30]
    responses = [[20] * 5 + [4], [21] * 9 + [4], [22] * 2 + [4]]
    g = torch.Generator().manual_seed(1)
    ids, pos, seg = prepare.pack_row(head, chunks, tail, responses, 4096, sparse_ratio, g)
    P = 3 + 64 + 64 + 30 + 2
    assert ids.tolist() == head + sum(chunks, []) + tail + sum(responses, [])
    assert seg.tolist() == [0] * P + [1] * 6 + [2] * 10 + [3] * 3
    prefix = pos[:P]
    assert (prefix[1:] > prefix[:-1]).all()                         # strictly increasing
    assert pos[P - 2:P].tolist() == [prefix[P - 3] + 1, prefix[P - 3] + 2]   # question follows
    start = int(prefix[-1]) + 1                                      # every response starts here
    for k, r in enumerate(responses):
        got = pos[seg == k + 1].tolist()
        assert got == list(range(start, start + len(r)))
    assert int(pos.max()) < 4096 and int(pos.min()) >= 0
    if sparse_ratio == 0.0:                                          # continuous: chunks stay whole
        for a, b in [(0, 67), (67, 131), (131, 161)]:
            assert (pos[a + 1:b] - pos[a:b - 1] == 1).all()


def test_a_window_too_small_for_the_row_is_a_user_error():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(prepare.UserError, match="--target_len"):
        prepare.pack_row([1], [[5] * 64, [6] * 64], [7], [[8] * 10], 100, 0.1, g)


def test_contains_ignores_case_and_spacing():
    assert prepare.contains("It was  port kelly, Ohio.", "Port Kelly")
    assert not prepare.contains("Port Kelby", "Port Kelly")
    assert not prepare.contains("anything", None)


# ---------------------------------------------------------------------------- end to end

def test_demo_defaults_come_from_the_smollm2_preset():
    args = prepare.parse_args([])
    prepare.resolve(args)
    assert (args.model, args.chunk_len, args.num_chunks, args.target_len) == ("smollm2-135m", 128, 16, 16384)
    assert (args.out_dir, args.num_samples, args.delta, args.num_rejected) == ("data/demo", 64, 2.0, 2)
    args = prepare.parse_args(["--input", "x/long.jsonl", "--chunk_len", "512"])
    prepare.resolve(args)
    assert (args.out_dir, args.delta, args.chunk_len, args.num_samples) == ("data/long", 6.0, 512, None)


def test_rows_are_prefix_then_chosen_then_rejected_with_synthesized_positions(demo_run):
    tok = tiny_tokenizer()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    preview = [json.loads(line) for line in open(os.path.join(demo_run, "preview.jsonl"))]
    all_rows = rows(demo_run)
    assert len(all_rows) == 6 and [p["index"] for p in preview] == list(range(6))
    for (ids, pos, seg), p in zip(all_rows, preview):
        rec = qa_record(p["index"], 5 * 64 * 8, 0)
        ctx_bytes = rec["context"].encode()
        # Chunks of <= 64 bytes (byte tokenizer: 1 token = 1 byte) that end where a sentence
        # ends (the corpus writes '. ' or '.\n\n' between sentences), unless a chunk holds
        # no sentence end past its middle: then it is cut at 64.
        ends = [m.end() for m in re.finditer(rb"\.(?: |\n\n)", ctx_bytes)]
        borders, i = [], 0
        while i < len(ctx_bytes):
            fit = [e for e in ends if i + 32 < e <= i + 64]
            i = min(len(ctx_bytes), i + 64) if not fit or i + 64 >= len(ctx_bytes) else fit[-1]
            borders.append(i)
        chunks = [ctx_bytes[a:b] for a, b in zip([0] + borders[:-1], borders)]
        # C': chunks of the context, all critical ones included, in order
        assert len(p["context_chunks"]) == 8 and set(p["critical"]) <= set(p["context_chunks"])
        assert p["context_chunks"] == sorted(p["context_chunks"])
        cprime = b"".join(chunks[j] for j in p["context_chunks"]).decode()
        assert p["critical_text"] == [chunks[j].decode() for j in p["critical"]]
        expected_prefix = tok.apply_chat_template(
            [{"role": "user", "content": f"{cprime}\n\n{rec['question']}"}],
            tokenize=False, add_generation_prompt=True)
        P = int((seg == 0).sum())
        assert tok.decode(ids[:P].tolist()) == expected_prefix
        # segments 0 | 1 | 2 | 3 in that order. The random model never states the answer:
        # chosen is the record's answer sentence, closed by end-of-turn; the rejected ones are
        # its answers of at most 6 tokens (finished: tiny_answers_finish), closed by end-of-turn.
        s = seg.tolist()
        assert s == sorted(s) and set(s) == {0, 1, 2, 3}
        assert p["chosen_source"] == "gold_sentence"
        assert tok.decode(ids[seg == 1].tolist()) == rec["answer_sentence"] + "<|im_end|>"
        for k in (2, 3):
            resp = ids[seg == k]
            assert len(resp) <= 7 and resp[-1] == eot and (resp[:-1] != eot).all()
        prefix = pos[:P]
        assert (prefix[1:] > prefix[:-1]).all()
        starts = {int(pos[seg == k][0]) for k in (1, 2, 3)}
        assert starts == {int(prefix[-1]) + 1}
        assert int(pos.max()) < 4096


def test_counts_nest_into_the_meta_json_layout_and_add_up_across_shards():
    c = Counter({"read": 3, "kept": 2, "skipped/short_context": 1, "states_gold/chosen": 1, "checked/chosen": 2,
                 "responses/generated": 6, "chosen_source/model": 2})
    n = prepare.nest(c)
    assert n["skipped"] == {"short_context": 1} and n["read"] == 3 and n["rows"] == 0
    assert n["quality"] == {"chosen": [1, 2], "irrelevant": [0, 0], "partial": [0, 0], "similar": [0, 0]}
    assert n["responses"]["generated"] == 6 and n["chosen_source"] == dict(
        model=2, gold_sentence=0, model_hinted=0, model_unchecked=0)
    # two shard headers' counts (read back from JSON) sum to the counts of both shards, nested
    c2 = Counter({"read": 2, "kept": 1, "skipped/no_entity_overlap": 1, "skipped/short_context": 1,
                  "checked/chosen": 1, "responses/generated": 3, "slot_n/1": 1})
    both = Counter()
    for header_counts in (json.loads(json.dumps(c)), json.loads(json.dumps(c2))):
        both.update(header_counts)
    both = prepare.nest(both)
    assert both == prepare.nest(c + c2) and both["skipped"] == {"short_context": 2, "no_entity_overlap": 1}
    assert both["quality"]["chosen"] == [1, 3] and both["slot_n"] == {"1": 1}


def test_shards_read_back_equal_to_what_was_built(tmp_path):
    tensors = {"input_ids": torch.arange(10, dtype=torch.int32),
               "position_ids": torch.arange(0, 30, 3, dtype=torch.int32),
               "segment_ids": torch.tensor([0] * 6 + [1, 1, 2, 2], dtype=torch.int8),
               "offsets": torch.tensor([0, 10], dtype=torch.int64)}
    path = str(tmp_path / "shard_00000.safetensors")
    prepare.write_shard(path, tensors, {"config": {"a": 1}, "stats": {}})
    back = load_file(path)
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    assert prepare.read_header(path)["config"] == {"a": 1}
    assert os.listdir(tmp_path) == ["shard_00000.safetensors"]       # no temp file left


def test_meta_json_describes_the_data_and_its_counts_add_up(demo_run):
    meta = json.load(open(os.path.join(demo_run, "meta.json")))
    assert meta["format_version"] == 1 and meta["model"] == "tiny" and meta["complete"]
    assert meta["vocab_size"] == len(tiny_tokenizer()) and meta["num_rejected"] == 2
    assert (meta["target_len"], meta["chunk_len"], meta["num_chunks"]) == (4096, 64, 8)
    c = meta["counts"]
    assert c["read"] == 6 == c["kept"] + sum(c["skipped"].values())
    all_rows = rows(demo_run)
    assert meta["tokens"]["total"] == sum(len(r[0]) for r in all_rows)
    assert meta["tokens"]["response"] == sum(int((r[2] > 0).sum()) for r in all_rows)
    assert 0 < meta["distance_coverage"] <= 1
    assert set(meta["quality"]["contains_gold"]) == {"chosen", "irrelevant", "partial", "similar"}
    assert meta["args"]["shard_size"] == 2 and len(meta["tokenizer_fingerprint"]) == 16
    import hashlib
    digest = hashlib.sha256(b"".join(open(os.path.join(demo_run, f), "rb").read() for f in shards(demo_run)))
    assert meta["data_fingerprint"] == digest.hexdigest()[:16]


def write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def test_every_skipped_record_is_counted_by_reason(tmp_path):
    good = [qa_record(i, 1200, 7) for i in range(3)]
    lines = [good[0], {"context": "Too short.", "question": "Where is Maria Lopez?"},
             {"context": good[1]["context"], "question": "What is the colour of the sky?"},
             {"context": good[1]["context"], "input": good[1]["question"], "answers": [good[1]["answer"]]},
             good[2]]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = str(tmp_path / "out")
    assert prepare.main(TINY + ["--input", src, "--out_dir", out, "--delta", "2", "--shard_size", "3"]) == 0
    c = json.load(open(os.path.join(out, "meta.json")))["counts"]
    # (with the corpus before its calibration, the random tiny model also repeated its
    # chosen answer in every rejected one for one record: rejected_same_as_chosen, tested on
    # its own in test_rejected_answers_identical_to_the_chosen_one_are_never_kept; not here)
    # The LongBench record has no answer_sentence, and the random model never states its answer, not even
    # with it given: chosen_unverified.
    assert c["skipped"] == {"short_context": 1, "no_entity_overlap": 1, "chosen_unverified": 1}
    assert (c["read"], c["kept"]) == (5, 2) and len(rows(out)) == 2


def test_workers_splitting_the_shards_write_the_same_bytes_as_one_process(demo_run, tmp_path):
    out = str(tmp_path / "split")
    for i in (1, 0):
        assert prepare.main(TINY + ["--out_dir", out, "--num_samples", "6", "--shard_size", "2",
                                    "--num_shards", "2", "--shard_id", str(i)]) == 0
    assert shards(out) == shards(demo_run)
    for f in shards(out):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(demo_run, f), "rb").read()
    assert json.load(open(os.path.join(out, "meta.json")))["complete"]


def test_a_run_killed_after_its_first_shard_resumes_to_identical_bytes(demo_run, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "prepare.py"] + TINY + ["--out_dir", out, "--num_samples", "6",
                                                   "--shard_size", "2"]
    env = dict(os.environ, **planted(tmp_path, ANSWERS_FINISHED))            # as demo_run's answers
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out, "shard_00000.safetensors")
    deadline = time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = shards(out)
    assert "shard_00000.safetensors" in done and len(done) < 3, f"not killed mid-run: {done}"
    assert not os.path.exists(os.path.join(out, "meta.json"))
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 already done" in rerun.stdout or "2 already done" in rerun.stdout
    assert sorted(os.listdir(out)) == ["meta.json", "preview.jsonl"] + shards(demo_run)
    for f in shards(demo_run):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(demo_run, f), "rb").read()


# ---------------------------------------------------------------------------- the response evaluator

def fake_generate(rule):
    """A stand-in for models.generate_batch: answers each prompt by rule(prompt text) ->
    (text, finished), so every path of the response evaluator can be driven exactly."""
    def generate(model, tok, prompts, stop_ids, max_new_tokens, batch_size, bar=None):
        out = []
        for p in prompts:
            text, finished = rule(tok.decode(p))
            out.append((tok(text, add_special_tokens=False).input_ids, finished))
        bar.update(len(prompts))
        return out
    return generate


def run_evaluator(tmp_path, monkeypatch, rule, recs, *flags):
    monkeypatch.setattr(models, "generate_batch", fake_generate(rule))
    os.makedirs(tmp_path, exist_ok=True)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = str(tmp_path / "out")
    # 256-byte chunks: a corpus sentence (<= ~130 bytes) is never longer than half a chunk
    assert prepare.main(TINY + ["--input", src, "--out_dir", out, "--delta", "2", "--chunk_len", "256",
                                "--max_new_tokens", "64"] + list(flags)) == 0
    meta = json.load(open(os.path.join(out, "meta.json")))
    preview = [json.loads(line) for line in open(os.path.join(out, "preview.jsonl"))]
    return meta, preview, rows(out)


def answer_of(recs):
    return lambda prompt: next(r["answer"] for r in recs if r["question"] in prompt)


def test_a_chosen_answer_that_states_the_gold_answer_is_kept_and_rejected_ones_that_do_are_redrawn(
        tmp_path, monkeypatch):
    recs = [qa_record(i, 2400, 11) for i in range(6)]
    gold = answer_of(recs)
    # the model states the answer whenever the answer is in its context (chosen: always;
    # 'partial' rejected: when its half of the critical chunks holds it)
    rule = lambda p: (f"It is {gold(p)}." if gold(p) in p.split("<|im_start|>user")[1] else
                      "I could not find it.", True)
    meta, preview, _ = run_evaluator(tmp_path, monkeypatch, rule, recs)
    q = meta["quality"]["contains_gold"]
    kept = meta["counts"]["kept"]
    assert q["chosen"] == 1.0 and q["irrelevant"] == 0.0 and (kept == 0 or q["partial"] == 0.0)
    # the model's own answer is kept wherever the critical chunks hold the answer; a chunk
    # border between a biography's two sentences can leave it out (then the gold sentence)
    holds = [r["answer"] in "".join(p["critical_text"]) for p in preview
             for r in [recs[p["index"]]]]
    assert len(preview) == kept and sum(holds) >= 3
    assert meta["chosen_source"]["model"] == sum(holds)
    assert meta["chosen_source"].get("gold_sentence", 0) == kept - sum(holds)
    skipped = meta["counts"]["skipped"]
    assert set(skipped) <= {"rejected_states_answer"} and kept + sum(skipped.values()) == 6
    # every redraw is counted; a sample skipped had all of its redraws fail
    assert meta["responses"]["redrawn"] == sum(p["redraws"] for p in preview) + 2 * skipped.get(
        "rejected_states_answer", 0)
    for p, held in zip(preview, holds):
        assert gold(p["question"]) in p["chosen"]
        assert p["chosen_source"] == ("model" if held else "gold_sentence")
        assert all(gold(p["question"]) not in r["text"] for r in p["rejected"])


def test_a_wrong_chosen_answer_is_replaced_by_the_gold_answer_in_a_sentence(tmp_path, monkeypatch):
    recs = [qa_record(i, 2400, 12) for i in range(4)]
    for r in recs[2:]:
        r.pop("answer_sentence")              # these the model must write, the answer given
    gold = answer_of(recs)
    rule = lambda p: (f"Surely it was {gold(p)}." if "Correct answer:" in p else "It was Nowhere.", True)
    meta, preview, all_rows = run_evaluator(tmp_path, monkeypatch, rule, recs)
    assert meta["counts"]["kept"] == 4 and meta["quality"]["contains_gold"]["chosen"] == 1.0
    assert meta["chosen_source"] == dict(model=0, gold_sentence=2, model_hinted=2, model_unchecked=0)
    assert [p["chosen"] for p in preview] == [recs[0]["answer_sentence"], recs[1]["answer_sentence"],
                                              f"Surely it was {recs[2]['answer']}.",
                                              f"Surely it was {recs[3]['answer']}."]
    tok = tiny_tokenizer()
    # the hint is only behind the chosen answer's generation, never in the stored prefix
    assert all("Correct answer" not in tok.decode(ids[seg == 0].tolist()) for ids, _, seg in all_rows)


def test_a_hinted_answer_that_still_misses_the_gold_answer_skips_the_sample(tmp_path, monkeypatch):
    recs = [qa_record(i, 2400, 13) for i in range(2)]
    recs[1].pop("answer_sentence")
    meta, _, _ = run_evaluator(tmp_path, monkeypatch, lambda p: ("It was Nowhere.", True), recs)
    assert meta["counts"]["kept"] == 1 and meta["counts"]["skipped"] == {"chosen_unverified": 1}


def test_rejected_answers_identical_to_the_chosen_one_are_never_kept(tmp_path, monkeypatch):
    recs = [qa_record(i, 2400, 14) for i in range(3)]
    for r in recs:                                     # no gold answer: the model's own chosen, unchecked
        r.pop("answer"), r.pop("answer_sentence")
    meta, _, _ = run_evaluator(tmp_path, monkeypatch, lambda p: ("It was  nowhere.", True), recs)
    assert meta["counts"]["kept"] == 0 and meta["counts"]["skipped"] == {"rejected_same_as_chosen": 3}
    assert meta["responses"]["redrawn"] == 3 * 2 * 2          # 3 samples x M = 2 x --redraws 2


def test_cut_answers_end_at_their_last_sentence_and_are_never_stored_as_finished(tmp_path, monkeypatch):
    recs = [qa_record(i, 2400, 15) for i in range(4)]
    gold = answer_of(recs)
    def rule(p):
        ctx = p.split("<|im_start|>user")[1]
        if gold(p) in ctx:
            return f"It is {gold(p)}. I also think that the", False      # cut: trimmed
        return "Nobody knows where she was born and", False               # cut: no sentence
    meta, preview, all_rows = run_evaluator(tmp_path, monkeypatch, rule, recs, "--redraws", "0")
    r = meta["responses"]
    assert r["cut_trimmed"] + r["cut_dropped"] == r["generated"] and r["finished"] == 0
    assert r["cut_trimmed"] >= 4 and r["cut_dropped"] >= 4
    # the dropped rejected answers leave no usable sample; nothing cut was stored open
    assert meta["counts"]["kept"] == 0 and set(meta["counts"]["skipped"]) <= {"rejected_cut", "rejected_states_answer"}
    rule = lambda p: (f"It is {gold(p)}. And then the" if gold(p) in p.split("<|im_start|>user")[1]
                      else "It is Nowhere. Then she", False)
    meta, preview, all_rows = run_evaluator(tmp_path / "2", monkeypatch, rule, recs, "--redraws", "0")
    tok = tiny_tokenizer()
    assert len(all_rows) == meta["counts"]["kept"] >= 1
    for (ids, _, seg), p in zip(all_rows, preview):
        got = [tok.decode(ids[seg == k].tolist()) for k in (1, 2, 3)]
        assert got == [f"It is {gold(p['question'])}.<|im_end|>"] + ["It is Nowhere.<|im_end|>"] * 2


# ---------------------------------------------------------------------------- planted facts

# One fact per essay, planted between two of its sentences; the question names three of
# the fact's entities and asks for a fourth. Facts of real essays were
# cut in two at fixed 128-token chunk borders in 2 of 6 samples.
FACTS = [("In {year}, the novelist {person} published {title} with {org} in {city}.",
          "Which novel did {person} publish with {org} in {year}?", "title"),
         ("{person} moved from {city} to {city2} in {year} to run the archive of {org}.",
          "Which city did {person} move to from {city} in {year}?", "city2"),
         ("According to {person}, {org} opened its first office in {city} in the spring of {year}.",
          "In which city did {org} open its first office in {year}, according to {person}?", "city"),
         ("The engineer {person} left {org} in {year} and founded {org2} in {city}.",
          "Which company did {person} found in {city} after leaving {org} in {year}?", "org2")]


def planted_records(essays, seed):
    """One record per essay text: the essay with a fact sentence planted at a random
    sentence border, a question about it, the answer and the planted sentence."""
    import random
    from faker import Faker
    fake, rng = Faker("en_US"), random.Random(seed)
    fake.seed_instance(seed)
    recs = []
    for i, essay in enumerate(essays):
        template, question, key = FACTS[i % len(FACTS)]
        v = dict(person=fake.name(), org=f"{fake.last_name()} {rng.choice(['Press', 'Institute', 'Group'])}",
                 org2=f"{fake.last_name()} Instruments", city=fake.city(), city2=fake.city(),
                 year=str(rng.randint(1950, 2015)), title=f"The {fake.last_name()} Orchard")
        fact = template.format(**v)
        borders = [m.end() for m in re.finditer(r"[.!?] (?=[A-Z])", essay)]
        at = rng.choice(borders[len(borders) // 5:]) if borders else 0
        recs.append({"context": essay[:at] + fact + " " + essay[at:], "question": question.format(**v),
                     "answer": v[key], "fact": fact})
    return recs


def planted_fact_rate(recs, tok, flags):
    """Steps 1-4 of prepare.py on each record (no model): the share of samples whose
    shared context C' holds the whole planted sentence, and whose critical chunks do."""
    args = prepare.parse_args(flags)
    prepare.resolve(args)
    counts = Counter()
    items = [(i, r, None) for i, r in enumerate(recs)]
    samples = prepare.build_contexts(args, tok, prepare.chunk_and_score(args, tok, entities.load_spacy(), items,
                                                                        counts), counts)
    squash = lambda s: re.sub(r"\s+", " ", s)
    in_ctx = in_crit = 0
    for s in samples:
        fact = squash(s.rec["fact"])
        in_ctx += fact in squash(tok.decode([t for i in s.ctx for t in s.chunks[i]]))
        in_crit += fact in squash(tok.decode([t for i in s.critical for t in s.chunks[i]]))
    return in_ctx / len(recs), in_crit / len(recs), prepare.nest(counts)


def test_a_planted_fact_is_never_cut_at_a_chunk_border(tmp_path):
    """On 24 essays of the built-in prose (512-byte chunks, about the characters of one
    128-token chunk of SmolLM2) with one planted fact each. The same check on the Paul
    Graham essays, outside CI: LOGO_ESSAYS=<folder of .txt essays> python -m pytest -k planted"""
    from corpus import haystack
    folder = os.environ.get("LOGO_ESSAYS")
    if folder:
        essays = [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder)) if f.endswith(".txt")]
        from models import load_tokenizer, resolve_model
        tok, flags = load_tokenizer(resolve_model("smollm2-135m")["path"]), ["--chunk_len", "128"]
    else:
        essays = [haystack(4000 + 200 * i, seed=i) for i in range(24)]
        tok, flags = tiny_tokenizer(), ["--model", "tiny", "--chunk_len", "512"]
    recs = planted_records(essays, seed=0)
    src = write_jsonl(tmp_path / "in.jsonl", [{k: r[k] for k in ("context", "question", "answer")} for r in recs])
    in_ctx, in_crit, stats = planted_fact_rate(recs, tok, flags + ["--input", src, "--num_chunks", "8"])
    print(f"planted facts: whole sentence in C' {in_ctx:.3f}, in the critical chunks {in_crit:.3f} "
          f"of {len(recs)}; skipped {stats['skipped']}")
    assert in_ctx >= 0.95 and in_crit >= 0.95
    # and with fixed-length chunks (the old chunking) the same facts are cut: the test can fail
    fixed = lambda text, offsets, starts: None
    prepare_sts = prepare.sentence_token_starts
    try:
        prepare.sentence_token_starts = fixed
        in_ctx_fixed, in_crit_fixed, _ = planted_fact_rate(recs, tok, flags + ["--input", src, "--num_chunks", "8"])
    finally:
        prepare.sentence_token_starts = prepare_sts
    print(f"with fixed-length chunks: in C' {in_ctx_fixed:.3f}, in the critical chunks {in_crit_fixed:.3f}")
    assert in_crit_fixed < 0.95


# ---------------------------------------------------------------------------- positions, device

def test_distance_coverage_counts_every_position_of_a_row(demo_run):
    meta = json.load(open(os.path.join(demo_run, "meta.json")))
    all_rows = rows(demo_run)
    # coverage counts every position of a row: with only prefix positions it is lower
    from positions import distance_coverage
    prefix_only = distance_coverage([pos[seg == 0] for _, pos, seg in all_rows], 4096)
    every = distance_coverage([pos.unique() for _, pos, _ in all_rows], 4096)
    assert meta["distance_coverage"] == pytest.approx(every) and every > prefix_only


def test_generation_runs_in_float32_on_cpu_and_each_worker_takes_its_own_gpu(monkeypatch):
    args = prepare.parse_args([])
    prepare.resolve(args)
    assert (args.device, args.dtype) == ("cpu", "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for shard_id, device in ((0, "cuda:0"), (5, "cuda:1"), (7, "cuda:3")):
        args = prepare.parse_args(["--num_shards", "8", "--shard_id", str(shard_id)])
        prepare.resolve(args)
        assert (args.device, args.dtype) == (device, "bfloat16")      # the preset's dtype on GPU
    # A LOCAL_RANK left in the shell by a launcher is ignored: it would put every worker on
    # one GPU; the shard alone picks it (5 mod 4).
    monkeypatch.setenv("LOCAL_RANK", "2")
    args = prepare.parse_args(["--num_shards", "8", "--shard_id", "5"])
    prepare.resolve(args)
    assert args.device == "cuda:1"
    args = prepare.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    prepare.resolve(args)
    assert (args.device, args.dtype) == ("cpu", "bfloat16")            # explicit flags win


# ---------------------------------------------------------------------------- hard rejected answers

def test_similar_rejected_context_leaves_out_the_critical_chunks_and_draws_the_most_alike():
    """Chunks 0-5; critical: 2. Alike: shares the critical chunk's entities (4), then has
    the most entities (1, 5); 0 and 3 hold none. One critical chunk: k = 1 drawn
    from the 2k = 2 most alike (4 and 1), never the critical one."""
    feats = [set(), {"a", "b", "c"}, {"ann", "oslo"}, set(), {"oslo"}, {"x"}]
    s = prepare.Sample(0, {}, chunks=[[10 * i + t for t in range(3)] for i in range(6)],
                       chunk_feats=feats, critical=[2], irrelevant=[0, 3])
    crit = set().union(*(s.chunk_feats[i] for i in s.critical))
    s.similar = sorted((i for i in range(6) if i not in s.critical),
                       key=lambda i: (-len(feats[i] & crit), -len(feats[i]), i))
    assert s.similar == [4, 1, 5, 0, 3]
    drawn = set()
    for seed in range(20):
        s.g = torch.Generator().manual_seed(seed)
        toks = prepare.rejected_context("similar", s)
        drawn.add(toks[0] // 10)
        assert len(toks) == 3 and 20 not in toks
    assert drawn == {4, 1}


def test_meta_reports_each_rejected_slot_and_the_base_models_reward_accuracy_on_the_rows(tmp_path):
    out = tmp_path / "hard"
    # Records without a gold answer: the chosen is the model's own answer, unchecked.
    recs = [{k: qa_record(i, 5 * 64 * 8, 0)[k] for k in ("context", "question")} for i in range(6)]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    meta = prepare.run(prepare.parse_args(TINY + ["--input", src, "--delta", "2", "--out_dir", str(out),
                                                 "--rejected_kinds", "similar,irrelevant,similar"]))
    assert meta["num_rejected"] == 3 and [v["kind"] for v in meta["rejected_slots"].values()] == \
        ["similar", "irrelevant", "similar"]
    # An independent reference: every row through the tiny model in the authors' layout.
    model, rows = models.load_model("tiny", seed=0).eval(), []
    t = load_file(out / "shard_00000.safetensors")
    off = t["offsets"].tolist()
    for a, b in zip(off[:-1], off[1:]):
        ids, pos, seg = (t[k][a:b].long()[None] for k in ("input_ids", "position_ids", "segment_ids"))
        with torch.no_grad():
            rows.append(model_patch.response_logps_unpacked(model, ids, pos, seg)[0][0])
    assert len(rows) == meta["counts"]["rows"] > 0
    assert 0 < meta["base_reward_accuracy"] < 1              # the model's own answers: mixed
    assert meta["base_reward_accuracy"] == pytest.approx(sum(float(r[0] > r[1:].mean()) for r in rows) / len(rows))
    for m, v in meta["rejected_slots"].items():
        assert v["base_reward_accuracy"] == pytest.approx(sum(float(r[0] > r[int(m)]) for r in rows) / len(rows))
        assert 0 <= v["names_question_entity"] <= 1


def test_rejected_kinds_refuse_an_unknown_kind_or_a_conflicting_m():
    for flags in (["--rejected_kinds", "irrelevant,wrong"], ["--rejected_kinds", "similar", "--num_rejected", "3"]):
        with pytest.raises(UserError, match="--rejected_kinds"):
            prepare.resolve(prepare.parse_args(TINY + flags))
