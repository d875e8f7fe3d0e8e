"""
Train a LoRA adapter with the LOGO loss (Tang et al. 2024, arXiv 2410.18533): one plain
DeepSpeed loop, from this laptop CPU to a GPU node. No Trainer, no callbacks: read it
top to bottom.

Reads   <data_dir>/meta.json + shard_*.safetensors     (written by prepare.py)
Writes  <out_dir>/run_config.json      the resolved configuration (written at start)
        <out_dir>/log.jsonl            one JSON object per optimiser step
        <out_dir>/checkpoints/step_N/  DeepSpeed checkpoints (LoRA + optimiser state only)
        <out_dir>/final/               the peft adapter (safetensors), tokenizer, logo_config.json
        <out_dir>/merged/              with --merge: the base with the adapter merged in

    python train.py                                    # smollm2-135m on data/demo (demo.sh: --max_steps 12)
    python train.py --model tiny --data_dir data/tiny --max_steps 20
    deepspeed --num_gpus 8 train.py --model llama3-8b-80k --data_dir data/llama3 --gradient_checkpointing
    python train.py --model tiny --data_dir data/tiny --resume      # continue runs/logo exactly

The preset's defaults (python train.py after a plain python prepare.py) run 48 steps of 2
rows (~2.1K tokens each, float32 on CPU) in 17-19 minutes on 2 cores; demo.sh runs 12 steps
of 1K-token rows in ~2-3 minutes. It prints one line per step and ends with a summary
comparing the first and last quarters of the steps (demo.sh, measured: loss 2.01 -> 0.50,
reward_margin -0.37 -> 4.13, reward_accuracy 0.50 -> 0.83).

One optimiser step = global_batch packed rows (prefix | chosen | rejected 1..M, see
model_patch.py), split into micro-batches of micro_batch rows per process and
global_batch / (micro_batch * world_size) gradient-accumulation steps. The row order,
the learning rate and the dropout RNG are functions of (seed, step) alone, so --resume
from a checkpoint replays exactly what an uninterrupted run would have done.

RoPE rule (checked before anything heavy loads): data made for a window of K = target_len
positions needs RoPE settings that cover K. With the checkpoint's rope_theta that is its
native window (the preset's native_len, else max_position_embeddings). A raised
--rope_theta stretches it by the NTK-aware factor s = (theta / theta_native)^((d-2)/d)
(d = head dim: the longest RoPE wavelength grows by exactly s), capped at 8x, the largest
extension in the paper (8K -> 64K, 4K -> 32K). Beyond that train.py stops and names the
smallest rope_theta that would do.

Faults: bad input stops with one `error: <what> (<file>); <what to do>` line and exit
status 2 before the model loads. A non-finite loss drops its whole step (no update, AdamW
moments untouched; the data and the schedule move on) and is counted in the log;
--max_nonfinite_steps in a row stop the run. Checkpoints and the exported adapter are
written under .tmp names and renamed when complete, so a kill never leaves one that looks
finished. DeepSpeed's own loader unpickles anything; train.py swaps in
torch.load(weights_only=True) with an explicit allowlist (see safe_torch_load).
"""

import argparse
import functools
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import sys
import time
import warnings

import numpy as np
import torch
from safetensors import safe_open

import model_patch
import models
from loss import logo_loss

FORMAT_VERSION = 1          # of the data prepare.py writes; meta.json carries it
MAX_ROPE_EXTENSION = 8      # the paper extends a window at most 8x (Sec. 4.1)


class UserError(Exception):
    """Bad input or environment: printed as one `error: ...` line, exit status 2."""


# ----------------------------------------------------------------------------------------
# Configuration: flags left at None take the preset's value (models.MODELS).

# Flags that default to the preset's value (None on the command line); the others have plain
# argparse defaults. Paper presets: beta 10, gamma 3 (Llama-3, Sec. 4.1), lambda 0.1; LoRA
# r 32, alpha 16, lr 5e-7, 1200 steps of 64 rows, warmup 120 (the released code's, LOGO_SPEC 4).
PRESET_KEYS = ["beta", "gamma", "sft_weight", "lr", "warmup_steps", "max_steps", "global_batch",
               "micro_batch", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
               "rope_theta", "dtype"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data/demo", help="folder prepare.py wrote (meta.json + shards)")
    g.add_argument("--out_dir", default=None, help="run folder; default runs/<loss> (runs/logo, runs/sft)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m",
                   help=f"preset ({', '.join(models.MODELS)}), local folder or hub id")
    g.add_argument("--rope_theta", type=float, default=None,
                   help="RoPE base; default the preset's (None keeps the checkpoint's)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights and compute; default the preset's on GPU, float32 on CPU "
                        "(bf16: DeepSpeed bf16 with fp32 master weights)")
    g.add_argument("--attention", choices=["auto", "split", "flex", "mask"], default="auto",
                   help="packed attention kernel of model_patch.response_logps")
    g.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub")
    g = p.add_argument_group("LoRA (peft)")
    g.add_argument("--lora_r", type=int, default=None, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (update scaled by alpha/r)")
    g.add_argument("--lora_dropout", type=float, default=None, help="dropout on the LoRA input")
    g.add_argument("--lora_targets", default=None,
                   help="comma-separated module names (paper: attention projections + embed_tokens)")
    g = p.add_argument_group("LOGO loss (paper Eq. 2-3)")
    g.add_argument("--loss", choices=["logo", "sft"], default="logo",
                   help="logo: Eq. 2 + lambda * SFT (Eq. 3); sft: mean NLL of the chosen response "
                        "only (the paper's 'Instruct Tuning (Partial)' baseline)")
    g.add_argument("--beta", type=float, default=None, help="beta: reward scale, Eq. 2")
    g.add_argument("--gamma", type=float, default=None, help="gamma: absolute reward margin, Eq. 2")
    # The two conventions: --gamma 3 with --beta 10 equals --gamma_beta_ratio 0.3. Passing 3 as
    # a ratio means a margin of 30: the preference term never saturates (ERRORS.md).
    g.add_argument("--gamma_beta_ratio", type=float, default=None,
                   help="gamma given as gamma/beta (SimPO's and the released code's convention)")
    g.add_argument("--sft_weight", type=float, default=None, help="lambda: weight of the SFT term, Eq. 3")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_steps", type=int, default=None, help="optimiser steps")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    g.add_argument("--lr_schedule", choices=["cosine", "constant"], default="cosine",
                   help="after the linear warmup")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine ends at lr * this")
    g.add_argument("--warmup_steps", type=int, default=None, help="linear warmup steps")
    g.add_argument("--global_batch", type=int, default=None, help="rows per optimiser step, all processes")
    g.add_argument("--micro_batch", type=int, default=None, help="rows per forward pass per process")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="LoRA init, row order, dropout")
    g = p.add_argument_group("checkpoints and export")
    g.add_argument("--save_every", type=int, default=100, help="checkpoint every N steps")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    g.add_argument("--stop_after", type=int, default=None,
                   help="checkpoint and stop after this step (the schedule still spans max_steps)")
    g.add_argument("--overwrite", action="store_true", help="delete an existing run in out_dir first")
    g.add_argument("--merge", action="store_true", help="also save the merged model to out_dir/merged")
    g = p.add_argument_group("system")
    # The paper trains with ZeRO-3 (Sec. 4.1). On CPU the default is 0; ZeRO-3 runs there too
    # (tests/test_train.py).
    g.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="DeepSpeed ZeRO stage; default 3 on GPU, 0 on CPU")
    g.add_argument("--offload_optimizer", action="store_true", help="ZeRO: optimiser state in CPU memory")
    g.add_argument("--offload_params", action="store_true", help="ZeRO-3: parameters in CPU memory")
    g.add_argument("--zero3_persistence_threshold", type=int, default=None,
                   help="ZeRO-3: tensors with fewer elements stay whole on every process "
                        "(DeepSpeed's stage3_param_persistence_threshold; default DeepSpeed's 1e5; "
                        "0 partitions every tensor, as the tests do)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward (needed for 8K+ rows on a GPU)")
    g.add_argument("--max_nonfinite_steps", type=int, default=3,
                   help="stop after this many non-finite losses in a row (each is skipped)")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")
    g.add_argument("--tensorboard", action="store_true", help="also log to out_dir/tensorboard")
    g.add_argument("--print_ds_config", action="store_true", help="print the DeepSpeed config and exit")
    # deepspeed train.py appends --local_rank=N, so argparse must accept it; the rank used is
    # RANK from the environment (main).
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    g.add_argument("--debug_nan_steps", default="",
                   help="fault injection for tests: make the loss NaN at these steps (comma-separated)")
    g.add_argument("--debug_unshared_out_dir", action="store_true",
                   help="fault injection for tests: ranks > 0 look at another folder than rank 0, "
                        "as nodes without a shared filesystem would")
    return p.parse_args(argv)


def resolve_config(args):
    """Flags + preset -> one flat dict: what runs, what is printed, what is saved."""
    try:
        preset = models.resolve_model(args.model)
    except ValueError as e:
        raise UserError(f"{e}; pick one with --model")
    # local_rank differs per process and print_ds_config is a mode, not a setting: left out, so
    # run_config.json is the same on every process and compares equal on --resume.
    cfg = {k: v for k, v in vars(args).items() if k not in ("local_rank", "print_ds_config")}
    for k in PRESET_KEYS:
        if cfg.get(k) is None:
            cfg[k] = preset.get(k)
    if args.dtype is None and not torch.cuda.is_available():
        # The presets' bf16 is for GPUs. On a CPU without AMX, torch's bf16 matmuls run ~7x
        # slower than float32 (SmolLM2-135M, one 2.1K-token row, fwd+bwd: ~70 s vs ~10 s on
        # this repo's 2-core CI machine). --dtype bfloat16 still forces it (it works).
        cfg["dtype"] = "float32"
    if isinstance(cfg["lora_targets"], str):
        cfg["lora_targets"] = [t for t in cfg["lora_targets"].split(",") if t]
    if args.gamma is not None and args.gamma_beta_ratio is not None:
        raise UserError("--gamma and --gamma_beta_ratio both given; pass one "
                        "(gamma is absolute, gamma_beta_ratio = gamma / beta)")
    if args.gamma_beta_ratio is not None:
        cfg["gamma"] = args.gamma_beta_ratio * cfg["beta"]  # logged as the absolute margin
    del cfg["gamma_beta_ratio"]
    # native_len: the window the checkpoint was trained for (check_rope falls back to the
    # config's max_position_embeddings).
    cfg.update(model=preset["name"], model_path=preset["path"], native_len=preset.get("native_len"))
    cfg["out_dir"] = args.out_dir or os.path.join("runs", args.loss)
    cfg["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; 1 under python
    cfg["zero_stage"] = args.zero_stage if args.zero_stage is not None else (
        3 if torch.cuda.is_available() else 0)
    rows_per_pass = cfg["micro_batch"] * cfg["world_size"]
    if cfg["global_batch"] % rows_per_pass:
        raise UserError(f"--global_batch {cfg['global_batch']} is not a multiple of micro_batch "
                        f"{cfg['micro_batch']} x world size {cfg['world_size']}; change one of them")
    # Paper: 64 rows = 1 row x 8 GPUs x 8 accumulation steps; the demo's 2 = 1 x 1 process x 2.
    cfg["grad_accum"] = cfg["global_batch"] // rows_per_pass
    cfg["adam_betas"] = list(cfg["adam_betas"])  # as JSON reads it back (--resume)
    # 1-based step numbers, as logged.
    cfg["debug_nan_steps"] = [int(s) for s in str(args.debug_nan_steps).split(",") if s.strip()]
    return cfg


def ds_config(cfg):
    """The DeepSpeed config dict (print it with --print_ds_config)."""
    # Pinned host memory speeds up the copies of offloaded tensors to and from a GPU; on a
    # CPU-only machine there is no GPU to copy to.
    zero = {"stage": cfg["zero_stage"]}
    if cfg["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg["zero_stage"] == 3 and cfg["zero3_persistence_threshold"] is not None:
        zero["stage3_param_persistence_threshold"] = cfg["zero3_persistence_threshold"]
    return {
        # DeepSpeed checks train_batch_size = micro x accumulation x world size at initialize.
        "train_batch_size": cfg["global_batch"],
        "train_micro_batch_size_per_gpu": cfg["micro_batch"],
        "gradient_accumulation_steps": cfg["grad_accum"],
        "gradient_clipping": cfg["grad_clip"],  # 0: no clipping
        # bf16: weights and activations in bf16, fp32 master weights in the optimiser
        # wrapper (works on CPU too). float32: no wrapper, the AdamW below steps directly.
        "bf16": {"enabled": cfg["dtype"] == "bfloat16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,    # a torch AdamW: no JIT-built optimiser
        "zero_force_ds_cpu_optimizer": False,     # ... also with offload (LoRA state is small)
        "steps_per_print": 10 ** 9,               # we log ourselves
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------------------
# Data: the shards prepare.py wrote, checked, then read row by row (memory-mapped).

def prepare_hint(cfg):
    return f"run: python prepare.py --model {cfg['model']} --out_dir {cfg['data_dir']}"


class PackedRows:
    """The rows of <data_dir>/shard_*.safetensors. row(i) -> (input_ids, position_ids,
    segment_ids) as int64 numpy arrays; only the offsets are read into memory up front."""

    def __init__(self, data_dir, meta, vocab_size, cfg):
        names = sorted(f for f in os.listdir(data_dir)
                       if f.startswith("shard_") and f.endswith(".safetensors"))
        gone = sorted(set(meta.get("shards", names)) - set(names))   # meta.json lists its shards
        if gone:
            raise UserError(f"meta.json lists shards that are not there: {gone} "
                            f"({os.path.join(data_dir, 'meta.json')}); {prepare_hint(cfg)}")
        # Exactly the shards meta.json summed: its counts and data_fingerprint describe them.
        names = meta.get("shards", names)
        if not names:
            raise UserError(f"no shards in {data_dir} (expected shard_00000.safetensors, ...); "
                            f"{prepare_hint(cfg)}")
        self.files, self.index = [], []                     # index: (file, start, end) per row
        M, K = int(meta["num_rejected"]), int(meta["target_len"])
        for name in names:
            path = os.path.join(data_dir, name)
            try:
                f = safe_open(path, framework="np")  # memory-mapped, header parsed
                keys = set(f.keys())
            except Exception as e:                            # truncated or not safetensors
                raise UserError(f"cannot read shard ({path}): {e}; {prepare_hint(cfg)}")
            missing = {"input_ids", "position_ids", "segment_ids", "offsets"} - keys
            if missing:
                raise UserError(f"shard lacks {sorted(missing)} ({path}); {prepare_hint(cfg)}")
            self._check(f, path, M, K, vocab_size, cfg)
            off = f.get_tensor("offsets")
            # (file, start, end) per row: ~3 ints per row, the only per-row state held.
            self.index += [(len(self.files), int(a), int(b)) for a, b in zip(off[:-1], off[1:])]
            self.files.append(f)
        if not self.index:
            raise UserError(f"the shards in {data_dir} hold no rows (every sample was skipped?); "
                            f"{prepare_hint(cfg)}")

    @staticmethod
    def _check(f, path, M, K, vocab_size, cfg):
        """The packed layout, checked once for the whole shard (vectorised): each row is
        0..0 1..1 2..2 ... (M+1)..(M+1), token ids inside the vocabulary, positions < K."""
        ids, pos, seg, off = (f.get_tensor(k) for k in ("input_ids", "position_ids", "segment_ids", "offsets"))
        dtypes = (ids.dtype, pos.dtype, seg.dtype, off.dtype)
        problem = None
        if dtypes != (np.int32, np.int32, np.int8, np.int64):
            problem = f"dtypes {[str(d) for d in dtypes]}, expected int32, int32, int8, int64"
        elif not (len(ids) == len(pos) == len(seg) == off[-1]) or off[0] != 0 or (np.diff(off) <= 0).any():
            problem = "offsets do not match the token arrays"
        elif len(off) == 1:
            return                                            # a shard whose samples were all skipped
        # An id past the embedding table would fail deep inside the forward (an IndexError on CPU,
        # a device-side assert on CUDA): caught here with the shard named.
        elif ids.min() < 0 or ids.max() >= vocab_size:
            problem = f"token ids outside the model's vocabulary of {vocab_size}"
        elif pos.min() < 0 or pos.max() >= K:
            problem = f"position ids outside [0, target_len={K})"
        else:
            # Per row: segment 0 first, steps of 0 or +1 only, and M + 1 reached (prefix, chosen and
            # every rejected response, none missing, in order).
            starts = off[:-1]
            step = np.diff(seg.astype(np.int64))
            step[starts[1:] - 1] = 0                          # row boundaries may step down
            if (seg[starts] != 0).any() or ((step != 0) & (step != 1)).any() \
                    or (np.maximum.reduceat(seg, starts) != M + 1).any():
                problem = f"segment ids are not prefix, chosen, then {M} rejected responses per row"
        if problem:
            raise UserError(f"{problem} ({path}); the shard is damaged or from another "
                            f"version: {prepare_hint(cfg)}")

    def __len__(self):
        return len(self.index)

    def row(self, i):
        f, a, b = self.index[i]
        f = self.files[f]
        # Reads only rows [a, b) of the flat arrays; int32 / int8 on disk, int64 (torch.long) here.
        return tuple(f.get_slice(k)[a:b].astype("int64") for k in ("input_ids", "position_ids", "segment_ids"))


# Cached: step_rows calls it for every row of a step, and a step's rows lie in one or two
# epochs (more only when global_batch exceeds the number of rows).
@functools.lru_cache(maxsize=4)
def row_order(n, seed, epoch):
    """A fresh permutation of the n rows per epoch, a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def step_rows(step, cfg, n):
    """The global_batch row indices of optimiser step `step` (0-based). Global sample
    g = step * global_batch + j walks through a new permutation each epoch, so a resumed
    run reads the same rows as an uninterrupted one. Every process can compute this."""
    first = step * cfg["global_batch"]
    return [int(row_order(n, cfg["seed"], g // n)[g % n]) for g in range(first, first + cfg["global_batch"])]


def micro_batch(data, rows, cfg, micro, rank, pad_id, device):
    """Micro-batch `micro` of process `rank` out of the step's rows, right-padded (pad
    token, position 0, segment -1): three (B, T) int64 tensors."""
    B = cfg["micro_batch"]
    # The step's rows are dealt micro-batch first: micro-batch m of rank r takes rows
    # [(m * world + r) * B, ... + B): each process computes its share from the step's row list.
    first = (micro * cfg["world_size"] + rank) * B
    batch = [data.row(i) for i in rows[first:first + B]]
    T = max(len(r[0]) for r in batch)  # padded to the longest row here
    out = torch.zeros((3, B, T), dtype=torch.long)  # (3, B, T): ids, positions, segments
    out[0].fill_(pad_id)
    out[2].fill_(-1)  # -1: padding, attends only itself, never scored
    for b, r in enumerate(batch):
        for k in range(3):
            out[k, b, :len(r[k])] = torch.from_numpy(r[k])
    return [x.to(device) for x in out]


def read_meta(cfg):
    d = cfg["data_dir"]
    if not os.path.isdir(d):
        raise UserError(f"data folder {d} does not exist; {prepare_hint(cfg)} (or pass --data_dir)")
    path = os.path.join(d, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {d} was not written by prepare.py, or it was "
                        f"interrupted; {prepare_hint(cfg)}")
    except json.JSONDecodeError as e:
        raise UserError(f"meta.json is not valid JSON ({path}:{e.lineno}); {prepare_hint(cfg)}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"shards in format version {meta.get('format_version')}, this train.py reads "
                        f"version {FORMAT_VERSION} ({path}); re-run prepare.py from this checkout: "
                        f"{prepare_hint(cfg)}")
    if meta.get("complete") is False:
        raise UserError(f"the data is incomplete, shards {meta.get('missing_shards')} are not written yet "
                        f"({path}); wait for the other prepare.py workers (--num_shards) to finish, "
                        f"or {prepare_hint(cfg)}")
    need = ["tokenizer_fingerprint", "vocab_size", "num_rejected", "target_len"]  # read below
    if [k for k in need if k not in meta]:
        raise UserError(f"meta.json lacks {[k for k in need if k not in meta]} ({path}); {prepare_hint(cfg)}")
    return meta, path


def check_tokenizer(meta, meta_path, tok, config, cfg):
    """The shards' token ids mean something only under the tokenizer that made them: its
    fingerprint (a hash of the vocabulary) must match, and the data's vocabulary must fit the
    model's embedding table (config.vocab_size can be padded larger than len(tok))."""
    fp = models.tokenizer_fingerprint(tok)
    if meta["tokenizer_fingerprint"] != fp:
        raise UserError(
            f"the shards were tokenized for {meta.get('model', '?')} (tokenizer {meta.get('tokenizer', '?')}, "
            f"fingerprint {meta['tokenizer_fingerprint']}), but --model {cfg['model']} has tokenizer "
            f"fingerprint {fp} ({meta_path}); {prepare_hint(cfg)} or train with the --model the data was made for")
    if int(meta["vocab_size"]) > config.vocab_size:
        raise UserError(f"the data's vocabulary ({meta['vocab_size']}) is larger than the model's "
                        f"({config.vocab_size}) ({meta_path}); {prepare_hint(cfg)}")


def rope_coverage(native_len, theta_native, theta, head_dim):
    """Positions the RoPE settings cover (the rule in the docstring at the top)."""
    if theta is None or theta <= theta_native:
        return native_len
    # Llama-3-8B (theta 5e5, d = 128) with the released code's 2e8: s = 400^(126/128) ~ 364,
    # capped at 8: 8K -> 64K.
    s = (theta / theta_native) ** ((head_dim - 2) / head_dim)   # NTK-aware stretch
    return int(native_len * min(MAX_ROPE_EXTENSION, s))


def check_rope(meta, meta_path, config, cfg):
    """target_len of the data must be inside what the (possibly raised) RoPE base covers.
    `config` is the checkpoint's, before --rope_theta is applied."""
    native = cfg["native_len"] or config.max_position_embeddings  # 81920 = K for llama3-8b-80k
    theta0 = model_patch.get_rope_theta(config)
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    K = int(meta["target_len"])
    covered = rope_coverage(native, theta0, cfg["rope_theta"], d)
    if K <= covered:
        return
    if K > MAX_ROPE_EXTENSION * native:
        todo = (f"LOGO extends a window at most {MAX_ROPE_EXTENSION}x: re-run prepare.py with "
                f"--target_len {MAX_ROPE_EXTENSION * native} or less")
    else:
        need = theta0 * (K / native) ** (d / (d - 2))  # s solved for theta
        todo = f"pass --rope_theta {need:.3g} or more, or re-run prepare.py with --target_len {covered}"
    raise UserError(f"the data's positions reach target_len {K} but {cfg['model']}'s RoPE settings "
                    f"(rope_theta {cfg['rope_theta'] or theta0:g}, native window {native}) cover "
                    f"{covered} ({meta_path}); {todo}")


# ----------------------------------------------------------------------------------------
# Files: everything is written under a temporary name and renamed when complete.

def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def replace_dir(tmp, final):
    """Move a finished folder into place; the old one (if any) goes only afterwards."""
    old = f"{final}.old{os.getpid()}"
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoints(out_dir):
    """Finished checkpoints, oldest first: [(step, path)]. Half-written ones live under
    .tmp names and never show up here."""
    d = os.path.join(out_dir, "checkpoints")
    found = []
    for name in os.listdir(d) if os.path.isdir(d) else []:
        path = os.path.join(d, name)
        if name.startswith("step_") and name[5:].isdigit() and os.path.isfile(os.path.join(path, "trainer_state.json")):
            # trainer_state.json is written last (save_checkpoint): it marks a complete checkpoint.
            found.append((int(name[5:]), path))
    return sorted(found)


def safe_torch_load(path, map_location=None):
    """DeepSpeed's loader calls torch.load(weights_only=False), i.e. unpickles anything.
    Ours is weights_only=True with an explicit allowlist of the plain records DeepSpeed's
    checkpoints hold besides tensors: the ZeRO stage enum, the loss-scaler state, and the
    ZeRO-1/2 fragment addresses (two ints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    # The classes torch.load may rebuild besides tensors and plain containers; anything else
    # raises UnpicklingError, turned into one line below.
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            what = re.search(r"GLOBAL (\S+)", str(e))
            raise UserError(f"refusing to unpickle {what.group(1) if what else 'an object'} from "
                            f"a checkpoint ({path}); it holds more than tensors and DeepSpeed's own "
                            "records: resume only from checkpoints train.py wrote")


def save_checkpoint(engine, state, cfg, rank):
    """DeepSpeed checkpoint of the trainable state (LoRA weights, fp32 masters, AdamW
    moments), written to checkpoints/.tmp_step_N and renamed to step_N when every process
    has finished, then `latest` (DeepSpeed's pointer) is replaced."""
    import deepspeed
    ckdir = os.path.join(cfg["out_dir"], "checkpoints")
    tag = f"step_{state['step']:06d}"
    tmp = os.path.join(ckdir, f".tmp_{tag}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    deepspeed.comm.barrier()  # tmp exists before anyone writes into it
    # Every process writes its own files. exclude_frozen_parameters: the frozen base is not
    # saved (resume re-reads it from model_path); save_latest=False: `latest` is written below,
    # after the rename, so it never names a half-written checkpoint.
    engine.save_checkpoint(tmp, tag=tag, save_latest=False, exclude_frozen_parameters=True)
    deepspeed.comm.barrier()
    if rank == 0:
        write_json(os.path.join(tmp, tag, "trainer_state.json"), state)   # marks it complete
        final = os.path.join(ckdir, tag)
        replace_dir(os.path.join(tmp, tag), final)
        for extra in os.listdir(tmp):          # zero_to_fp32.py, DeepSpeed's recovery script
            os.replace(os.path.join(tmp, extra), os.path.join(ckdir, extra))
        os.rmdir(tmp)
        with open(os.path.join(ckdir, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(ckdir, "latest.tmp"), os.path.join(ckdir, "latest"))
    deepspeed.comm.barrier()


# ----------------------------------------------------------------------------------------
# Model, loss, schedule.

class LogoScorer(torch.nn.Module):
    """What DeepSpeed wraps: packed rows in, (B, 1+M) response log-probs out. The forward
    goes through the engine so that ZeRO-3's hooks gather the sharded weights."""

    def __init__(self, peft_model, attention):
        super().__init__()
        self.peft = peft_model
        self.attention = attention

    def forward(self, input_ids, position_ids, segment_ids):
        # (B, T) x 3 -> (logps, counts), both (B, 1+M): column 0 chosen, 1..M rejected.
        return model_patch.response_logps(self.peft, input_ids, position_ids, segment_ids,
                                          attention=self.attention)


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next step can be skipped: after a non-finite loss the step is
    dropped whole (no update, moments untouched) whatever wrapper DeepSpeed puts around it;
    DeepSpeed zeroes the gradients afterwards as usual."""
    skip = False

    def step(self, closure=None):
        # train_step sets skip on every process alike (after an all_reduce), so no process steps
        # alone and the ZeRO partitions stay in step.
        return None if self.skip else super().step(closure)


def lr_at(step, cfg):
    """Learning rate for optimiser step `step` (0-based): linear warmup to lr, then cosine
    down to lr * min_lr_ratio at max_steps (or constant)."""
    lr, warm, total = cfg["lr"], cfg["warmup_steps"], cfg["max_steps"]
    # Warmup: lr / warm at step 0, never 0, and lr at step warm - 1. Paper preset: 120 of 1200
    # steps, then cosine from 5e-7 to 5e-8 (min_lr_ratio 0.1).
    if step < warm:
        return lr * (step + 1) / warm
    if cfg["lr_schedule"] == "constant":
        return lr
    t = min(1.0, (step - warm) / max(1, total - warm))
    return lr * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))


def compute_loss(logps, cfg):
    """(B, 1+M) mean token log-probs -> (loss, metrics). The LOGO metrics are logged in
    both modes, so an SFT run shows what it does to the reward margin."""
    chosen, rejected = logps[:, 0], logps[:, 1:]              # (B,), (B, M)
    # When chosen and rejected are equally likely, logo = log(1 + e^gamma): 0.97 for gamma 0.5,
    # 3.05 for gamma 3. A run that learns drives reward_margin past gamma and logo below that.
    loss, metrics = logo_loss(chosen, rejected, cfg["beta"], gamma=cfg["gamma"],
                              sft_weight=cfg["sft_weight"])
    if cfg["loss"] == "sft":
        loss = -chosen.mean()                                 # = metrics["sft"], with grad
    return loss, metrics


def plain_grad_norm(engine, cfg):
    """The global gradient norm where DeepSpeed does not report one (ZeRO 0 in float32:
    the gradients are still in p.grad before the step); None elsewhere."""
    if cfg["zero_stage"] != 0 or cfg["dtype"] != "float32":
        return None
    norms = [p.grad.detach().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


# The logged metrics, in the order train_step sums them: the total loss, then logo_loss's.
METRICS = ["loss", "logo", "sft", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"]


def build(cfg, tok, rank):
    """Base model (frozen) + LoRA (peft) -> DeepSpeed engine and the AdamW inside it."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    # transformers 5 deprecates the attribute that peft and DeepSpeed still read: noise only
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    dtype = getattr(torch, cfg["dtype"])
    # ZeRO-3: built partitioned (deepspeed.zero.Init), so no process ever holds the whole
    # model in host memory (models.load_model); other stages load it whole on every process.
    model = models.load_model(cfg["model_path"], dtype=dtype, rope_theta=cfg["rope_theta"],
                              trust_remote_code=cfg["trust_remote_code"],
                              zero3=ds_config(cfg) if cfg["zero_stage"] == 3 else None)
    # ds_tensor: this process's partition of a ZeRO-3 parameter; ds_numel: the whole size.
    held = [p for p in model.parameters() if hasattr(p, "ds_tensor")]   # built by zero.Init
    if held and rank == 0:
        print(f"ZeRO-3 load: {len(held)} tensors built partitioned; this process holds "
              f"{sum(p.ds_tensor.numel() for p in held):,} of their {sum(p.ds_numel for p in held):,} elements")
    if cfg["gradient_checkpointing"]:
        # Non-reentrant: the reentrant variant gives no gradients inside a checkpointed block when
        # none of its inputs requires grad (a frozen base, no adapter on the embeddings). With
        # ZeRO-3 it needs deepspeed >= 0.19.3 (GPU.md).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # peft zeroes one factor of each adapter, so B @ A = 0: step 0 scores the base model.
    torch.manual_seed(cfg["seed"])                            # LoRA A init; B starts at 0
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=cfg["lora_targets"], bias="none")
    with warnings.catch_warnings():     # tied embeddings (SmolLM2): LoRA on the input side only
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")  # merge() unties
        model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    numel = lambda p: getattr(p, "ds_numel", p.numel())      # a ZeRO-3 partition reports 0
    n_train, n_all = sum(map(numel, trainable)), sum(map(numel, model.parameters()))
    if rank == 0:
        print(f"LoRA: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)")
    # Only the LoRA tensors (~31M for the paper's r = 32 on Llama-3-8B): their two float32
    # AdamW moments take ~0.25 GB, not the ~64 GB a full fine-tune of 8B would need.
    opt = SkippableAdamW(trainable, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]),
                         weight_decay=cfg["weight_decay"])
    scorer = LogoScorer(model, cfg["attention"])
    engine, _, _, _ = deepspeed.initialize(model=scorer, optimizer=opt, config=ds_config(cfg))
    engine.checkpoint_engine.load = safe_torch_load           # no pickle (see safe_torch_load)
    if cfg["zero_stage"] == 3 and rank == 0:                  # tensors under the threshold stay whole
        params = list(model.parameters())
        split = [p for p in params if not p.ds_persist]
        print(f"ZeRO-3: {len(split)} of {len(params)} tensors partitioned across {cfg['world_size']} "
              f"processes (stage3_param_persistence_threshold: the rest stay whole)")
    return engine, opt, scorer


def export(engine, scorer, tok, cfg, check, rank):
    """<out_dir>/final: adapter_model.safetensors + adapter_config.json (peft), the
    tokenizer, logo_config.json (the run config + log-probs to check a reload against).
    Under ZeRO-3 each process holds a shard of every LoRA matrix: gather them first, or
    the saved adapter is empty."""
    import deepspeed
    peft_model = scorer.peft
    # Collective under ZeRO-3: every process enters the gather, rank 0 alone copies and saves.
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters(lora_params, enabled=cfg["zero_stage"] == 3):
        if rank == 0:
            # Copied inside the gather: outside it a ZeRO-3 parameter is an empty placeholder.
            state = {n: p.detach().to("cpu", copy=True) for n, p in peft_model.named_parameters()
                     if "lora_" in n}
    if rank == 0:
        final = os.path.join(cfg["out_dir"], "final")
        tmp = f"{final}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        # save_embedding_layers=False: LoRA on embed_tokens is saved as its A/B matrices; the
        # vocabulary is unchanged, so the full embedding matrix need not be copied.
        peft_model.peft_config["default"].base_model_name_or_path = cfg["model_path"]
        peft_model.save_pretrained(tmp, state_dict=state, safe_serialization=True,
                                   save_embedding_layers=False)
        tok.save_pretrained(tmp)
        # The run config (rope_theta included, which evaluate.py applies to the base before the
        # adapter) and the log-probs a reload must reproduce.
        write_json(os.path.join(tmp, "logo_config.json"), dict(cfg, check_logps=check))
        replace_dir(tmp, final)
    deepspeed.comm.barrier()


def merge(cfg, tok):
    """<out_dir>/merged: a fresh base + the exported adapter, merged (safetensors)."""
    from peft import PeftModel
    base = models.load_model(cfg["model_path"], dtype=getattr(torch, cfg["dtype"]),
                             rope_theta=cfg["rope_theta"], trust_remote_code=cfg["trust_remote_code"])
    if base.config.tie_word_embeddings and "embed_tokens" in cfg["lora_targets"]:
        # The adapter changes the input embeddings only (lm_head reads the base matrix), so
        # merging into a tied matrix would change the output layer too: untie first.
        base.lm_head.weight = torch.nn.Parameter(base.get_input_embeddings().weight.detach().clone())
        base.config.tie_word_embeddings = False
    # merge_and_unload folds (alpha / r) * B @ A into the base weights: merged/ loads without peft.
    merged = PeftModel.from_pretrained(base, os.path.join(cfg["out_dir"], "final")).merge_and_unload()
    out = os.path.join(cfg["out_dir"], "merged")
    tmp = f"{out}.tmp{os.getpid()}"
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    replace_dir(tmp, out)


# ----------------------------------------------------------------------------------------
# The run.

# Settings a --resume may change: folders, run length, checkpoint interval, what happens at
# start and end (--resume, --overwrite, --merge), logging, fault injection, and switches that
# change memory or speed but not the math (gradient checkpointing, offload, the attention
# kernel). Anything else must match run_config.json.
RESUME_MAY_CHANGE = {"out_dir", "data_dir", "max_steps", "stop_after", "save_every", "resume", "overwrite", "merge", "wandb",
                     "tensorboard", "max_nonfinite_steps", "debug_nan_steps", "debug_unshared_out_dir", "gradient_checkpointing",
                     "offload_optimizer", "offload_params", "attention"}


def start_run(cfg, rank):
    """Fresh run, or --resume: returns the checkpoint to load (or None). A resumed run must
    have the settings that shape the training (folders may move; the data is recognised by
    its tokenizer fingerprint and row count)."""
    out = cfg["out_dir"]
    found = checkpoints(out)
    saved = os.path.join(out, "run_config.json")
    if cfg["resume"]:
        if not found:
            raise UserError(f"--resume: no finished checkpoint in {out}/checkpoints; "
                            "start again with --overwrite (or check --out_dir; with several nodes "
                            "it must be on a filesystem every node shares)")
        with open(saved) as f:
            old = json.load(f)
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in cfg.items()
                if k not in RESUME_MAY_CHANGE and old.get(k) != v]
        if diff:
            raise UserError(f"--resume with settings that differ from the run's ({saved}): "
                            f"{'; '.join(diff)}; resume with the same flags or use a new --out_dir")
        return found[-1]  # (step, path) of the newest
    if rank != 0:                     # rank 0 alone judges (and may be writing) a fresh folder
        return None
    if os.path.exists(saved) or found:
        if not cfg["overwrite"]:
            raise UserError(f"{out} already holds a run; pass --resume to continue it, "
                            "--overwrite to replace it, or another --out_dir")
        shutil.rmtree(out)
    return None


def select_device():
    """This process's device, selected before anything uses one: cuda:LOCAL_RANK on a GPU
    node, else the CPU. Under `deepspeed --num_gpus 8` every process sees all 8 GPUs and
    starts on cuda:0, while DeepSpeed binds rank k's NCCL group to cuda:LOCAL_RANK: a
    collective on cuda:0 fails there ("Tensor found on device cuda:0 but backend constrained
    to cuda:k"), and so would zero.Init's allocations land on GPU 0. Neither DeepSpeed's
    init_distributed nor torch sets the device; deepspeed.initialize does, but too late."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK is {local} but this process sees {torch.cuda.device_count()} GPUs "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                        "start one process per visible GPU")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def check_shared_out_dir(cfg, rank, device):
    """Several nodes (deepspeed --hostfile): every process must see rank 0's out_dir. Rank 0
    alone writes run_config.json, the log and the exported adapter and renames finished
    checkpoints, while every process writes its own checkpoint shards there and reads
    trainer_state.json on --resume; a node-local folder would hold half a checkpoint.
    Rank 0 writes a file with a fresh random name, each process looks for it; any miss
    stops every process with one line (a UserError) before the model loads."""
    import deepspeed
    out = cfg["out_dir"]
    # Two random 56-bit numbers (os.urandom: a name no earlier run can have left behind) go from
    # rank 0 to all; each process looks for the file under its own view of out_dir.
    token = torch.zeros(2, dtype=torch.int64)
    if rank == 0:
        token = torch.tensor([int.from_bytes(os.urandom(7), "little") for _ in range(2)])  # not torch's RNG
        open(os.path.join(out, f".shared_check_{token[0]}_{token[1]}"), "w").close()
    token = token.to(device)                                      # NCCL reduces GPU tensors only
    torch.distributed.broadcast(token, src=0)
    seen = out + (f".rank{rank}" if cfg["debug_unshared_out_dir"] and rank > 0 else "")
    name = f".shared_check_{token[0].item()}_{token[1].item()}"
    missing = torch.tensor([0 if os.path.exists(os.path.join(seen, name)) else 1], device=device)
    torch.distributed.all_reduce(missing)  # sum: processes that see no file
    deepspeed.comm.barrier()
    if rank == 0:
        os.remove(os.path.join(out, name))
    if missing.item():
        raise UserError(f"{int(missing.item())} of {cfg['world_size']} processes do not see rank 0's "
                        f"out_dir ({os.path.abspath(out)}); with several nodes, --out_dir must be on a "
                        "filesystem every node shares (NFS, Lustre, ...): checkpoints and --resume need it")


def resume(engine, path, log_path, rank):
    """Load checkpoint `path` (weights-only, see safe_torch_load) and cut the log back to it
    (lines of steps after the checkpoint, and a line torn by a kill, are dropped)."""
    # load_module_strict=False: the checkpoint holds the LoRA weights only (the frozen base is
    # excluded on save). No lr scheduler state: lr_at(step) sets the rate every step.
    engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                           load_module_strict=False, load_lr_scheduler_states=False)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if rank == 0:
        kept = []
        with open(log_path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= state["step"]:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):  # a line torn by a kill
                    pass
        with open(log_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)
        print(f"resumed from {path} at step {state['step']}")
    return state


def extra_loggers(cfg):
    """--tensorboard / --wandb: imported only when asked. Returns functions of a log record."""
    writers = []
    if cfg["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package; pip install tensorboard")
        tb = SummaryWriter(os.path.join(cfg["out_dir"], "tensorboard"))
        writers.append(lambda rec: [tb.add_scalar(k, v, rec["step"]) for k, v in rec.items()
                                    if isinstance(v, (int, float)) and k != "step"])
    if cfg["wandb"]:
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package; pip install wandb")
        wandb.init(project=cfg["wandb"], config=cfg, resume="allow")
        writers.append(lambda rec: wandb.log(rec, step=rec["step"]))
    return writers


def train_step(step, engine, opt, data, cfg, rank, pad_id):
    """One optimiser step over global_batch rows. Returns the log record (metrics averaged
    over micro-batches and processes). A non-finite loss on any process skips the step on all."""
    t0 = time.time()
    torch.manual_seed(cfg["seed"] * 1_000_003 + step)         # LoRA dropout: a function of the step
    lr = lr_at(step, cfg)
    # Set by hand each step (no DeepSpeed scheduler): a resumed run gets the rate from the step
    # number alone.
    for group in opt.param_groups:
        group["lr"] = lr
    rows = step_rows(step, cfg, len(data))
    world, accum = cfg["world_size"], cfg["grad_accum"]
    # METRICS..., non-finite, tokens: summed on the device (NCCL reduces GPU tensors only),
    # read once per step, so the host never waits for a micro-batch's backward.
    sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=engine.device)
    grad_norm = None
    for micro in range(accum):
        ids, pos, seg = micro_batch(data, rows, cfg, micro, rank, pad_id, engine.device)
        logps, _ = engine(ids, pos, seg)                      # (B, 1+M) mean token log-probs
        loss, metrics = compute_loss(logps, cfg)
        if step + 1 in cfg["debug_nan_steps"]:  # fault injection, 1-based
            loss = loss * float("nan")
        engine.backward(loss)                                 # DeepSpeed divides by grad_accum
        # The loss as computed, before DeepSpeed's scaling; tokens: prefix + all responses, no
        # padding.
        vals = torch.stack([loss.detach()] + [metrics[k].detach() for k in METRICS[1:]]).double()
        sums += torch.cat([vals, (~vals[:1].isfinite()).double(), (seg >= 0).sum().double()[None]])
        if micro == accum - 1:                                # before the update: agree on a skip
            if world > 1:
                torch.distributed.all_reduce(sums)
            sums = sums.cpu()                                 # the step's one host sync
            opt.skip = bool(sums[-2] > 0)  # the same answer on every process
            grad_norm = plain_grad_norm(engine, cfg)
        engine.step()                                         # updates after the last micro-batch only
    skipped, opt.skip = bool(sums[-2] > 0), False
    seconds = time.time() - t0
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    # Each metric is a mean over the micro-batch's rows, then over micro-batches and processes;
    # rows: the step's global row indices, to audit what a step read.
    rec = {"step": step + 1, **{k: float(sums[i]) / (accum * world) for i, k in enumerate(METRICS)},
           "lr": lr, "grad_norm": None if skipped or grad_norm is None else float(grad_norm),
           "tokens": int(sums[-1]), "tokens_per_s": float(sums[-1]) / seconds,
           "seconds_per_step": seconds, "skipped": skipped, "rows": rows}
    # NaN and inf -> None: json.dumps would write NaN, which is not JSON.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def log_line(rec):
    f = lambda k: "nan" if rec[k] is None else f"{rec[k]:.4f}"
    return (f"step {rec['step']:5d} | loss {f('loss')} | logo {f('logo')} | sft {f('sft')} | "
            f"r_chosen {f('reward_chosen')} | r_rejected {f('reward_rejected')} | "
            f"margin {f('reward_margin')} | acc {f('reward_accuracy')} | lr {rec['lr']:.2e} | "
            f"{rec['tokens_per_s']:.0f} tok/s | {rec['seconds_per_step']:.2f} s/step"
            + (" | SKIPPED: non-finite loss" if rec["skipped"] else ""))


def quarters(recs):
    """(first quarter, last quarter) of a run's step records, at least one step each."""
    q = max(1, len(recs) // 4)
    return recs[:q], recs[-q:]


def mean(recs, key):
    return sum(r[key] for r in recs) / len(recs)


def summary(log_path):
    """First quarter of the run against the last: what the demo should show rising."""
    with open(log_path) as f:
        recs = [r for r in map(json.loads, f) if not r["skipped"]]
    if not recs:
        return "no step finished with a finite loss"
    a, b = quarters(recs)
    parts = [f"{k} {mean(a, k):.3f} -> {mean(b, k):.3f}" for k in ("loss", "reward_margin", "reward_accuracy")]
    return (f"steps {a[0]['step']}-{a[-1]['step']} vs {b[0]['step']}-{b[-1]['step']}: " + ", ".join(parts)
            + f"; {sum(r['seconds_per_step'] for r in recs) / 60:.1f} min of steps")


def import_deepspeed():
    """deepspeed, quiet, and on CPU without its shared-memory all-reduce op: DeepSpeed would
    JIT-compile it with g++ on a machine's first run (18 s on a 2-core Xeon), even for one
    process that never reduces; gloo does the few collectives of a CPU run (the demo, the
    tests). DeepSpeed reads this dict (probed once, then cached) when it builds its
    communication backend, in init_distributed or initialize."""
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if deepspeed.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.print_ds_config:  # before any rendezvous or model load
        print(json.dumps(ds_config(cfg), indent=2))
        return

    # Plain `python train.py`: DeepSpeed reads the rendezvous from the environment and,
    # without it, goes looking for MPI. One process, a free local port.
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    rank = int(os.environ["RANK"])  # global rank (--local_rank: the GPU on this node)
    device = select_device()        # before any collective or CUDA allocation

    # Everything that can be wrong with the input is checked before the model loads.
    meta, meta_path = read_meta(cfg)
    try:
        tok = models.load_tokenizer(cfg["model_path"], trust_remote_code=cfg["trust_remote_code"])
        config = models.load_config(cfg["model_path"], trust_remote_code=cfg["trust_remote_code"])
    except OSError as e:              # FileNotFoundError included: a missing package or folder
        raise UserError(f"cannot load {cfg['model']}: {str(e).splitlines()[0]}; install what it "
                        "names, or pass a local model folder / a hub id already in your HF cache") from None
    archs = [a for a in getattr(config, "architectures", None) or [] if a not in model_patch.PACKED_ARCHITECTURES]
    if archs:                         # model_patch would refuse it at the first step; say it now
        raise UserError(f"--model {cfg['model']} is a {archs[0]}: packed log-probs are tested for "
                        f"{', '.join(model_patch.PACKED_ARCHITECTURES)} only; train one of those "
                        "(or add it to tests/test_model_patch.py's parity tests and model_patch.PACKED_ARCHITECTURES)")
    check_tokenizer(meta, meta_path, tok, config, cfg)
    check_rope(meta, meta_path, config, cfg)
    data = PackedRows(cfg["data_dir"], meta, config.vocab_size, cfg)
    # data_fingerprint (sha256 of the shards' bytes): which data the adapter was trained on,
    # for evaluate.py --results_dir; None for data from a prepare.py that did not write it
    cfg.update(target_len=int(meta["target_len"]), num_rejected=int(meta["num_rejected"]),
               tokenizer_fingerprint=meta["tokenizer_fingerprint"], rows=len(data),
               data_fingerprint=meta.get("data_fingerprint"))
    resume_from = start_run(cfg, rank)  # --overwrite: rank 0 deletes the old run here
    out, log_path = cfg["out_dir"], os.path.join(cfg["out_dir"], "log.jsonl")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        print("config: " + json.dumps(cfg, sort_keys=True))
        if resume_from is None:
            write_json(os.path.join(out, "run_config.json"), cfg)
        ckdir = os.path.join(out, "checkpoints")             # what a crash left half-written
        for d, names in ((out, os.listdir(out)), (ckdir, os.listdir(ckdir) if os.path.isdir(ckdir) else [])):
            for name in names:
                if ".tmp" in name or ".old" in name:
                    path = os.path.join(d, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    deepspeed = import_deepspeed()    # not before the checks above: a bad input fails in seconds
    if cfg["world_size"] > 1:
        deepspeed.init_distributed()  # now: check_shared_out_dir needs it
        check_shared_out_dir(cfg, rank, device)
    engine, opt, scorer = build(cfg, tok, rank)
    start, nonfinite = 0, 0
    if resume_from is not None:
        state = resume(engine, resume_from[1], log_path, rank)
        start, nonfinite = state["step"], state["nonfinite_total"]

    from tqdm import tqdm
    writers = extra_loggers(cfg) if rank == 0 else []
    # --stop_after ends the loop early; the lr schedule still spans max_steps.
    end = min(cfg["max_steps"], cfg["stop_after"] or cfg["max_steps"])
    bar = tqdm(total=cfg["max_steps"], initial=start, disable=rank != 0, desc="train", unit="step",
               dynamic_ncols=True)
    log = open(log_path, "a") if rank == 0 else None
    # Any id would do: padding is never attended to by real tokens and never scored.
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    streak = 0                                                # non-finite steps in a row
    engine.train()
    try:
        for step in range(start, end):
            rec = train_step(step, engine, opt, data, cfg, rank, pad_id)
            streak = streak + 1 if rec["skipped"] else 0
            nonfinite += rec["skipped"]
            rec["nonfinite_steps"] = nonfinite
            if rank == 0:
                log.write(json.dumps(rec) + "\n")
                log.flush()  # a kill loses at most this step's line
                for w in writers:
                    w(rec)
                tqdm.write(log_line(rec))
                bar.update(1)
            if streak >= cfg["max_nonfinite_steps"]:
                raise UserError(f"the loss was non-finite for {streak} steps in a row (steps "
                                f"{step + 2 - streak}-{step + 1}, each skipped) ({log_path}); lower --lr, "
                                "check the data, or --resume from the last checkpoint with other settings")
            if (step + 1) % cfg["save_every"] == 0 or step + 1 == cfg["stop_after"]:
                save_checkpoint(engine, {"step": step + 1, "nonfinite_total": nonfinite}, cfg, rank)
    finally:                          # the bar ends its line before any error is printed
        bar.close()
        if log:
            log.close()
    if end < cfg["max_steps"]:
        if rank == 0:
            print(f"stopped after step {end} (--stop_after); continue with --resume")
        return

    # The trained model's log-probs on the first micro-batch, saved with the adapter: a
    # reload (PeftModel.from_pretrained) must reproduce them.
    engine.eval()  # no dropout: a reload must get the same numbers
    rows = step_rows(0, cfg, len(data))
    ids, pos, seg = micro_batch(data, rows, cfg, 0, rank, pad_id, engine.device)
    with torch.no_grad():
        logps, _ = engine(ids, pos, seg)
    # On every process: the ZeRO-3 gather in export is collective.
    export(engine, scorer, tok, cfg, {"rows": rows[:cfg["micro_batch"]], "logps": logps.tolist()}, rank)
    # The last collective is done: close the process group on every process, on success only
    # (a failed rank may leave the others inside a collective). A process that exits with it
    # open can abort in gloo's threads at shutdown ("terminate called without an active
    # exception"). Before the merge, which needs no group and can outlast a peer's timeout.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank == 0:
        if cfg["merge"]:  # rank 0 alone: a fresh base, no DeepSpeed
            merge(cfg, tok)
        print(f"summary: {summary(log_path)}; {nonfinite} non-finite steps skipped")
        print(f"saved the adapter to {os.path.join(out, 'final')}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:            # every process says it; other ranks name themselves
        rank = os.environ.get("RANK", "0")
        print(f"error: {'' if rank == '0' else f'[rank {rank}] '}{e}", file=sys.stderr)
        sys.exit(2)
