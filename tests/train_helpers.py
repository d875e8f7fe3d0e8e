"""Shared by test_train.py and test_faults_train.py: a small prepared data set for the tiny
preset written the way prepare.py writes it (shards + meta.json), a train.py runner, and
faults planted in a train.py process (and each process under the deepspeed launcher) by a
sitecustomize.py that patches a function at interpreter start. Also the tiny model's answers
counted as finished, for the tests that run prepare.py."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

import models
from positions import pack_position_ids, synthesize_position_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tiny_data(out_dir, rows=8, num_rejected=2, target_len=4096, rows_per_shard=5, seed=0,
                    prefix_lens=(64, 128)):
    """Rows of prefix (random bytes, prefix_lens tokens: 64-128) | chosen | rejected... (6-16
    tokens each, so micro-batches need padding). The chosen response copies a piece of the
    prefix, the rejected ones are random: something to learn. Positions synthesized as
    prepare.py does."""
    os.makedirs(out_dir, exist_ok=True)
    tok = models.tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)
    V, Q = len(tok), 8                                        # vocabulary, question tokens
    packed = []
    for _ in range(rows):
        P = int(torch.randint(prefix_lens[0], prefix_lens[1] + 1, (1,), generator=g))  # context + question
        lens = torch.randint(6, 17, (1 + num_rejected,), generator=g).tolist()
        prefix = torch.randint(5, V, (P,), generator=g)
        start = int(torch.randint(0, P - lens[0], (1,), generator=g))
        responses = [prefix[start:start + lens[0]]] + [torch.randint(5, V, (n,), generator=g)
                                                       for n in lens[1:]]
        ctx = synthesize_position_ids([(P - Q) // 2, P - Q - (P - Q) // 2],
                                      target_len - Q - max(lens), "continuous", g)
        pos = pack_position_ids(ctx, Q, lens)
        seg = torch.cat([torch.zeros(P)] + [torch.full((n,), j + 1) for j, n in enumerate(lens)])
        packed.append((torch.cat([prefix, *responses]), pos, seg))
    for s in range(0, rows, rows_per_shard):
        part = packed[s:s + rows_per_shard]
        save_file({"input_ids": torch.cat([p[0] for p in part]).numpy().astype(np.int32),
                   "position_ids": torch.cat([p[1] for p in part]).numpy().astype(np.int32),
                   "segment_ids": torch.cat([p[2] for p in part]).numpy().astype(np.int8),
                   "offsets": np.cumsum([0] + [len(p[0]) for p in part]).astype(np.int64)},
                  os.path.join(out_dir, f"shard_{s // rows_per_shard:05d}.safetensors"))
    meta = dict(format_version=1, model="tiny", model_path="tiny", tokenizer=tok.name_or_path,
                tokenizer_fingerprint=models.tokenizer_fingerprint(tok), vocab_size=V,
                num_rejected=num_rejected, target_len=target_len, chunk_len=64, num_chunks=2,
                args={}, counts={"kept": rows})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def run_train(*args, launcher=None, env=None, timeout=600):
    """python train.py ARGS (or under a launcher command list); returns CompletedProcess."""
    return run_script("train.py", *args, launcher=launcher, env=env, timeout=timeout)


def run_script(name, *args, launcher=None, env=None, timeout=600):
    """python NAME ARGS from the repo root, without inherited rendezvous variables."""
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, name), *map(str, args)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def planted(tmp_path, code):
    """env for run_train: PYTHONPATH with a sitecustomize.py holding `code`, which every
    Python process started with it runs before anything else (the repo root follows, so
    the code can import the repo's modules and patch their functions)."""
    folder = os.path.join(str(tmp_path), "faults")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(code)
    return {"PYTHONPATH": os.pathsep.join([folder, ROOT, os.environ.get("PYTHONPATH", "")])}


def answers_finished(generate):
    """models.generate_batch with every answer counted as finished. The random tiny model never writes a
    sentence, so prepare.py would drop every answer its budget cuts (a real model's: trimmed to the last one)."""
    return lambda *a, **k: [(toks, True) for toks, _ in generate(*a, **k)]


# The same in a prepare.py process: env=planted(tmp_path, ANSWERS_FINISHED).
ANSWERS_FINISHED = """
import models
models.generate_batch = (lambda g: lambda *a, **k: [(t, True) for t, _ in g(*a, **k)])(models.generate_batch)
"""


def nan_at_steps(tmp_path, steps, micro_batches_per_step=2):
    """A planted fault: the loss is NaN at these optimiser steps (1-based). train.py calls
    loss.logo_loss once per micro-batch, so call k (0-based) belongs to step
    k // micro_batches_per_step + 1 (the tiny preset: 2 rows of 1 per step)."""
    return planted(tmp_path, f"""
import loss
_logo_loss, calls = loss.logo_loss, []
def logo_loss(*a, **k):
    value, metrics = _logo_loss(*a, **k)
    calls.append(1)
    if (len(calls) - 1) // {micro_batches_per_step} + 1 in {sorted(steps)!r}:
        value = value * float("nan")
    return value, metrics
loss.logo_loss = logo_loss
""")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


_BASELINE = {}


def baseline(tmp_path_factory):
    """One uninterrupted 20-step ZeRO-0 run shared by both test files:
    (data_dir, out_dir). Other runs are compared against its log to 1e-5."""
    if not _BASELINE:
        root = tmp_path_factory.mktemp("baseline")
        data, out = str(root / "data"), str(root / "out")
        write_tiny_data(data)
        r = run_train("--model", "tiny", "--data_dir", data, "--out_dir", out, "--save_every", 10)
        assert r.returncode == 0, r.stderr[-3000:]
        _BASELINE.update(data=data, out=out, stdout=r.stdout)
    return _BASELINE["data"], _BASELINE["out"]


def reference_logps(model, ids, pos, seg):
    """Mean log-prob of each response of one packed row, computed the plain way: for every
    response its own sequence prefix + response, full logits, log_softmax, next-token shift
    by hand. Independent of model_patch's packing and of loss.py. (1+M,) float64."""
    out = []
    for j in range(1, int(seg.max()) + 1):
        keep = (seg == 0) | (seg == j)
        x, p, s = ids[keep], pos[keep], seg[keep]
        with torch.no_grad():
            logits = model(input_ids=x[None], position_ids=p[None],
                           attention_mask=torch.ones_like(x)[None]).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, x[1:, None])[:, 0]   # predicts x[t+1]
        out.append(lp[s[1:] == j].mean())
    return torch.stack(out)


def read_rows(data_dir, rows):
    """Rows of the shards by global index, as int64 tensors (ids, pos, seg)."""
    from safetensors.torch import load_file
    shards = sorted(f for f in os.listdir(data_dir) if f.startswith("shard_"))
    flat = []
    for name in shards:
        t = load_file(os.path.join(data_dir, name))
        off = t["offsets"].tolist()
        for a, b in zip(off[:-1], off[1:]):
            flat.append(tuple(t[k][a:b].long() for k in ("input_ids", "position_ids", "segment_ids")))
    return [flat[i] for i in rows]
