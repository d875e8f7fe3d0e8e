"""
Train a LoRA adapter with the LOGO loss (Tang et al. 2024, arXiv 2410.18533, Eq. 2-3) in one
plain DeepSpeed loop, from a laptop CPU to a GPU node. No Trainer, no callbacks; top to
bottom: config, data, model, run folder, then the loop (main).

Reads   <data_dir>/meta.json + shard_*.safetensors     (written by prepare.py)
Writes  <out_dir>/run_config.json      the resolved configuration (written at start)
        <out_dir>/log.jsonl            one JSON object per optimiser step
        <out_dir>/checkpoints/step_N/  DeepSpeed checkpoints (LoRA + optimiser state only)
        <out_dir>/final/               the peft adapter (safetensors), tokenizer, logo_config.json

    python train.py                                    # smollm2-135m on data/demo (demo.sh: --max_steps 12)
    deepspeed --num_gpus 8 train.py --model llama3-8b-80k --data_dir data/llama3 --gradient_checkpointing
    python train.py --model tiny --data_dir data/tiny --resume      # continue runs/logo exactly

Defaults (after a plain python prepare.py): 48 steps of 2 rows of ~2.1K tokens, float32, in
17-19 minutes on 2 CPU cores; demo.sh: 12 steps of 1K-token rows in ~2-3 minutes (measured,
first quarter of the steps -> last: loss 2.01 -> 0.50, reward_margin -0.37 -> 4.13,
reward_accuracy 0.50 -> 0.83). Row order, learning rate and dropout are functions of (seed,
step) alone: --resume replays exactly what an uninterrupted run does. Bad input stops with one
`error: <what> (<file>); <what to do>` line (exit status 2) before the model loads; a
non-finite loss skips its whole step; nothing is renamed into place before it is complete.
"""

import argparse
import json
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
from tqdm import tqdm

import model_patch
import models
from loss import logo_loss

FORMAT_VERSION = 1          # of the data prepare.py writes; meta.json carries it
MAX_ROPE_EXTENSION = 8      # the paper extends a window at most 8x (Sec. 4.1: 8K -> 64K, 4K -> 32K)
# Flags left at None take the preset's value (models.MODELS; paper: beta 10, gamma 3 for
# Llama-3, Sec. 4.1; lambda 0.1; LoRA r 32, alpha 16, lr 5e-7, 1200 steps of 64 rows).
PRESET_KEYS = ["beta", "gamma", "sft_weight", "lr", "warmup_steps", "max_steps", "global_batch", "micro_batch",
               "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "rope_theta", "dtype"]
# The logged metrics, in the order train_step sums them: the total loss, then logo_loss's.
METRICS = ["loss", "logo", "sft", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"]
# What --resume may change: folders, length, logging, switches of memory or speed, not the math.
RESUME_MAY_CHANGE = {"out_dir", "data_dir", "max_steps", "stop_after", "save_every", "resume", "overwrite",
                     "wandb", "max_nonfinite_steps", "gradient_checkpointing", "offload_optimizer",
                     "offload_params", "attention"}

# Config: the flags and a preset -> one flat dict, the run's config.
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("data").add_argument
    a("--data_dir", default="data/demo", help="folder prepare.py wrote (meta.json + shards)")
    a("--out_dir", default=None, help="run folder; default runs/<loss> (runs/logo, runs/sft)")
    a = p.add_argument_group("model").add_argument
    a("--model", default="smollm2-135m", help=f"preset ({', '.join(models.MODELS)}), local folder or hub id")
    a("--rope_theta", type=float, default=None, help="RoPE base; default the preset's (None keeps the checkpoint's)")
    a("--dtype", choices=["float32", "bfloat16"], default=None, help="default the preset's on GPU, float32 on CPU")
    a("--attention", choices=["auto", "split", "flex", "mask"], default="auto", help="packed attention kernel")
    a = p.add_argument_group("LoRA (peft)").add_argument
    a("--lora_r", type=int, default=None, help="LoRA rank")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (update scaled by alpha/r)")
    a("--lora_dropout", type=float, default=None, help="dropout on the LoRA input")
    a("--lora_targets", type=lambda s: [t for t in s.split(",") if t], help="comma-separated (paper: q,k,v,o + embed)")
    a = p.add_argument_group("LOGO loss (paper Eq. 2-3)").add_argument
    a("--loss", choices=["logo", "sft"], default="logo", help="sft: the chosen NLL only (Instruct Tuning (Partial))")
    a("--beta", type=float, default=None, help="beta: reward scale, Eq. 2")
    a("--gamma", type=float, default=None, help="gamma: absolute reward margin, Eq. 2")
    a("--sft_weight", type=float, default=None, help="lambda: weight of the SFT term, Eq. 3")
    a("--reference", action="store_true", help="rewards against the base model, adapter off (Fig. 6c; loss.py)")
    a = p.add_argument_group("optimisation").add_argument
    a("--max_steps", type=int, default=None, help="optimiser steps")
    a("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    a("--lr_schedule", choices=["cosine", "constant"], default="cosine", help="after the linear warmup")
    a("--min_lr_ratio", type=float, default=0.1, help="cosine ends at lr * this")
    a("--warmup_steps", type=int, default=None, help="linear warmup steps")
    a("--global_batch", type=int, default=None, help="rows per optimiser step, all processes")
    a("--micro_batch", type=int, default=None, help="rows per forward pass per process")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    a("--adam_betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    a("--grad_clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    a("--seed", type=int, default=0, help="LoRA init, row order, dropout")
    a = p.add_argument_group("checkpoints and export").add_argument
    a("--save_every", type=int, default=100, help="checkpoint every N steps")
    a("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    a("--stop_after", type=int, default=None, help="checkpoint and stop after this step (lr schedule: max_steps)")
    a("--overwrite", action="store_true", help="delete an existing run in out_dir first")
    a = p.add_argument_group("system").add_argument
    # The paper trains with ZeRO-3 (Sec. 4.1); it runs on CPU too (tests/test_train.py).
    a("--zero_stage", type=int, choices=[0, 1, 2, 3], default=None, help="DeepSpeed ZeRO; default 3 on GPU, 0 on CPU")
    a("--offload_optimizer", action="store_true", help="ZeRO: optimiser state in CPU memory")
    a("--offload_params", action="store_true", help="ZeRO-3: parameters in CPU memory")
    a("--zero3_persistence_threshold", type=int, default=None, help="ZeRO-3: smaller tensors stay whole (0: none)")
    a("--gradient_checkpointing", action="store_true", help="recompute activations in backward (8K+ rows on a GPU)")
    a("--max_nonfinite_steps", type=int, default=3, help="stop after this many non-finite (skipped) steps in a row")
    a("--wandb", default=None, metavar="PROJECT", help="also log to this wandb project")
    a("--print_ds_config", action="store_true", help="print the DeepSpeed config and exit")
    a("--local_rank", type=int, default=-1, help="set by the deepspeed launcher (the rank used is $RANK)")
    return p.parse_args(argv)

def need(ok, message):
    """A check of the input: when it fails, one `error: <message>` line and exit status 2."""
    if not ok:
        raise models.UserError(message)

def resolve_config(args):
    """Flags + preset -> one flat dict: what runs, is printed and saved (run_config.json; without
    local_rank and print_ds_config, so it is the same on every process and on --resume)."""
    try:
        preset = models.resolve_model(args.model)
    except ValueError as e:
        raise models.UserError(f"{e}; pick one with --model")
    cfg = {k: v for k, v in vars(args).items() if k not in ("local_rank", "print_ds_config")}
    cfg.update({k: preset.get(k) for k in PRESET_KEYS if cfg[k] is None})
    # The presets' bf16 is for GPUs: on a CPU without AMX torch's bf16 matmuls run ~7x slower
    # (SmolLM2-135M, one 2.1K-token row, fwd+bwd: ~70 s vs ~10 s on 2 cores). --dtype forces it.
    cfg["dtype"] = args.dtype or (cfg["dtype"] if torch.cuda.is_available() else "float32")
    # native_len: the window the checkpoint was trained for; world_size: the launcher's (1 under python)
    cfg.update(model=preset["name"], model_path=preset["path"], native_len=preset.get("native_len"),
               out_dir=args.out_dir or os.path.join("runs", args.loss), world_size=int(os.getenv("WORLD_SIZE", 1)),
               zero_stage=args.zero_stage if args.zero_stage is not None else 3 if torch.cuda.is_available() else 0)
    per_pass = cfg["micro_batch"] * cfg["world_size"]
    need(cfg["global_batch"] % per_pass == 0, f"--global_batch {cfg['global_batch']} is not a multiple of "
         f"micro_batch {cfg['micro_batch']} x world size {cfg['world_size']}; change one of them")
    cfg["grad_accum"] = cfg["global_batch"] // per_pass   # paper: 64 rows = 1 x 8 GPUs x 8 accumulation steps
    return cfg

def ds_config(cfg):
    """The DeepSpeed config; bf16: bf16 weights and activations, fp32 masters in DeepSpeed's optimiser."""
    offload = {"device": "cpu", "pin_memory": torch.cuda.is_available()}     # pinned: faster copies to a GPU
    zero = {"stage": cfg["zero_stage"], **({"offload_optimizer": offload} if cfg["offload_optimizer"] else {}),
            **({"offload_param": offload} if cfg["offload_params"] else {})}
    if cfg["zero_stage"] == 3 and cfg["zero3_persistence_threshold"] is not None:
        zero["stage3_param_persistence_threshold"] = cfg["zero3_persistence_threshold"]
    return {"train_batch_size": cfg["global_batch"], "train_micro_batch_size_per_gpu": cfg["micro_batch"],
            "gradient_accumulation_steps": cfg["grad_accum"], "gradient_clipping": cfg["grad_clip"],  # 0: off
            "bf16": {"enabled": cfg["dtype"] == "bfloat16"}, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,   # a torch AdamW: no JIT-built optimiser ...
            "zero_force_ds_cpu_optimizer": False,    # ... also with offload (LoRA state is small)
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}    # we log ourselves

# Data: meta.json and the shards prepare.py wrote, checked against the model before it loads.
def load_data(cfg):
    """Every check of the input, before anything heavy -> (tokenizer, the rows: read_shards)."""
    folder, hint = cfg["data_dir"], f"run: python prepare.py --model {cfg['model']} --out_dir {cfg['data_dir']}"
    path = os.path.join(folder, "meta.json")
    need(os.path.isdir(folder), f"data folder {folder} does not exist; {hint} (or pass --data_dir)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise models.UserError(f"{path} is missing: {folder} was not written by prepare.py, or it stopped; {hint}")
    except json.JSONDecodeError as e:
        raise models.UserError(f"meta.json is not valid JSON ({path}:{e.lineno}); {hint}")
    need(meta.get("format_version") == FORMAT_VERSION, f"shards in format version {meta.get('format_version')}, "
         f"this train.py reads version {FORMAT_VERSION} ({path}); re-run prepare.py from this checkout: {hint}")
    need(meta.get("complete") is not False, f"the data is incomplete, shards {meta.get('missing_shards')} are not "
         f"written yet ({path}); wait for the other prepare.py workers (--num_shards) to finish, or {hint}")
    try:
        tok = models.load_tokenizer(cfg["model_path"])
        config = models.load_config(cfg["model_path"])
    except OSError as e:              # FileNotFoundError included: a missing package or folder
        raise models.UserError(f"cannot load {cfg['model']}: {str(e).splitlines()[0]}; install what it names, or "
                               "pass a local model folder / a hub id already in your HF cache") from None
    # model_patch would refuse another architecture at the first step: say it now. Token ids mean
    # something only under the tokenizer that made them (its fingerprint hashes the vocabulary).
    archs = [a for a in getattr(config, "architectures", None) or [] if a not in model_patch.PACKED_ARCHITECTURES]
    need(not archs, f"--model {cfg['model']} is a {(archs or [''])[0]}: packed log-probs are tested for "
         f"{', '.join(model_patch.PACKED_ARCHITECTURES)} only; train one of those (or add it to their parity tests)")
    fp = models.tokenizer_fingerprint(tok)
    need(meta["tokenizer_fingerprint"] == fp, f"the shards were tokenized for {meta.get('model', '?')} (tokenizer "
         f"fingerprint {meta['tokenizer_fingerprint']}), --model {cfg['model']} has {fp} ({path}); {hint}")
    # Positions up to K = target_len need RoPE settings that cover K: the native window, stretched by a
    # raised base by the NTK-aware s = (theta / theta_native)^((d-2)/d) (d = head dim: the longest
    # wavelength grows by exactly s), capped at the paper's 8x. Llama-3-8B, 5e5 -> 2e8: s ~ 364, 8K -> 64K.
    K, native = int(meta["target_len"]), cfg["native_len"] or config.max_position_embeddings
    theta0, theta = model_patch.get_rope_theta(config), cfg["rope_theta"]   # the checkpoint's; the flag's
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    covered = native if theta is None or theta <= theta0 else \
        int(native * min(MAX_ROPE_EXTENSION, (theta / theta0) ** ((d - 2) / d)))
    need(K <= MAX_ROPE_EXTENSION * native, f"the data's positions reach target_len {K} ({path}), but LOGO extends "
         f"a window at most {MAX_ROPE_EXTENSION}x: re-run prepare.py with --target_len {MAX_ROPE_EXTENSION * native}")
    need(K <= covered, f"the data's positions reach target_len {K} but {cfg['model']}'s RoPE settings (rope_theta "
         f"{theta or theta0:g}, native window {native}) cover {covered} ({path}); pass --rope_theta "
         f"{theta0 * (K / native) ** (d / (d - 2)):.3g} or more (s solved for theta), or --target_len {covered}")
    data = read_shards(folder, meta, config.vocab_size, hint)
    # data_fingerprint (the shards' sha256, None from an older prepare.py): for evaluate.py --results_dir
    cfg.update(target_len=K, num_rejected=int(meta["num_rejected"]), tokenizer_fingerprint=fp, rows=len(data),
               data_fingerprint=meta.get("data_fingerprint"))
    return tok, data

def read_shards(data_dir, meta, vocab_size, hint):
    """The shards' rows, memory-mapped -> [(shard, start, end)], one per row (micro_batch reads
    them). Each shard's layout is checked once, vectorised: rows of segments 0..0 1..1 ...
    (M+1)..(M+1) (prefix, chosen, M rejected), token ids in the vocabulary, positions < K."""
    names = meta.get("shards") or sorted(n for n in os.listdir(data_dir) if re.fullmatch(r"shard_.*\.safetensors", n))
    need(names, f"no shards in {data_dir} (expected shard_00000.safetensors, ...); {hint}")
    M, K, rows = int(meta["num_rejected"]), int(meta["target_len"]), []
    for path in [os.path.join(data_dir, name) for name in names]:
        try:                          # a missing, truncated or foreign file, or one without these arrays
            f = safe_open(path, framework="np")
            ids, pos, seg, off = (f.get_tensor(k) for k in ("input_ids", "position_ids", "segment_ids", "offsets"))
        except Exception as e:
            raise models.UserError(f"cannot read shard ({path}): {e}; {hint}")
        bad = lambda ok, what: need(ok, f"{what} ({path}); the shard is damaged or from another version: {hint}")
        dtypes = [str(x.dtype) for x in (ids, pos, seg, off)]
        bad(dtypes == ["int32", "int32", "int8", "int64"], f"dtypes {dtypes}, expected int32, int32, int8, int64")
        bad(len(ids) == len(pos) == len(seg) == off[-1] and off[0] == 0 and (np.diff(off) > 0).all(),
            "offsets do not match the token arrays")
        if len(off) > 1:              # else every sample of the shard was skipped
            # an id past the embedding table fails deep in the forward (IndexError; on CUDA an assert)
            bad(0 <= ids.min() and ids.max() < vocab_size, f"token ids outside the model's vocabulary of {vocab_size}")
            bad(0 <= pos.min() and pos.max() < K, f"position ids outside [0, target_len={K})")
            step = np.diff(seg.astype(np.int64))
            step[off[1:-1] - 1] = 0                           # row boundaries may step down
            bad((seg[off[:-1]] == 0).all() and ((step == 0) | (step == 1)).all()
                and (np.maximum.reduceat(seg, off[:-1]) == M + 1).all(),
                f"segment ids are not prefix, chosen, then {M} rejected responses per row")
        rows += [(f, int(a), int(b)) for a, b in zip(off[:-1], off[1:])]
    need(rows, f"the shards in {data_dir} hold no rows (every sample was skipped?); {hint}")
    return rows

def step_rows(step, cfg, n):
    """Step `step`'s global_batch row indices: sample g = step * global_batch + j walks a fresh
    permutation per epoch, of (seed, epoch) alone: a resumed run reads what an uninterrupted one would."""
    g = range(step * cfg["global_batch"], (step + 1) * cfg["global_batch"])
    perm = {e: torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + e))
            for e in {i // n for i in g}}
    return [int(perm[i // n][i % n]) for i in g]

def micro_batch(data, rows, cfg, micro, rank, pad_id, device):
    """Micro-batch `micro` of process `rank`: rows [(micro * world + rank) * B, ... + B) of the
    step's, right-padded to the longest (pad token, position 0, segment -1: attends only itself,
    never scored) -> (B, T) int64 ids, positions, segments (int32 / int8 on disk)."""
    first = (micro * cfg["world_size"] + rank) * cfg["micro_batch"]
    batch = [data[i] for i in rows[first:first + cfg["micro_batch"]]]
    return [torch.nn.utils.rnn.pad_sequence([torch.from_numpy(f.get_slice(k)[a:b]).long() for f, a, b in batch],
                                            batch_first=True, padding_value=v).to(device)
            for k, v in (("input_ids", pad_id), ("position_ids", 0), ("segment_ids", -1))]

# Model: a frozen base + LoRA inside a DeepSpeed engine, and its export.
class LogoScorer(torch.nn.Module):
    """What DeepSpeed wraps (its ZeRO-3 hooks gather the weights): packed (B, T) x 3 in,
    (logps, counts) out, both (B, 1+M): column 0 chosen, 1..M rejected."""
    def __init__(self, peft_model, attention):
        super().__init__()
        self.peft, self.attention = peft_model, attention

    def forward(self, input_ids, position_ids, segment_ids):
        return model_patch.response_logps(self.peft, input_ids, position_ids, segment_ids, attention=self.attention)

class SkippableAdamW(torch.optim.AdamW):
    """AdamW that skips its step while `skip` is set (train_step sets it alike on every process after a
    non-finite loss): no update, moments untouched, whatever wrapper DeepSpeed puts around it."""
    skip = False
    def step(self, closure=None):
        return None if self.skip else super().step(closure)

def build(cfg, rank, resume_from=None):
    """Base model (frozen) + LoRA -> (DeepSpeed engine, the AdamW in it), from checkpoint `resume_from`
    on --resume. ZeRO-3 builds the model partitioned: no process holds it whole in host memory."""
    import deepspeed
    from peft import LoraConfig, get_peft_model
    # transformers 5 deprecates the attribute that peft and DeepSpeed still read: noise only
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    model = models.load_model(cfg["model_path"], dtype=getattr(torch, cfg["dtype"]), rope_theta=cfg["rope_theta"],
                              zero3=ds_config(cfg) if cfg["zero_stage"] == 3 else None)
    held = [p for p in model.parameters() if hasattr(p, "ds_tensor")]   # ds_tensor: this process's share
    if cfg["gradient_checkpointing"]:
        # Non-reentrant: the reentrant variant gives no gradients inside a block none of whose
        # inputs requires grad (a frozen base). With ZeRO-3 it needs deepspeed >= 0.19.3 (GPU.md).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg["seed"])    # LoRA A; B starts at 0, so B @ A = 0: step 1 scores the base model
    with warnings.catch_warnings():   # tied embeddings (SmolLM2): LoRA on the input side only, lm_head reads the base
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")
        model = get_peft_model(model, LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], bias="none",
                                                 lora_dropout=cfg["lora_dropout"], target_modules=cfg["lora_targets"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    # LoRA only (~31M for r = 32 on Llama-3-8B): its AdamW moments take ~0.25 GB, not ~64 GB.
    opt = SkippableAdamW(trainable, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]), weight_decay=cfg["weight_decay"])
    engine, *_ = deepspeed.initialize(model=LogoScorer(model, cfg["attention"]), optimizer=opt, config=ds_config(cfg))
    engine.checkpoint_engine.load = safe_torch_load           # no pickle (see safe_torch_load)
    numel = lambda ps: sum(getattr(p, "ds_numel", p.numel()) for p in ps)     # a ZeRO-3 partition reports 0
    n_train, n_all, params = numel(trainable), numel(model.parameters()), list(model.parameters())
    if rank == 0:
        print(f"LoRA: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)")
    if cfg["zero_stage"] == 3 and rank == 0:                  # tensors under the threshold stay whole
        print(f"ZeRO-3 load: {len(held)} tensors built partitioned; this process holds "
              f"{sum(p.ds_tensor.numel() for p in held):,} of their {sum(p.ds_numel for p in held):,} elements")
        print(f"ZeRO-3: {sum(not p.ds_persist for p in params)} of {len(params)} tensors partitioned across "
              f"{cfg['world_size']} processes (stage3_param_persistence_threshold: the rest stay whole)")
    if resume_from:                   # not strict: LoRA only; no scheduler state: the step sets the lr
        engine.load_checkpoint(os.path.dirname(resume_from), tag=os.path.basename(resume_from),
                               load_module_strict=False, load_lr_scheduler_states=False)
    return engine, opt

def export(engine, tok, data, cfg, rank, pad_id):
    """<out_dir>/final, written on every process: the peft adapter, the tokenizer, logo_config.json:
    the run config (rope_theta included: evaluate.py applies it before the adapter) and
    check_logps, the first micro-batch's log-probs that a reload (PeftModel) must reproduce."""
    import deepspeed
    engine.eval()                     # no dropout: a reload must get the same numbers
    rows, peft = step_rows(0, cfg, len(data)), engine.module.peft
    with torch.no_grad():
        logps, _ = engine(*micro_batch(data, rows, cfg, 0, rank, pad_id, engine.device))
    # ZeRO-3: every process holds a shard of each LoRA matrix. Gathered (collective), copied
    # inside the gather (outside it a parameter is an empty placeholder), saved by rank 0.
    lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    with deepspeed.zero.GatheredParameters(list(lora.values()), enabled=cfg["zero_stage"] == 3):
        state = {n: p.detach().to("cpu", copy=True) for n, p in lora.items()} if rank == 0 else None
    if rank == 0:
        peft.peft_config["default"].base_model_name_or_path = cfg["model_path"]
        with models.atomic_path(os.path.join(cfg["out_dir"], "final")) as tmp:
            # save_embedding_layers=False: LoRA on embed_tokens is saved as its A/B matrices only
            peft.save_pretrained(tmp, state_dict=state, safe_serialization=True, save_embedding_layers=False)
            tok.save_pretrained(tmp)
            models.write_json(os.path.join(tmp, "logo_config.json"),
                              dict(cfg, check_logps={"rows": rows[:cfg["micro_batch"]], "logps": logps.tolist()}))
    deepspeed.comm.barrier()

# The run folder: a fresh run or --resume, checkpoints.
def start_run(cfg, rank, log_path):
    """Check out_dir for a fresh run (--overwrite: rank 0 deletes the old one) or --resume; rank 0
    writes run_config.json, deletes what a crash left half-written (.tmp/.old names) -> the
    {"step", "nonfinite_total"} to start from (--resume: + "path" of the newest checkpoint)."""
    out = cfg["out_dir"]
    saved, ckdir = os.path.join(out, "run_config.json"), os.path.join(out, "checkpoints")
    # trainer_state.json is written last (save_checkpoint): it marks a checkpoint complete.
    names = os.listdir(ckdir) if os.path.isdir(ckdir) else []
    found = sorted((int(n[5:]), os.path.join(ckdir, n)) for n in names
                   if re.fullmatch(r"step_\d+", n) and os.path.isfile(os.path.join(ckdir, n, "trainer_state.json")))
    if cfg["resume"]:
        need(found, f"--resume: no finished checkpoint in {out}/checkpoints; start again with --overwrite (or "
             "check --out_dir; with several nodes it must be on a filesystem every node shares)")
        with open(saved) as f:
            old = json.load(f)
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in cfg.items()
                if k not in RESUME_MAY_CHANGE and old.get(k) != v]
        need(not diff, f"--resume with settings that differ from the run's ({saved}): {'; '.join(diff)}; "
             "resume with the same flags or use a new --out_dir")
    elif rank == 0 and (os.path.exists(saved) or found):
        need(cfg["overwrite"], f"{out} already holds a run; --resume continues it, --overwrite replaces it")
        shutil.rmtree(out)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        print("config: " + json.dumps(cfg, sort_keys=True))
        if not cfg["resume"]:
            models.write_json(saved, cfg)
        for d in (out, ckdir) if os.path.isdir(ckdir) else (out,):
            for path in [os.path.join(d, n) for n in os.listdir(d) if ".tmp" in n or ".old" in n]:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not cfg["resume"]:
        return {"step": 0, "nonfinite_total": 0}
    with open(os.path.join(found[-1][1], "trainer_state.json")) as f:
        state = dict(json.load(f), path=found[-1][1])
    if rank == 0:                     # line i is step i + 1: what follows was replayed or torn by a kill
        with open(log_path) as f:
            kept = f.readlines()[:state["step"]]
        with models.atomic_path(log_path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)
        print(f"resumed from {state['path']} at step {state['step']}")
    return state

def save_checkpoint(engine, state, cfg, rank):
    """LoRA weights, fp32 masters, AdamW moments: every process writes into checkpoints/.tmp_step_N,
    then rank 0 adds trainer_state.json, renames it to step_N and points `latest` (DeepSpeed's) at it."""
    ckdir, tag = os.path.join(cfg["out_dir"], "checkpoints"), f"step_{state['step']:06d}"
    # exclude_frozen_parameters: the base is re-read from model_path on resume.
    engine.save_checkpoint(ckdir, tag=f".tmp_{tag}", save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        models.write_json(os.path.join(ckdir, f".tmp_{tag}", "trainer_state.json"), state)
        with models.atomic_path(os.path.join(ckdir, tag)) as final:
            os.rename(os.path.join(ckdir, f".tmp_{tag}"), final)
        with models.atomic_path(os.path.join(ckdir, "latest")) as tmp, open(tmp, "w") as f:
            f.write(tag)
    torch.distributed.barrier()

def safe_torch_load(path, map_location=None):
    """DeepSpeed's loader unpickles anything (torch.load(weights_only=False)); this one loads tensors and
    DeepSpeed's own records only: the ZeRO stage enum, loss-scaler state, ZeRO-1/2 fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            what = re.search(r"GLOBAL (\S+)", str(e))
            raise models.UserError(f"refusing to unpickle {what.group(1) if what else 'an object'} from a checkpoint "
                                   f"({path}), more than tensors and DeepSpeed's records: resume only from train.py's")

# Processes: the device, DeepSpeed.
def select_device():
    """cuda:LOCAL_RANK on a GPU node, else the CPU, before any collective or CUDA allocation: under
    `deepspeed --num_gpus 8` every process starts on cuda:0, while rank k's NCCL group is bound to
    cuda:LOCAL_RANK (a collective on cuda:0 fails, zero.Init allocates on GPU 0). initialize is too late."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    need(local < torch.cuda.device_count(), f"LOCAL_RANK is {local} but this process sees {torch.cuda.device_count()} "
         f"GPUs (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one process per GPU")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)

def import_deepspeed():
    """deepspeed, quiet; on CPU without its shared-memory all-reduce op (read when it builds its backend),
    which it would JIT-compile with g++ on a first run (18 s on a 2-core Xeon): gloo does the few."""
    import deepspeed
    deepspeed.utils.logger.setLevel("WARNING")
    if deepspeed.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed

# The loop: one step, the loggers, the run (main).
def train_step(step, engine, opt, data, cfg, rank, pad_id):
    """One optimiser step over global_batch rows -> its log record (metrics: means over rows,
    micro-batches and processes; rows: what it read). A non-finite loss on any process skips it on all."""
    t0 = time.time()
    torch.manual_seed(cfg["seed"] * 1_000_003 + step)        # LoRA dropout: a function of the step
    # The lr, set by hand (no scheduler state: resume needs the step only): linear warmup (lr / warm
    # at step 0, never 0), then cosine to lr * min_lr_ratio at max_steps (paper: 5e-7 -> 5e-8), or constant.
    lr, warm, low = cfg["lr"], cfg["warmup_steps"], cfg["min_lr_ratio"]
    t = min(1.0, (step - warm) / max(1, cfg["max_steps"] - warm))
    lr = lr * (step + 1) / warm if step < warm else lr if cfg["lr_schedule"] == "constant" else \
        lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t)))
    for group in opt.param_groups:
        group["lr"] = lr
    rows, world, accum = step_rows(step, cfg, len(data)), cfg["world_size"], cfg["grad_accum"]
    # METRICS..., non-finite, tokens: summed on the device (NCCL reduces GPU tensors only) and
    # read once per step, so the host never waits for a micro-batch's backward.
    sums, grad_norm = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=engine.device), None
    for micro in range(accum):
        ids, pos, seg = micro_batch(data, rows, cfg, micro, rank, pad_id, engine.device)
        if cfg["reference"]:
            with engine.module.peft.disable_adapter(), torch.no_grad():
                ref, _ = engine(ids, pos, seg)               # the base model: adapter off, no grad
        logps, _ = engine(ids, pos, seg)                     # (B, 1+M) mean token log-probs
        # Chosen as likely as rejected: logo = log(1 + e^gamma), 0.97 for gamma 0.5, 3.05 for gamma 3
        # (--reference: exactly that at step 1). A run that learns drives reward_margin past gamma.
        refs = dict(ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1:]) if cfg["reference"] else {}
        loss, metrics = logo_loss(logps[:, 0], logps[:, 1:], cfg["beta"], gamma=cfg["gamma"],
                                  sft_weight=cfg["sft_weight"], **refs)
        loss = -logps[:, 0].mean() if cfg["loss"] == "sft" else loss   # sft: metrics["sft"], with grad
        engine.backward(loss)                                # DeepSpeed divides by grad_accum
        # The loss before DeepSpeed's scaling; tokens: prefix + all responses, no padding.
        vals = torch.stack([loss.detach()] + [metrics[k].detach() for k in METRICS[1:]]).double()
        sums += torch.cat([vals, (~vals[:1].isfinite()).double(), (seg >= 0).sum().double()[None]])
        if micro == accum - 1:                               # before the update: agree on a skip
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()                                # the step's one host sync
            opt.skip = bool(sums[-2] > 0)                    # the same answer on every process
            # DeepSpeed reports no norm for ZeRO 0 in float32, where the gradients are still in p.grad
            if cfg["zero_stage"] == 0 and cfg["dtype"] == "float32":
                norms = [p.grad.detach().norm() for p in engine.module.parameters() if p.grad is not None]
                grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None
        engine.step()                                        # updates after the last micro-batch only
    skipped, opt.skip, seconds = bool(sums[-2] > 0), False, time.time() - t0
    grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
    rec = {"step": step + 1, **{k: float(sums[i]) / (accum * world) for i, k in enumerate(METRICS)},
           "lr": lr, "grad_norm": None if skipped or grad_norm is None else float(grad_norm), "tokens": int(sums[-1]),
           "tokens_per_s": float(sums[-1]) / seconds, "seconds_per_step": seconds, "skipped": skipped, "rows": rows}
    # NaN and inf -> None: json.dumps would write NaN, which is not JSON.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}

def loggers(cfg, log_path):
    """Rank 0's writers of a step's record: log.jsonl (appended and closed each step: a kill
    loses at most this step's line), the console line and --wandb."""
    def jsonl(rec):
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    short = ["loss", "logo", "sft", "r_chosen", "r_rejected", "margin", "acc"]    # METRICS, shortened
    writers = [jsonl, lambda rec: tqdm.write(" | ".join([f"step {rec['step']:5d}"] + [
        f"{n} {'nan' if rec[k] is None else format(rec[k], '.4f')}" for n, k in zip(short, METRICS)]
        + [f"lr {rec['lr']:.2e}", f"{rec['tokens_per_s']:.0f} tok/s", f"{rec['seconds_per_step']:.2f} s/step"]
        + (["SKIPPED: non-finite loss"] if rec["skipped"] else [])))]
    if cfg["wandb"]:                  # imported only when asked
        try:
            import wandb
        except ImportError:
            raise models.UserError("--wandb needs the wandb package; pip install wandb") from None
        wandb.init(project=cfg["wandb"], config=cfg, resume="allow")
        writers.append(lambda rec: wandb.log(rec, step=rec["step"]))
    return writers

def summary(log_path):
    """The first quarter of the run's finite steps against the last: what the demo should show."""
    with open(log_path) as f:
        recs = [r for r in map(json.loads, f) if not r["skipped"]]
    if not recs:
        return "no step finished with a finite loss"
    q, mean = max(1, len(recs) // 4), lambda rs, k: sum(r[k] for r in rs) / len(rs)
    a, b = recs[:q], recs[-q:]
    return (f"steps {a[0]['step']}-{a[-1]['step']} vs {b[0]['step']}-{b[-1]['step']}: " + ", ".join(
        f"{k} {mean(a, k):.3f} -> {mean(b, k):.3f}" for k in ("loss", "reward_margin", "reward_accuracy"))
        + f"; {sum(r['seconds_per_step'] for r in recs) / 60:.1f} min of steps")

def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.print_ds_config:          # before any rendezvous or model load
        return print(json.dumps(ds_config(cfg), indent=2))
    # Plain `python train.py`: one process; DeepSpeed reads the rendezvous from here (else it seeks MPI).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        os.environ.setdefault(k, v)
    rank = int(os.environ["RANK"])    # global rank (--local_rank: the GPU on this node)
    select_device()                   # before any collective or CUDA allocation
    tok, data = load_data(cfg)        # a bad input fails in seconds, before DeepSpeed is imported
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    state, deepspeed = start_run(cfg, rank, log_path), import_deepspeed()
    if cfg["world_size"] > 1:
        deepspeed.init_distributed()
    engine, opt = build(cfg, rank, state.get("path"))
    writers = loggers(cfg, log_path) if rank == 0 else []
    end = min(cfg["max_steps"], cfg["stop_after"] or cfg["max_steps"])   # the lr schedule spans max_steps
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0   # any id: padding is never seen or scored
    nonfinite, streak = state["nonfinite_total"], 0                      # streak: non-finite steps in a row
    engine.train()
    with tqdm(total=cfg["max_steps"], initial=state["step"], disable=rank != 0, desc="train", unit="step",
              dynamic_ncols=True) as bar:   # closed (its line ended) before an error is printed
        for step in range(state["step"], end):
            rec = train_step(step, engine, opt, data, cfg, rank, pad_id)
            streak, nonfinite = (streak + 1 if rec["skipped"] else 0), nonfinite + rec["skipped"]
            rec["nonfinite_steps"] = nonfinite
            for w in writers:
                w(rec)
            bar.update(1)
            need(streak < cfg["max_nonfinite_steps"], f"the loss was non-finite for {streak} steps in a row (steps "
                 f"{step + 2 - streak}-{step + 1}, skipped) ({log_path}); lower --lr or check the data, then --resume")
            if (step + 1) % cfg["save_every"] == 0 or step + 1 == cfg["stop_after"]:
                save_checkpoint(engine, {"step": step + 1, "nonfinite_total": nonfinite}, cfg, rank)
    if end < cfg["max_steps"]:
        if rank == 0:
            print(f"stopped after step {end} (--stop_after); continue with --resume")
        return
    export(engine, tok, data, cfg, rank, pad_id)
    # The last collective is done: close the group, on success only (a failed rank may leave the others
    # inside one; exiting with it open can abort in gloo's threads).
    torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"summary: {summary(log_path)}; {nonfinite} non-finite steps skipped")
        print(f"saved the adapter to {os.path.join(cfg['out_dir'], 'final')}")

if __name__ == "__main__":
    try:
        main()
    except models.UserError as e:     # every process says it; other ranks name themselves
        rank = os.environ.get("RANK", "0")
        print(f"error: {'' if rank == '0' else f'[rank {rank}] '}{e}", file=sys.stderr)
        sys.exit(2)
