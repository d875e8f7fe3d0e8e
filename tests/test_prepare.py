"""prepare.py on the tiny preset (random 2-layer model, byte-level tokenizer: one token per
byte, so token counts can be checked against len(text.encode())) with the real spaCy model.
The generations are garbage; the layout, the scoring and the bookkeeping are what is tested."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import entities
import prepare
from corpus import qa_record
from models import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --threads 1: float sums may round differently across thread counts, and byte-for-byte
# comparisons need the same arithmetic in every run.
TINY = ["--model", "tiny", "--max_new_tokens", "6", "--seed", "0", "--threads", "1"]  # chunk_len 64, N 8, K 4096


@pytest.fixture(scope="module")
def nlp():
    return entities.load_spacy("en_core_web_sm")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """6 built-in records in 3 shards of 2, built once for the tests below."""
    out = str(tmp_path_factory.mktemp("demo"))
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


def test_noun_and_verb_lemmas_count_only_when_asked():
    nlp_lem = entities.load_spacy("en_core_web_sm", lemmas=True)
    doc = nlp_lem("Maria Lopez founded two bakeries in Boston.")
    assert entities.doc_features(doc) == {"maria lopez", "boston"}
    assert {"lemma:found", "lemma:bakery"} <= entities.doc_features(doc, lemmas=True)


def test_chunks_reaching_delta_are_critical_in_original_order():
    assert prepare.select_critical([0, 6, 2, 7, 6], delta=6) == ([1, 3, 4], False)


def test_too_few_chunks_reaching_delta_fall_back_to_rank_order():
    # nothing reaches 6: the best-ranked chunk (score 4) is taken, ties go to the earlier chunk
    assert prepare.select_critical([0, 3, 4, 1, 4], delta=6) == ([2], True)
    assert prepare.select_critical([0, 3, 4, 1, 4], delta=6, min_critical=2) == ([2, 4], True)
    # zero-score chunks are never critical, even to reach min_critical
    assert prepare.select_critical([0, 2, 0], delta=6, min_critical=3) == ([1], True)


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
    critical, irrelevant = [2, 5], [0, 1, 6, 7, 9]
    contexts, kinds = prepare.response_contexts(critical, irrelevant, chunks, 4, True, g)
    assert kinds == ["chosen", "irrelevant", "partial", "irrelevant", "partial"]
    assert contexts[0] == chunks[2] + chunks[5]
    chunk_of = lambda ctx: sorted({t // 10 for t in ctx})
    for ctx, kind in zip(contexts[1:], kinds[1:]):
        used = chunk_of(ctx)
        assert len(used) == 2 and used == sorted(used)                # matched: as many chunks
        assert len(set(used) & set(critical)) == (1 if kind == "partial" else 0)
    # one critical chunk: 'partial' takes one half of its tokens
    contexts, _ = prepare.response_contexts([5], irrelevant, chunks, 2, True, g)
    part = [t for t in contexts[2] if t // 10 == 5]
    assert part in ([50, 51], [52, 53])
    # --rejected_context all: every irrelevant chunk of C' behind each rejected response
    contexts, _ = prepare.response_contexts(critical, irrelevant, chunks, 2, False, g)
    assert chunk_of(contexts[1]) == irrelevant
    assert len(set(chunk_of(contexts[2])) & set(critical)) == 1
    assert set(irrelevant) <= set(chunk_of(contexts[2]))


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
        # C': the chosen 64-byte chunks of the context, all critical ones included, in order
        assert len(p["context_chunks"]) == 8 and set(p["critical"]) <= set(p["context_chunks"])
        assert p["context_chunks"] == sorted(p["context_chunks"])
        cprime = b"".join(ctx_bytes[64 * j:64 * (j + 1)] for j in p["context_chunks"]).decode()
        expected_prefix = tok.apply_chat_template(
            [{"role": "user", "content": f"{cprime}\n\n{rec['question']}"}],
            tokenize=False, add_generation_prompt=True)
        P = int((seg == 0).sum())
        assert tok.decode(ids[:P].tolist()) == expected_prefix
        # segments 0 | 1 | 2 | 3 in that order, each response closed by the end-of-turn token
        s = seg.tolist()
        assert s == sorted(s) and set(s) == {0, 1, 2, 3}
        for k in (1, 2, 3):
            resp = ids[seg == k]
            assert resp[-1] == eot and (resp[:-1] != eot).all()
            assert len(resp) <= 6 + 1
        prefix = pos[:P]
        assert (prefix[1:] > prefix[:-1]).all()
        starts = {int(pos[seg == k][0]) for k in (1, 2, 3)}
        assert starts == {int(prefix[-1]) + 1}
        assert int(pos.max()) < 4096


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
    assert set(meta["quality"]["contains_gold"]) == {"chosen", "irrelevant", "partial"}
    assert meta["args"]["shard_size"] == 2 and len(meta["tokenizer_fingerprint"]) == 16


def write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def test_skip_bad_counts_every_skipped_record_by_reason(tmp_path):
    good = [qa_record(i, 1200, 7) for i in range(3)]
    lines = [good[0], b"{not json", {"context": "x" * 500}, b"\xff\xfe bad bytes",
             {"context": "Too short.", "question": "Where is Maria Lopez?"},
             {"context": good[1]["context"], "question": "What is the colour of the sky?"},
             {"context": good[1]["context"], "input": good[1]["question"], "answers": [good[1]["answer"]]},
             good[2]]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = str(tmp_path / "out")
    assert prepare.main(TINY + ["--input", src, "--out_dir", out, "--skip_bad", "--delta", "2",
                                "--shard_size", "3"]) == 0
    c = json.load(open(os.path.join(out, "meta.json")))["counts"]
    assert c["skipped"] == {"malformed_json": 1, "missing_field": 1, "invalid_utf8": 1,
                            "short_context": 1, "no_entity_overlap": 1}
    assert (c["read"], c["kept"]) == (8, 3) and len(rows(out)) == 3


def test_gold_chosen_responses_are_the_gold_answer_and_end_of_turn(tmp_path):
    recs = [qa_record(i, 1200, 3) for i in range(2)]
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    out = str(tmp_path / "out")
    assert prepare.main(TINY + ["--input", src, "--out_dir", out, "--chosen", "gold", "--delta", "2",
                                "--max_new_tokens", "32"]) == 0
    tok = tiny_tokenizer()
    for (ids, _, seg), rec in zip(rows(out), recs):
        assert tok.decode(ids[seg == 1].tolist()) == rec["answer"] + "<|im_end|>"
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["quality"]["contains_gold"]["chosen"] == 1.0


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
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out, "shard_00000.safetensors")
    deadline = time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = shards(out)
    assert "shard_00000.safetensors" in done and len(done) < 3, f"not killed mid-run: {done}"
    assert not os.path.exists(os.path.join(out, "meta.json"))
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 already done" in rerun.stdout or "2 already done" in rerun.stdout
    assert sorted(os.listdir(out)) == ["meta.json", "preview.jsonl"] + shards(demo_run)
    for f in shards(demo_run):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(demo_run, f), "rb").read()
