"""
The GPU training path's FlexAttention, run on a CPU: packed rows through compiled
create_block_mask + flex_attention, forward and backward, against the unpacked layout.

torch refuses flex's backward on CPU (flex_attention._validate_device), and inductor's CPU
flex has no backward either. Inside these tests only, the guard is lifted and flex is
compiled with the aot_eager backend (dynamo + AOT autograd, no Triton): the same traced
graphs as on a GPU (block mask, GQA, the checkpointed recompute), run by torch's reference
implementation. Only the Triton kernel itself needs a GPU (bench.py --device_check).
"""

import json
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import model_patch
from test_model_patch import batch, logo, lora, packed_row, tiny_model


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """Compile flex on CPU with `backend` (default aot_eager), guard lifted, caches fresh."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)

    def use(backend="aot_eager"):
        monkeypatch.setitem(model_patch.FLEX_COMPILE, "cpu", backend)
        model_patch._compiled.cache_clear()
        torch._dynamo.reset()
    yield use
    model_patch._compiled.cache_clear()
    torch._dynamo.reset()


def long_rows(num_resp, lengths=((120, 130, 57), (64, 90, 30)), seed=0):
    """Two rows over several 128-token blocks (prefix 300-400 tokens), of different lengths
    (so the batch is padded), num_resp = 1 + M responses of 9-40 tokens each."""
    rows = [packed_row(list(chunks), 8, [9 + 11 * j + 3 * i for j in range(num_resp)], 4096,
                       seed=seed + i) for i, chunks in enumerate(lengths)]
    return batch(rows)


def grads_and_logps(model, fn, ids, pos, seg):
    model.zero_grad()
    logps, _ = fn(model, ids, pos, seg)
    logo(logps).backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# cuda: the same test with the real kernel (inductor, Triton), run by tests/device_check.py.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("num_rejected", [1, 2, 3])
def test_compiled_flex_logps_and_lora_gradients_equal_unpacked_with_checkpointing(flex_on_cpu, num_rejected,
                                                                                   device):
    flex_on_cpu()
    model = lora(tiny_model()).to(device)            # GQA: 4 query heads, 2 key/value heads
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids, pos, seg = (x.to(device) for x in long_rows(1 + num_rejected))
    assert ids.shape[1] > 2 * model_patch.FLEX_BLOCK and (seg == -1).any()   # multi-block, padded
    ref_logps, ref = grads_and_logps(model, model_patch.response_logps_unpacked, ids, pos, seg)
    logps, got = grads_and_logps(model, lambda *a: model_patch.response_logps(*a, attention="flex"),
                                 ids, pos, seg)
    # CPU: float32 throughout; CUDA: the Triton kernel's own summation order
    atol, rtol = (1e-5, 1e-4) if device == "cpu" else (1e-4, 1e-3)
    torch.testing.assert_close(logps, ref_logps, rtol=0, atol=atol)
    assert len(ref) == 2 * (4 * 2 + 1)               # lora_A/B x (q,k,v,o x 2 layers + embeddings)
    for n, g in ref.items():
        assert g.norm() > 0, n
        rel = ((got[n] - g).norm() / g.norm()).item()
        assert rel < rtol, (n, rel)


def test_the_flex_comparison_detects_a_mask_that_lets_a_response_see_another(flex_on_cpu, monkeypatch):
    """The test above can fail: a mask_mod that lets responses see each other moves the log-probs."""
    flex_on_cpu()
    model = lora(tiny_model())
    ids, pos, seg = long_rows(3)
    ref, _ = model_patch.response_logps_unpacked(model, ids, pos, seg)

    def leaky(segment_ids):
        def mask_mod(b, h, q, kv):
            sq, sk = segment_ids[b, q], segment_ids[b, kv]
            return ((kv <= q) & (((sk >= 0) & (sq >= 0)))) | (q == kv)
        return mask_mod
    monkeypatch.setattr(model_patch, "packed_mask_mod", leaky)
    logps, _ = model_patch.response_logps(model, ids, pos, seg, attention="flex")
    assert (logps - ref)[:, 1:].abs().max() > 1e-3


def test_flex_compiles_once_per_128_token_bucket_and_grad_mode(flex_on_cpu):
    """Static shapes: batches of 8 lengths in 3 buckets of 128 tokens compile each of
    create_block_mask and flex_attention once per bucket (6 graphs), plus once per bucket
    used without grad (the final check pass, evaluation). Unpadded, every length compiled
    anew (16 graphs); padded but with dynamic shapes, the second bucket compiled a dynamic
    graph (4 graphs) that then ran every length with the slower dynamic-shape kernel."""
    counter = CompileCounterWithBackend("aot_eager")
    flex_on_cpu(counter)
    model = lora(tiny_model(num_hidden_layers=1))
    model.train()
    # prefix + responses: 320..380 tokens (bucket 384), 392..496 (bucket 512), 594 (bucket 640)
    shapes = [(120, 130, 20), (120, 130, 40), (64, 90, 110), (130, 130, 80), (120, 130, 55),
              (200, 150, 100), (250, 200, 100), (120, 130, 38)]
    lengths = set()
    for i, chunks in enumerate(shapes):
        ids, pos, seg = batch([packed_row(list(chunks), 8, [9, 12, 15], 4096, seed=i),
                               packed_row([50, 60], 8, [9, 12, 15], 4096, seed=i + 50)])
        lengths.add(ids.shape[1])
        logps, _ = model_patch.response_logps(model, ids, pos, seg, attention="flex")
        logo(logps).backward()
    buckets = {-(-n // model_patch.FLEX_BLOCK) for n in lengths}
    assert len(lengths) == 8 and len(buckets) == 3
    assert counter.frame_count == 2 * len(buckets)
    with torch.no_grad():                            # a new grad mode: one more per function
        model_patch.response_logps(model, ids, pos, seg, attention="flex")
    assert counter.frame_count == 2 * len(buckets) + 2


def test_train_py_trains_through_compiled_flex_under_zero3_with_checkpointing_as_through_split(
        flex_on_cpu, tmp_path, monkeypatch):
    """train.py's own loop (DeepSpeed ZeRO-3, every tensor partitioned, non-reentrant
    checkpointing) over rows of 1-3 flex blocks: the same losses and log-probs as the split
    path. flex runs in this process (the guard lifted), split in a plain train.py process
    (DeepSpeed cannot initialise twice in one process)."""
    import train
    from train_helpers import read_log, run_train, write_tiny_data
    flex_on_cpu()
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    write_tiny_data(tmp_path / "data", rows=4, prefix_lens=(100, 300))
    argv = ["--model", "tiny", "--data_dir", str(tmp_path / "data"), "--gradient_checkpointing",
            "--zero_stage", "3", "--zero3_persistence_threshold", "0", "--max_steps", "3", "--global_batch", "2"]
    r = run_train(*argv, "--out_dir", tmp_path / "split", "--attention", "split")
    assert r.returncode == 0, r.stderr[-3000:]
    train.main(argv + ["--out_dir", str(tmp_path / "flex"), "--attention", "flex"])
    (flex, split) = (read_log(tmp_path / a) for a in ("flex", "split"))
    assert [r["step"] for r in flex] == [1, 2, 3] and not any(r["skipped"] for r in flex)
    for a, b in zip(flex, split):
        for k in ("loss", "reward_margin", "grad_norm"):
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (a["step"], k)
    check = [json.loads((tmp_path / a / "final" / "logo_config.json").read_text())["check_logps"]["logps"]
             for a in ("flex", "split")]
    torch.testing.assert_close(torch.tensor(check[0]), torch.tensor(check[1]), rtol=0, atol=1e-5)
