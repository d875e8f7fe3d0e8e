"""
model_patch.py: the packed forward against the authors' layout (response_logps_unpacked:
M+1 separate rows of prefix + response, full logits, loss.sequence_logps), on tiny
random-initialised Llama and Mistral models in float32, plus the RoPE helpers.

The models use initializer_range 0.1 (not 0.02) so that attention matters: a response that
wrongly sees another response moves its mean log-prob by ~0.1, four orders of magnitude
above the 1e-5 tolerance (test_the_tolerance_detects_a_response_seeing_another_response).
"""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import model_patch
import models
from loss import logo_loss
from positions import pack_position_ids, synthesize_position_ids

V = 261                          # the tiny byte-level tokenizer's vocabulary
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"]


# The Mistral variants get a real sliding window: longer than any prefix + response row
# of sample() (at most 63 tokens), so it never binds in the authors' layout, but shorter
# than most packed rows (up to 90 tokens). A packed path that applied it in packed
# coordinates would be wrong; the guard that refuses shorter windows is tested below.
MISTRAL_WINDOW = 64


def tiny_model(arch="llama", attn="sdpa", seed=0, **overrides):
    if arch == "mistral":
        overrides = {"sliding_window": MISTRAL_WINDOW, **overrides}
    config = models.tiny_config(V, arch=arch, initializer_range=0.1, **overrides)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


def lora(model, seed=0):
    """LoRA on q,k,v,o and the embeddings, with B != 0 so that the adapters change the
    output and every adapter weight gets a non-zero gradient."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                            init_lora_weights=False))


def packed_row(chunk_lens, question_len, response_lens, target_len, mode="continuous", seed=0):
    """One packed row with synthesized positions: (ids, positions, segments), each (T,)."""
    g = torch.Generator().manual_seed(seed)
    ctx = synthesize_position_ids(chunk_lens, target_len - question_len - max(response_lens), mode, g)
    pos = pack_position_ids(ctx, question_len, response_lens)
    seg = torch.cat([torch.zeros(sum(chunk_lens) + question_len, dtype=torch.long)] +
                    [torch.full((r,), j + 1) for j, r in enumerate(response_lens)])
    return torch.randint(5, V, pos.shape, generator=g), pos, seg


def batch(rows):
    """Right-pad rows to one length: segment -1, token 2 (pad), position 0."""
    T = max(len(r[0]) for r in rows)
    out = [torch.stack([torch.nn.functional.pad(r[i], (0, T - len(r[i])), value=v) for r in rows])
           for i, v in ((0, 2), (1, 0), (2, -1))]
    return tuple(out)


def sample(num_resp, B, seed=0):
    """B rows of different lengths (different prefix lengths too), num_resp = 1 + M."""
    rows = [packed_row([12, 12, 12, 7], 5, [6 + 3 * j for j in range(num_resp)], 4096, seed=seed),
            packed_row([9, 9, 4], 4, [4 + j for j in range(num_resp)], 512, mode="sparse", seed=seed + 1)]
    return batch(rows[:B])


def logo(logps):
    return logo_loss(logps[:, 0], logps[:, 1:], beta=2.5, gamma=0.5, sft_weight=0.1)[0]


# ----------------------------------------------------------------------------------------
# Forward parity.

@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("num_rejected", [1, 2, 3])
def test_packed_logps_equal_unpacked_for_every_attention_path(arch, attn, num_rejected):
    model = tiny_model(arch, attn)
    for B in (1, 2):
        ids, pos, seg = sample(1 + num_rejected, B)
        with torch.no_grad():
            ref, ref_counts = model_patch.response_logps_unpacked(model, ids, pos, seg)
            for attention in ("mask", "split"):
                logps, counts = model_patch.response_logps(model, ids, pos, seg, attention=attention)
                assert logps.shape == (B, 1 + num_rejected) and logps.dtype == torch.float32
                torch.testing.assert_close(logps, ref, rtol=0, atol=1e-5)
                assert counts.tolist() == ref_counts.tolist()
        expected = [[6 + 3 * j for j in range(1 + num_rejected)], [4 + j for j in range(1 + num_rejected)]]
        assert counts.tolist() == expected[:B]


def test_the_tolerance_detects_a_response_seeing_another_response():
    """A plain causal pass over the packed row (rejected responses see the chosen one) must
    miss the reference by far more than 1e-5, or the parity tests above prove nothing."""
    model = tiny_model()
    ids, pos, seg = sample(3, 1)
    with torch.no_grad():
        ref, _ = model_patch.response_logps_unpacked(model, ids, pos, seg)
        hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).last_hidden_state
        rows, src, dst, s = model_patch.response_targets(seg)
        lp = model_patch.token_logps(model.lm_head(hidden[rows, src]), ids[rows, dst])
        wrong = torch.stack([lp[s == j].mean() for j in (1, 2, 3)])
    assert abs(wrong[0] - ref[0, 0]) < 1e-5          # the chosen one sees only the prefix anyway
    assert (wrong[1:] - ref[0, 1:]).abs().min() > 1e-3


def test_transformers_packed_sequence_heuristic_is_never_consulted(monkeypatch):
    """transformers reads a position-id reset (every response start) as the start of a new
    packed sequence when no mask is given; none of our paths may let it look."""
    import transformers.masking_utils as masking

    def tripwire(position_ids):
        raise AssertionError("find_packed_sequence_indices was called")
    monkeypatch.setattr(masking, "find_packed_sequence_indices", tripwire)
    model = tiny_model()
    ids, pos, seg = sample(3, 2)
    with torch.no_grad():
        model_patch.response_logps_unpacked(model, ids, pos, seg)
        for attention in ("mask", "split"):
            model_patch.response_logps(model, ids, pos, seg, attention=attention)
        with pytest.raises(AssertionError, match="tripwire|find_packed"):   # the wire is live
            model(input_ids=ids, position_ids=pos, use_cache=False)


def test_first_response_token_is_predicted_from_the_last_prefix_token():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1]])
    rows, src, dst, s = model_patch.response_targets(seg)
    assert dst.tolist() == [3, 4, 5, 6, 7]
    assert src.tolist() == [2, 3, 2, 5, 6]           # 5 <- 2: not from the chosen's last token
    assert s.tolist() == [1, 1, 2, 2, 2]


@pytest.mark.parametrize("bad", [[1, 1, 0, 0, 2], [0, 0, 2, 2, 1], [0, 0, 1, -1, 2], [0, 1, 1, 3, 3],
                                 [0, 1, 0, 1, 2], [-1, 0, 1, 2, 2], [0, 0, 0, 0, 0], [0, 0, 0, -1, -1],
                                 [-1, -1, -1, -1, -1]])
def test_response_logps_rejects_segment_ids_out_of_the_packed_layout(bad):
    model = tiny_model()
    seg = torch.tensor([bad])
    with pytest.raises(ValueError, match="segment ids"):
        model_patch.response_logps(model, torch.full_like(seg, 7), torch.arange(5)[None], seg)


def rule_mask(seg):
    """The attention rule written out token by token, independent of model_patch: (T, T) bool
    for one row of segment ids (a list)."""
    T = len(seg)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            if seg[q] == -1:
                allowed[q, k] = q == k                           # padding: only itself
            elif seg[q] == 0:
                allowed[q, k] = seg[k] == 0 and k <= q           # prefix: causal on the prefix
            else:                                                # response: prefix + own past
                allowed[q, k] = k <= q and (seg[k] == 0 or seg[k] == seg[q])
    return allowed


def test_an_architecture_outside_the_tested_ones_is_refused_with_one_line():
    """A tiny Gemma-2: its final-logit softcapping happens in Gemma2ForCausalLM.forward,
    which the packed forward (lm.model, then lm.lm_head) skips: refused, not wrong."""
    from transformers import Gemma2Config
    config = Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          final_logit_softcapping=0.5, sliding_window=4096)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    ids, pos, seg = sample(3, 1)
    with torch.no_grad():
        ref, _ = model_patch.response_logps_unpacked(model, ids, pos, seg)   # still available
        # what the packed forward would compute: no softcapping, far from the reference
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state
        raw = torch.log_softmax(model.lm_head(hidden[0, 47:48]).double(), -1)[0, ids[0, 48]]
        capped = torch.log_softmax(model(input_ids=ids[:, :49], position_ids=pos[:, :49]).logits[0, 47].double(), -1)[ids[0, 48]]
        assert abs(raw - capped) > 1e-3
        for attention in ("mask", "split", "flex"):
            with pytest.raises(ValueError, match=r"tested for LlamaForCausalLM, MistralForCausalLM only, "
                                                 r"not Gemma2ForCausalLM") as e:
                model_patch.response_logps(model, ids, pos, seg, attention=attention)
            assert "\n" not in str(e.value)
    assert torch.isfinite(ref).all()


def test_a_sliding_window_shorter_than_a_prefix_plus_response_row_is_refused_by_every_path():
    model = tiny_model("mistral", sliding_window=40)  # rows of sample(): prefix + response <= 63
    ids, pos, seg = sample(3, 2)
    with torch.no_grad():
        ref, _ = model_patch.response_logps_unpacked(model, ids, pos, seg)
        model.config.sliding_window = None          # the window matters: without it, other numbers
        unwindowed, _ = model_patch.response_logps_unpacked(model, ids, pos, seg)
        model.config.sliding_window = 40
        assert (ref - unwindowed).abs().max() > 1e-3
        for attention in ("mask", "split", "flex"):
            with pytest.raises(ValueError, match="more than the model's sliding window of 40"):
                model_patch.response_logps(model, ids, pos, seg, attention=attention)


def test_dense_mask_matches_the_rule_written_out_token_by_token():
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, -1])
    allowed = model_patch.packed_attention_mask(seg[None], torch.float32)[0, 0] == 0
    assert torch.equal(allowed, rule_mask(seg.tolist()))


# ----------------------------------------------------------------------------------------
# Gradients through LoRA.

@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_lora_gradients_agree_between_packed_and_unpacked(arch, checkpointing):
    model = lora(tiny_model(arch))
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    ids, pos, seg = sample(3, 2)
    grads = {}
    for name, fn in [("unpacked", model_patch.response_logps_unpacked),
                     ("split", lambda *a: model_patch.response_logps(*a, attention="split")),
                     ("mask", lambda *a: model_patch.response_logps(*a, attention="mask"))]:
        model.zero_grad()
        logps, _ = fn(model, ids, pos, seg)
        logo(logps).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if name == "unpacked":
            ref_logps = logps.detach()
        else:
            torch.testing.assert_close(logps.detach(), ref_logps, rtol=0, atol=1e-5)
    ref = grads["unpacked"]
    assert len(ref) == 2 * (4 * 2 + 1)               # lora_A/B x (q,k,v,o x 2 layers + embeddings)
    for name in ("split", "mask"):
        for n, g in ref.items():
            assert g.norm() > 0, n
            rel = ((grads[name][n] - g).norm() / g.norm()).item()
            assert rel < 1e-4, (name, n, rel)


def test_a_switched_model_runs_ordinary_calls_exactly_as_before():
    """use_packed_attention keeps generation and evaluation intact: without packed_layout,
    the registered function is the model's own attention with the mask transformers built
    (here with left padding, which a wrong fallback would get wrong)."""
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn=attn)
        ids = torch.randint(5, V, (2, 20))
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits
            model_patch.use_packed_attention(model)
            assert model.config._attn_implementation == "logo_" + attn
            after = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------
# FlexAttention: the mask on CPU (torch runs flex uncompiled there, forward only), the
# whole path on CUDA.

def test_flex_mask_mod_builds_the_mask_of_the_rule_written_out_token_by_token():
    from torch.nn.attention.flex_attention import create_mask
    _, _, seg = sample(3, 2)                         # two rows, different lengths, padding
    flex = create_mask(model_patch.packed_mask_mod(seg), 2, 1, seg.shape[1], seg.shape[1], device="cpu")
    assert flex.shape == (2, 1, seg.shape[1], seg.shape[1])
    for b in range(2):
        assert torch.equal(flex[b, 0], rule_mask(seg[b].tolist())), b


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_flex_logps_equal_unpacked_on_cpu_forward(arch):
    model = tiny_model(arch)
    ids, pos, seg = sample(3, 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        ref, _ = model_patch.response_logps_unpacked(model, ids, pos, seg)
        logps, _ = model_patch.response_logps(model, ids, pos, seg, attention="flex")
    torch.testing.assert_close(logps, ref, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_logps_and_lora_gradients_equal_unpacked_on_cuda():
    model = lora(tiny_model()).cuda()
    ids, pos, seg = (x.cuda() for x in sample(3, 2))
    out = {}
    for name, fn in [("unpacked", model_patch.response_logps_unpacked),
                     ("auto", model_patch.response_logps)]:
        model.zero_grad()
        logps, _ = fn(model, ids, pos, seg)
        logo(logps).backward()
        out[name] = logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(out["auto"][0], out["unpacked"][0], rtol=0, atol=1e-4)  # TF32 matmuls
    for n, g in out["unpacked"][1].items():
        assert ((out["auto"][1][n] - g).norm() / g.norm()).item() < 1e-3, n


# ----------------------------------------------------------------------------------------
# Long positions and RoPE settings.

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_positions_up_to_131072_run_forward_and_backward(arch):
    # mistral: window 300 >= prefix + longest response (264 + 20), < the packed row (312)
    model = lora(tiny_model(arch, max_position_embeddings=131072,
                            **({"sliding_window": 300} if arch == "mistral" else {})))
    model.train()
    ids, pos, seg = batch([packed_row([32] * 8, 8, [16, 12, 20], 131072)])
    assert pos.max() > 120_000 and pos.max() < 131072
    logps = {}
    for name, fn in [("unpacked", model_patch.response_logps_unpacked),
                     ("split", model_patch.response_logps)]:
        model.zero_grad()
        logps[name], _ = fn(model, ids, pos, seg)
        logo(logps[name]).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(logps["split"]).all()
    torch.testing.assert_close(logps["split"].detach(), logps["unpacked"].detach(), rtol=0, atol=1e-5)


def test_rope_theta_from_a_preset_reaches_the_rotary_tables():
    model = models.load_model("tiny", rope_theta=1e6)
    assert model_patch.get_rope_theta(model.config) == 1e6
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    expected = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------
# bench.py, on the tiny model: both layouts run and agree (its numbers are not asserted:
# speed targets live in bench.py's output, not in timed tests).

def test_bench_runs_both_layouts_and_they_agree_on_the_tiny_model():
    import re
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "bench.py", "--model", "tiny", "--dtype", "float32",
                          "--num_chunks", "4", "--chunk_len", "32", "--response_len", "16",
                          "--warmup", "0", "--steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"unpacked \(M\+1 rows\)\s+528 ", out.stdout)        # 3 x (4*32 + 32 + 16)
    assert re.search(r"packed \(split\)\s+208 ", out.stdout)               # 4*32 + 32 + 3*16
    diff = float(re.search(r"max \|packed - unpacked\| = (\S+)", out.stdout).group(1))
    assert diff < 1e-5



def test_bench_defaults_to_float32_on_cpu_even_for_a_bf16_preset():
    # smollm2-135m's preset dtype is bfloat16; a CPU without native bf16 runs it several times
    # slower than float32, so bench.py (like train.py) measures float32 unless told otherwise
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "bench.py", "--model", "smollm2-135m", "--num_chunks", "2",
                          "--chunk_len", "16", "--response_len", "8", "--warmup", "0", "--steps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "smollm2-135m float32 on cpu" in out.stdout.splitlines()[0]
