"""evaluate.py: LongBench's metrics worked by hand from its definitions, the decoding and
retrieval-head machinery against brute-force references, and every task end to end on the
tiny model (random weights, byte-level tokenizer: one ASCII character = one token)."""

import json
import math
import os
import warnings

import pytest
import torch

import corpus
import evaluate as ev
import summaries
import longbench
from models import load_model, tiny_tokenizer, tokenizer_fingerprint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "longbench")


# ----------------------------------------------------------------------------------------
# LongBench metrics, each value worked by hand.

def test_qa_f1_ignores_case_punctuation_and_articles():
    # pred tokens {eiffel, tower, paris}, gold {eiffel, tower, in, paris}: P = 1, R = 3/4
    assert longbench.qa_f1_score("The Eiffel Tower, Paris.", "Eiffel tower in Paris") == \
        pytest.approx(2 * 1 * 0.75 / 1.75)
    assert longbench.qa_f1_score("Berlin", "Paris") == 0


def test_rouge_score_is_rouge_l_f_over_distinct_words_as_the_rouge_package():
    # ref [a cat lay on a red mat], hyp [the cat sat on the mat]: LCS = cat on mat = 3;
    # the package divides by *distinct* words: 6 in the reference, 5 in the hypothesis.
    r, p = 3 / 6, 3 / 5
    assert longbench.rouge_score("the cat sat on the mat", "a cat lay on a red mat") == \
        pytest.approx(2 * p * r / (p + r), abs=1e-7)
    assert longbench.rouge_score("", "a cat") == 0.0                  # the package refuses; LongBench: 0


def test_classification_score_keeps_longbench_list_removal_quirk():
    classes = ["Sport", "Sports", "Sports news", "Weather"]
    # Found in the prediction: all four. "Sport" is a substring of the gold class and is
    # removed while iterating, so "Sports" (next in the list) is skipped and stays:
    # [Sports, Sports news, Weather] -> 1/3 (a correct removal would leave 2 -> 1/2).
    assert longbench.classification_score("Sports news or Weather", "Sports news",
                                   all_classes=classes) == pytest.approx(1 / 3)
    assert longbench.classification_score("Weather", "Weather", all_classes=classes) == 1.0
    assert longbench.classification_score("Weather", "Sports news", all_classes=classes) == 0.0


def test_count_and_retrieval_scores_are_the_share_of_numbers_that_are_right():
    assert longbench.count_score("There are 3 unique paragraphs, not 4.", 3) == 0.5
    assert longbench.count_score("no idea", "3") == 0.0
    assert longbench.retrieval_score("Paragraph 12, or maybe Paragraph 2", "Paragraph 12") == 0.5


def test_code_sim_score_uses_the_first_line_without_backtick_hash_or_slashes():
    pred = "\n```python\n# the call\nx = foo(1)\ny = 2"
    # line "x = foo(1)" vs "x = foo(2)": 9 of 10 characters match -> ratio 2*9/20 = 0.9
    assert longbench.code_sim_score(pred, "x = foo(2)") == pytest.approx(0.9)


def test_scorer_keeps_only_the_first_line_for_the_few_shot_datasets():
    pred = "\nParis\nThe capital of France is Paris"
    assert longbench.scorer("triviaqa", [pred], [["Paris"]], None) == 100.0
    # hotpotqa scores the whole reply: {paris x2, capital, of, france, is} vs {paris}:
    # one common token, P = 1/6, R = 1 -> F1 = 2/7
    assert longbench.scorer("hotpotqa", [pred], [["Paris"]], None) == round(100 * 2 / 7, 2)


def test_scorer_takes_the_max_over_gold_answers_and_the_mean_over_samples():
    # "Barack Obama" vs "Obama": F1 2/3; vs "Barack Hussein Obama": P = 1, R = 2/3, F1 0.8
    assert longbench.scorer("hotpotqa", ["Barack Obama"], [["Obama", "Barack Hussein Obama"]],
                     None) == 80.0
    assert longbench.scorer("hotpotqa", ["Barack Obama", "Paris"],
                     [["Obama", "Barack Hussein Obama"], ["Paris"]], None) == 90.0


def test_category_scores_average_datasets_then_the_five_categories_without_code():
    # the paper's Table 1 row for Llama-3-8B-Instruct-8K: 39.3 36.2 24.8 63.5 39.9 -> 40.7
    scores = {"narrativeqa": 39.3, "hotpotqa": 30.0, "2wikimqa": 42.4, "gov_report": 24.8,
              "trec": 63.5, "passage_count": 39.9, "lcc": 99.0}
    cats = longbench.category_scores(scores)
    assert cats["M-Doc QA"] == 36.2
    assert cats["Code"] == 99.0
    assert round(cats["Avg"], 1) == 40.7


# ----------------------------------------------------------------------------------------
# Prompts, decoding, retrieval heads, perplexity.

@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny").eval(), tiny_tokenizer()


def test_truncate_middle_keeps_half_the_budget_from_each_end():
    tok = tiny_tokenizer()                                   # one character = one token
    assert longbench.truncate_middle(tok, "abcdefghij", 4) == "abij"
    assert longbench.truncate_middle(tok, "abcdefghij", 5) == "abij"   # int(5 / 2) = 2 per side
    assert longbench.truncate_middle(tok, "abcd", 4) == "abcd"


def test_insert_at_depth_puts_the_needle_after_a_sentence_end():
    ctx = "One two. Three four. Five six."
    assert corpus.insert_at_depth(ctx, "N.", 0.0) == "N. " + ctx
    assert corpus.insert_at_depth(ctx, "N.", 0.5) == "One two. N. Three four. Five six."
    assert corpus.insert_at_depth(ctx, "N.", 1.0) == ctx + " N."


def test_greedy_generate_matches_transformers_generate(tiny):
    lm, tok = tiny
    ids = tok("The river went quiet near the old mill.").input_ids
    with warnings.catch_warnings():       # the KV cache under today's keyword (ev.kv_cache):
        warnings.simplefilter("error", FutureWarning)      # past_key_values= warns in 5.2x
        new, _ = ev.generate(lm, ids, 12)
    ref = lm.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    assert new == ref


def test_decode_attention_with_sdpa_prefill_equals_a_full_eager_forward(tiny, monkeypatch):
    """generate() prefills with SDPA and decodes with eager attention; the attention rows it
    scores must equal those of one eager forward over the prompt and the answer."""
    lm, tok = tiny
    ids = tok("Some special magic numbers: 4821934 and 7731. Repeat them: ").input_ids
    seen, real = [], ev.copy_hits
    monkeypatch.setattr(ev, "copy_hits",
                        lambda att, *a: (seen.append(att.clone()), real(att, *a))[1])
    new, copies = ev.generate(lm, ids, 6, needle_mask=torch.ones(len(ids), dtype=torch.bool))
    assert len(seen) == 6 and lm.config._attn_implementation == "sdpa"   # restored
    eager = load_model("tiny", attn_implementation="eager").eval()
    with torch.no_grad():
        att = eager(torch.tensor([ids + new[:-1]]), output_attentions=True).attentions
    full = torch.stack([a[0] for a in att])                  # (L, H, T', T')
    for step, got in enumerate(seen):
        q = len(ids) - 1 + step                               # the query that made new[step]
        torch.testing.assert_close(got, full[:, :, q, :q + 1], atol=1e-5, rtol=1e-4)


def test_copy_hits_counts_a_head_when_its_top_position_is_a_needle_token_equal_to_the_output():
    prompt = torch.tensor([5, 7, 9, 7])
    needle = torch.tensor([False, True, True, False])
    att = torch.zeros(2, 2, 5)                               # (L, H, T + 1 generated)
    att[0, 0, 1] = 1    # needle position holding 7: a copy of 7
    att[0, 1, 3] = 1    # holds 7 but outside the needle
    att[1, 0, 2] = 1    # needle position, but holds 9
    att[1, 1, 4] = 1    # a generated position
    layer, head, pos = ev.copy_hits(att, prompt, needle, 7)
    assert (layer.tolist(), head.tolist(), pos.tolist()) == ([0], [0], [1])


def test_retrieval_head_score_drops_heads_under_0_1_and_averages_the_top_10():
    copies = torch.zeros(1, 2, 6, dtype=torch.bool)
    needle = torch.tensor([False, True, True, True, True, False])
    copies[0, 0, 1:4] = True                                   # 3 of 4 needle tokens
    assert ev.head_copy_scores(copies, needle).tolist() == [[0.75, 0.0]]
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.09, 0.0])
    assert ev.retrieval_head_score(scores.view(1, -1)) == pytest.approx(5.1 / 10)
    few = torch.tensor([[0.3, 0.05], [0.1, 0.0]])              # two heads kept
    assert ev.retrieval_head_score(few) == pytest.approx(0.2)
    assert ev.retrieval_head_score(torch.full((2, 2), 0.05)) == 0.0


@pytest.mark.parametrize("length,stride", [(32, 32), (32, 12), (50, 50)])
def test_sliding_window_nll_equals_a_token_by_token_reference(tiny, length, stride):
    lm, _ = tiny
    ids = torch.arange(80) * 7 % 250 + 5
    total, count = ev.sliding_nll(lm, ids, length, stride)
    # Reference: which window scores token i (HF's rule), then log p(ids[i] | ids[begin:i]).
    ref, n, scored_to = 0.0, 0, 1
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, stride):
            end = min(begin + length, len(ids))
            for i in range(max(scored_to, begin + 1), end):
                logits = lm(ids[None, begin:i]).logits[0, -1].double()
                ref -= float(logits.log_softmax(-1)[ids[i]])
                n += 1
            scored_to = end
            if end == len(ids):
                break
    assert count == n
    assert total == pytest.approx(ref, rel=1e-5)


def test_mvniah_needle_mask_covers_exactly_the_value_tokens():
    tok = tiny_tokenizer()
    args = ev.parse_args(["--task", "mvniah", "--num_needles", "3"])
    samples = ev.mvniah_samples(args, tok, [900], 2)
    for s in samples:
        ids = torch.tensor(s["ids"])
        assert abs(len(ids) - 900) < 20
        assert tok.decode(ids[s["needle_mask"]]) == "".join(
            v for v in sorted(s["values"], key=lambda v: tok.decode(ids).index(v)))


# ----------------------------------------------------------------------------------------
# Every task end to end on the tiny model.

def run(tmp_path, *argv):
    out = tmp_path / "out"
    result = ev.main(["--model", "tiny", "--out_dir", str(out), *argv])
    task = argv[argv.index("--task") + 1]
    for ext in ("json", "csv", "png"):
        assert (out / f"{task}.{ext}").stat().st_size > 0
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    saved = json.loads((out / f"{task}.json").read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"], default=str))
    return saved, out


def test_niah_scores_every_length_depth_cell(tmp_path):
    saved, _ = run(tmp_path, "--task", "niah", "--lengths", "300,500", "--depths", "0,50,100",
                   "--max_new_tokens", "4")
    cells = saved["results"]["base"]["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == \
        [(L, d) for L in (300, 500) for d in (0.0, 50.0, 100.0)]
    assert all(0 <= c["score"] <= 1 and abs(c["prompt_tokens"] - c["length"]) < 5 for c in cells)


def test_niah_score_is_the_share_of_answer_words_in_the_reply():
    assert ev.niah_score("Eat a sandwich in Dolores Park.", "eat a sandwich and sit in Dolores "
                         "Park") == pytest.approx(5 / 7)      # 'a' is dropped as an article


def test_mvniah_reports_recall_and_retrieval_score_per_length(tmp_path):
    saved, _ = run(tmp_path, "--task", "mvniah", "--lengths", "800,1000", "--max_samples", "2",
                   "--max_new_tokens", "4")
    res = saved["results"]["base"]
    assert set(res["lengths"]) == {"800", "1000"}
    assert all(v["samples"] == 2 and 0 <= v["recall"] <= 1 and 0 <= v["retrieval_score"] <= 1
               for v in res["lengths"].values())
    assert torch.tensor(res["head_scores"]).shape == (2, 4)   # tiny: 2 layers x 4 heads


def test_ppl_of_a_random_model_is_near_the_vocabulary_size(tmp_path):
    saved, _ = run(tmp_path, "--task", "ppl", "--lengths", "64,128", "--max_tokens", "256")
    rows = saved["results"]["base"]["lengths"]
    assert [r["length"] for r in rows] == [64, 128]
    assert [r["tokens"] for r in rows] == [256 - 4, 256 - 2]   # a window's first token: unscored
    assert all(200 < r["ppl"] < 330 for r in rows)             # near-uniform over 261 tokens


def test_qa_reports_accuracy_per_context_length_even_beyond_the_native_window(tmp_path):
    saved, _ = run(tmp_path, "--task", "qa", "--lengths", "2K,5K", "--max_samples", "2",
                   "--max_new_tokens", "4")
    lengths = saved["results"]["base"]["lengths"]
    assert set(lengths) == {"2048", "5120"}
    for L, v in lengths.items():
        assert v["samples"] == 2 and v["accuracy"] == 0.0     # random weights never answer
        # within half a ~550-token biography (byte tokenizer) of the length asked for
        assert abs(v["mean_prompt_tokens"] - int(L)) < 300


def test_qa_accuracy_is_the_normalised_gold_answer_inside_the_reply(tmp_path, monkeypatch):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"context": "Ann was born in Oslo.", "question": "Where?",
                                "answer": "Oslo"}) + "\n" +
                    json.dumps({"context": "Bob joined in 1994.", "question": "When?",
                                "answers": ["1995", "1994"]}) + "\n" +
                    json.dumps({"context": "Cy founded Acme Group.", "question": "What?",
                                "answer": "Acme Group"}) + "\n")
    tok = tiny_tokenizer()
    replies = iter(["She was born in OSLO!", "In 1994.", "Acme."])
    monkeypatch.setattr(ev, "generate",
                        lambda *a, **k: (tok(next(replies)).input_ids, None))
    saved, _ = run(tmp_path, "--task", "qa", "--data", str(data), "--lengths", "4K",
                   "--gen_batch", "1")                    # the replies replace generate()
    res = saved["results"]["base"]
    assert [r["correct"] for r in res["samples"]] == [True, True, False]
    assert res["accuracy"] == pytest.approx(2 / 3)
    assert res["lengths"]["4096"]["samples"] == 3


def test_qa_counts_empty_answers_accuracy_among_the_rest_and_answers_with_a_distractors_fact(
        tmp_path, monkeypatch):
    """Built-in task: replies made by hand from each record's ground truth (the corpus's
    distractors are the other people's values of the asked fact)."""
    tok = tiny_tokenizer()
    recs = corpus.qa_records(4, 1200, seed=7)
    replies = iter([f"It is {recs[0]['answer']}.", f"It is {recs[1]['distractors'][0]}.", " ",
                    "I do not know."])
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (tok(next(replies)).input_ids, None))
    saved, _ = run(tmp_path, "--task", "qa", "--lengths", "1K", "--max_samples", "4", "--seed", "7",
                   "--gen_batch", "1")
    res = saved["results"]["base"]
    assert [r["question"] for r in res["samples"]] == [r["question"] for r in recs]   # same records
    assert [r["correct"] for r in res["samples"]] == [True, False, False, False]
    assert [r["distractor"] for r in res["samples"]] == [False, True, False, False]
    assert res["empty_rate"] == 0.25 and res["accuracy_nonempty"] == pytest.approx(1 / 3)
    assert res["distractor_rate"] == 0.25
    assert res["lengths"]["1024"]["distractor_rate"] == 0.25


def test_answer_rates_have_no_distractor_rate_without_ground_truth():
    rows = [{"pattern": "empty", "correct": False, "distractor": None},
            {"pattern": "correct", "correct": True, "distractor": None}]
    assert ev.answer_rates(rows) == {"empty_rate": 0.5, "accuracy_nonempty": 1.0, "distractor_rate": None}


# ----------------------------------------------------------------------------------------
# Error patterns (paper Appendix C, Fig. 9), labels worked by hand.

@pytest.fixture(scope="module")
def nlp():
    return ev.load_ner()


def test_error_patterns_of_hand_made_predictions(nlp):
    q = "In which city was Maria Lopez born?"          # entities: {maria lopez}
    preds = ["Maria Lopez was born in Boston.",          # states Boston
             "Maria Lopez was born in Chicago.",         # her, but the wrong city
             "The weather is nice in Paris.",            # {paris}: nothing of the question
             "Chicago",                                  # a wrong bare answer names nothing
             "", "...", " \n"]
    correct = [ev.states_answer(p, ["Boston"]) for p in preds]
    assert correct == [True] + [False] * 6
    assert ev.error_patterns(nlp, [q] * len(preds), preds, correct) == \
        ["correct", "hallucination", "unfollow", "unfollow", "empty", "empty", "empty"]


def test_correct_wins_over_entity_overlap_and_an_empty_gold_answer_states_nothing(nlp):
    assert ev.states_answer("born in BOSTON!", ["Chicago", "the Boston"])
    assert not ev.states_answer("anything at all", [""])
    q = "In which city was Maria Lopez born?"
    assert ev.error_patterns(nlp, [q, q], ["Boston.", "Maria Lopez"], [True, False]) == \
        ["correct", "hallucination"]


def test_pattern_summary_has_every_pattern_and_rates_summing_to_one():
    got = ev.pattern_summary(["empty", "correct", "empty", "unfollow"])
    assert got["patterns"] == {"correct": 0.25, "hallucination": 0.0, "unfollow": 0.25,
                               "empty": 0.5}
    assert got["pattern_counts"] == {"correct": 1, "hallucination": 0, "unfollow": 1, "empty": 2}


QA_REPLIES = ["Maria Lopez was born in Boston.", "Maria Lopez was born in Chicago.",
              "The weather is nice in Paris.", "", "..."]


def qa_pattern_data(tmp_path):
    """Five records on one question: two short contexts (prompts under 150 tokens), three long
    ones (over 150), answered with QA_REPLIES in order."""
    q = "In which city was Maria Lopez born?"
    short, long = "Maria Lopez was born in Boston.", "Maria Lopez was born in Boston. " * 8
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"context": c, "question": q, "answer": "Boston"}) + "\n"
                            for c in [short, short, long, long, long]))
    return data


def test_qa_pattern_rates_in_json_and_csv_match_the_per_sample_patterns(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    replies = iter(QA_REPLIES)
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (tok(next(replies)).input_ids, None))
    saved, out = run(tmp_path, "--task", "qa", "--data", str(qa_pattern_data(tmp_path)),
                     "--lengths", "150,4K", "--gen_batch", "1")
    res = saved["results"]["base"]
    assert [r["pattern"] for r in res["samples"]] == \
        ["correct", "hallucination", "unfollow", "empty", "empty"]
    assert [r["length"] for r in res["samples"]] == [150, 150, 4096, 4096, 4096]
    expected = {"150": {"correct": 0.5, "hallucination": 0.5, "unfollow": 0.0, "empty": 0.0},
                "4096": {"correct": 0.0, "hallucination": 0.0, "unfollow": 1 / 3, "empty": 2 / 3}}
    for L, rates in expected.items():
        got = res["lengths"][L]
        assert got["patterns"] == pytest.approx(rates)
        assert sum(got["pattern_counts"].values()) == got["samples"]
        # the rates are those of the per-sample patterns
        mine = [r["pattern"] for r in res["samples"] if str(r["length"]) == L]
        assert got["pattern_counts"] == {p: mine.count(p) for p in ev.PATTERNS}
    assert res["patterns"] == pytest.approx({"correct": 0.2, "hallucination": 0.2,
                                             "unfollow": 0.2, "empty": 0.4})
    assert res["accuracy"] == pytest.approx(res["patterns"]["correct"])
    lines = (out / "qa.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [x.split(",") for x in lines[1:]]
    assert [r[0] for r in rows] == ["150", "4096"]
    for r in rows:
        for p in ev.PATTERNS:
            assert float(r[header.index(f"{p}_base")]) == \
                pytest.approx(expected[r[0]][p], abs=1e-4)


def longbench_args(*extra):
    return ["--task", "longbench", "--data_dir", os.path.join(FIXTURES, "data"),
            "--config_dir", os.path.join(FIXTURES, "config"),
            "--datasets", "hotpotqa,trec,passage_count", *extra]


def test_longbench_runs_end_to_end_and_its_scores_match_the_saved_predictions(tmp_path):
    saved, out = run(tmp_path, *longbench_args("--max_new_tokens", "3"))
    res = saved["results"]["base"]
    assert res["max_length"] == 3000                          # model2maxlen.json's tiny entry
    assert res["samples"] == {"hotpotqa": 2, "trec": 2, "passage_count": 1}
    for d in res["datasets"]:
        preds = [json.loads(x) for x in (out / "pred" / "base" / f"{d}.jsonl").open()]
        assert res["datasets"][d] == longbench.scorer(d, [p["pred"] for p in preds],
                                              [p["answers"] for p in preds],
                                              preds[0]["all_classes"])


def test_longbench_prompts_templates_truncation_and_metrics(tmp_path, monkeypatch):
    """Replies chosen per question, scores worked by hand from the LongBench definitions."""
    tok = tiny_tokenizer()
    replies = {"capital of France": "Paris", "writer born": "He was born in London",
               "Danube": "Other location\nCity", "telephone": "Human being or Other number",
               "The final answer is": "2 paragraphs, I think 2 or 3"}
    prompts = []

    def fake_generate(lm, ids, max_new_tokens, stop_ids=(), min_new_tokens=0, needle_mask=None):
        text = tok.decode(ids)
        prompts.append(text)
        reply = next(v for k, v in replies.items() if k in text)
        return tok(reply).input_ids, None

    monkeypatch.setattr(ev, "generate", fake_generate)
    saved, _ = run(tmp_path, *longbench_args("--max_length", "200"))
    res = saved["results"]["base"]
    # hotpotqa: F1 1 and {he, was, born, in, london} vs {london}: 2 * 1/5 / (6/5) = 1/3
    # trec: first line "Other location" -> 1; "Human being or Other number" -> 1/2
    # passage_count: numbers 2, 2, 3 -> 2/3
    assert res["datasets"] == {"hotpotqa": 66.67, "trec": 75.0, "passage_count": 66.67}
    assert res["categories"] == {"M-Doc QA": 66.67, "Few-shot": 75.0, "Synthetic": 66.67,
                                 "Avg": round((66.67 + 75.0 + 66.67) / 3, 2)}
    hot = [p for p in prompts if "given passages" in p]
    assert all(p.startswith("<|im_start|>user\n") for p in hot)          # chat template
    assert not any(p.startswith("<|im_start|>") for p in prompts if "Type:" in p)  # trec: none
    long = next(p for p in hot if "writer" in p)
    user = long[len("<|im_start|>user\n"):long.index("<|im_end|>")]
    assert len(tok(user).input_ids) == 200                     # 100 head + 100 tail tokens
    assert user.startswith("Answer the question based on")
    assert user.endswith("Question: Where was the writer born?\nAnswer:")


# ----------------------------------------------------------------------------------------
# Adapters.

def make_adapter(path, rope_theta=None, model="tiny", hidden_size=None):
    """A random (non-zero) LoRA on a tiny model, saved the way train.py does."""
    from peft import LoraConfig, get_peft_model
    from models import LlamaForCausalLM, tiny_config
    torch.manual_seed(1)
    cfg = tiny_config(len(tiny_tokenizer()),
                      **({"hidden_size": hidden_size} if hidden_size else {}))
    base = LlamaForCausalLM(cfg)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(path)
    with open(os.path.join(path, "logo_config.json"), "w") as f:
        json.dump({"model": model, "model_path": model, "rope_theta": rope_theta,
                   "target_len": 4096,
                   "tokenizer_fingerprint": tokenizer_fingerprint(tiny_tokenizer())},
                  f)
    return path


def test_compare_evaluates_base_and_adapter_with_its_training_rope_theta(tmp_path):
    from peft import PeftModel
    adapter = make_adapter(str(tmp_path / "logo" / "final"), rope_theta=20000.0)
    saved, out = run(tmp_path, "--task", "ppl", "--lengths", "64", "--max_tokens", "128",
                     "--adapter", adapter, "--compare")
    res = saved["results"]
    assert list(res) == ["base", "logo"]
    tok = tiny_tokenizer()
    ids = torch.tensor(tok(corpus.filler_text(tok, 128)).input_ids[:128])
    for label, model in (("base", load_model("tiny")),
                         ("logo", PeftModel.from_pretrained(load_model("tiny", rope_theta=20000.0),
                                                            adapter).merge_and_unload())):
        nll, n = ev.sliding_nll(model.eval(), ids, 64, 64)
        assert res[label]["lengths"][0]["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res["base"]["lengths"][0]["ppl"] != pytest.approx(res["logo"]["lengths"][0]["ppl"])
    assert "base,logo" in (out / "ppl.csv").read_text().replace("ppl_", "")


def test_compare_writes_the_patterns_and_a_line_per_model_side_by_side(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    figures, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), real(fig, *a, **k)))
    adapter = make_adapter(str(tmp_path / "logo" / "final"))
    saved, out = run(tmp_path, "--task", "qa", "--lengths", "2K,3K", "--max_samples", "2",
                     "--max_new_tokens", "4", "--adapter", adapter, "--compare")
    res = saved["results"]
    assert list(res) == ["base", "logo"]
    for label in res:
        for v in res[label]["lengths"].values():
            assert sum(v["patterns"].values()) == pytest.approx(1.0)
            assert sum(v["pattern_counts"].values()) == v["samples"] == 2
    # qa.png: the main metric (accuracy) against length, one line per model
    (fig,) = figures
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["base", "logo"]
    for ln, label in zip(lines, res):
        assert list(ln.get_xdata()) == ["2048", "3072"]
        assert list(ln.get_ydata()) == [res[label]["lengths"][L]["accuracy"] for L in ("2048", "3072")]
    header = (out / "qa.csv").read_text().splitlines()[0].split(",")
    assert header == ["length", "accuracy_base", "accuracy_logo"] + \
        [f"{p}_{lb}" for lb in ("base", "logo") for p in ev.PATTERNS]


def test_batched_qa_decoding_gives_the_one_by_one_answers():
    """--gen_batch (left padding, model.generate) against the KV-cache loop, on prompts of
    different lengths (the padding must not change any greedy token in float32)."""
    tok, lm = tiny_tokenizer(), load_model("tiny").eval()
    args = ev.parse_args(["--task", "qa", "--model", "tiny", "--max_new_tokens", "12",
                          "--gen_batch", "3"])
    samples = [{"ids": tok(" ".join(str(i * n) for i in range(n))).input_ids} for n in (9, 2, 20, 5, 14)]
    batched = ev.answers(args, lm, tok, samples, "batched")
    args.gen_batch = 1
    assert batched == ev.answers(args, lm, tok, samples, "one by one")
    assert len({tuple(a) for a in batched}) > 1 and all(batched)


def counting_generate(monkeypatch):
    """Patch evaluate.generate to count its calls; returns the list of prompt lengths."""
    calls, real = [], ev.generate
    monkeypatch.setattr(ev, "generate", lambda lm, ids, *a, **k: calls.append(len(ids)) or
                        real(lm, ids, *a, **k))
    return calls


def test_a_killed_qa_run_continues_from_its_cached_answers(tmp_path, monkeypatch, capsys):
    """Every finished answer is in OUT/answers_LABEL.jsonl as soon as it is done; a rerun of
    the same command reuses the whole lines (a line cut by the kill is ignored and counted),
    generates only what is missing, and ends with the fresh run's results."""
    argv = ("--task", "qa", "--lengths", "400", "--max_samples", "3", "--max_new_tokens", "6")
    fresh, out = run(tmp_path, *argv)
    cache = out / "answers_base.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 3 and fresh["results"]["base"]["reused_answers"] == 0
    preds = [s["prediction"] for s in fresh["results"]["base"]["samples"]]
    assert len(set(preds)) > 1                     # the comparison below can tell answers apart
    cache.write_text(lines[0] + lines[1][:len(lines[1]) // 2])    # killed while writing line 2
    calls = counting_generate(monkeypatch)
    resumed, _ = run(tmp_path, *argv)
    assert "resuming: 1 answers on file" in capsys.readouterr().out
    assert len(calls) == 2 and resumed["results"]["base"]["reused_answers"] == 1
    assert {k: v for k, v in resumed["results"]["base"].items() if k != "reused_answers"} == \
        {k: v for k, v in fresh["results"]["base"].items() if k != "reused_answers"}
    assert len(cache.read_text().splitlines()) == 4          # the cut line + two whole ones
    calls.clear()
    again, _ = run(tmp_path, *argv)
    assert not calls and again["results"]["base"]["reused_answers"] == 3
    other, _ = run(tmp_path, *argv[:-1], "5")                # other decoding: nothing reused
    assert len(calls) == 3 and other["results"]["base"]["reused_answers"] == 0


def test_resumed_batched_qa_decodes_the_fresh_runs_batches(tmp_path, monkeypatch):
    """--gen_batch: batches are prepare.py's (longest first) and a batch's answers are reused
    only all together, so a run killed halfway through a batch decodes, when resumed, exactly
    the batches the fresh run decoded after the finished ones (padding can change a greedy
    token, so a batch must never be re-formed)."""
    tok, lm = tiny_tokenizer(), load_model("tiny").eval()
    args = ev.parse_args(["--task", "qa", "--model", "tiny", "--max_new_tokens", "8",
                          "--gen_batch", "2"])
    samples = [{"ids": tok(" ".join(str(i * n) for i in range(n))).input_ids}
               for n in (9, 2, 20, 5, 14, 5)]             # two prompts of one length: a tie
    batches, real = [], ev.generate_batch
    monkeypatch.setattr(ev, "generate_batch", lambda lm_, tok_, prompts, *a, **k: batches.append(
        [len(p) for p in prompts]) or real(lm_, tok_, prompts, *a, **k))
    path = tmp_path / "answers.jsonl"
    fresh = ev.answers(args, lm, tok, samples, "fresh", ev.AnswerCache(str(path), "m"))
    lengths = sorted((len(x["ids"]) for x in samples), reverse=True)
    assert batches == [lengths[0:2], lengths[2:4], lengths[4:6]]
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))           # killed after the first answer of batch 2
    batches.clear()
    cache = ev.AnswerCache(str(path), "m")
    assert ev.answers(args, lm, tok, samples, "resumed", cache) == fresh
    assert batches == [lengths[2:4], lengths[4:6]] and cache.reused == 2
    batches.clear()
    other = ev.AnswerCache(str(path), "m")
    args.gen_batch = 3                            # other batches: nothing is reused
    ev.answers(args, lm, tok, samples, "other", other)
    assert batches == [lengths[0:3], lengths[3:6]] and other.reused == 0


def test_a_rerun_niah_reuses_its_answers(tmp_path, monkeypatch):
    argv = ("--task", "niah", "--lengths", "300", "--depths", "0,100", "--max_new_tokens", "4")
    fresh, _ = run(tmp_path, *argv)
    calls = counting_generate(monkeypatch)
    again, _ = run(tmp_path, *argv)
    assert not calls and again["results"]["base"]["reused_answers"] == 2
    assert again["results"]["base"]["cells"] == fresh["results"]["base"]["cells"]


def test_a_resumed_mvniah_run_keeps_recall_and_head_scores_exactly(tmp_path, monkeypatch):
    argv = ("--task", "mvniah", "--lengths", "800", "--max_samples", "2", "--max_new_tokens", "6")
    # a random model copies nothing (all-zero head scores): give it scores that would show a
    # rounding or a lost value in the cache
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(ev, "head_copy_scores", lambda copies, mask: torch.rand(
        copies.shape[:2], generator=g))
    fresh, _ = run(tmp_path, *argv)
    assert fresh["results"]["base"]["retrieval_score"] > 0
    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    resumed, _ = run(tmp_path, *argv)
    assert not calls and resumed["results"]["base"]["reused_answers"] == 2
    for k in ("recall", "retrieval_score", "head_scores", "lengths", "samples"):
        assert resumed["results"]["base"][k] == fresh["results"]["base"][k]


def test_one_answers_file_keeps_two_models_apart(tmp_path, monkeypatch):
    """--answers: one file for several models; each reuses only its own answers (here the
    same weights with another rope_theta: another model, other keys)."""
    answers = tmp_path / "answers.jsonl"
    argv = ("--task", "qa", "--lengths", "400", "--max_samples", "2", "--max_new_tokens", "6",
            "--answers", str(answers))
    first, _ = run(tmp_path, *argv)
    second, _ = run(tmp_path, *argv, "--rope_theta", "50")
    assert len(answers.read_text().splitlines()) == 4
    calls = counting_generate(monkeypatch)
    for saved, extra in ((first, ()), (second, ("--rope_theta", "50"))):
        again, _ = run(tmp_path, *argv, *extra)
        assert again["results"]["base"]["samples"] == saved["results"]["base"]["samples"]
        assert again["results"]["base"]["reused_answers"] == 2
    assert not calls
    assert len({json.loads(x)["key"] for x in answers.read_text().splitlines()}) == 4


def test_cpu_model_names_family_model_and_kernels(tmp_path):
    # the summaries' "cpu": a VM's model name alone ("AMD EPYC") hid which generation ran
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n"
                    "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: Other\n\n")
    kernels = torch.backends.cpu.get_cpu_capability()
    assert summaries.cpu_model(str(info)) == f"AMD EPYC (family 25 model 17), torch {kernels}"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n")   # no numbers
    assert summaries.cpu_model(str(info)) == f"Intel(R) Xeon(R) Processor, torch {kernels}"
    assert summaries.cpu_model(str(tmp_path / "missing")).endswith(f", torch {kernels}")
