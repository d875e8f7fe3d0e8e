"""
Peak host memory of building a ZeRO-3 training model on each process: the model loaded whole
on every process (--mode whole: what train.py does for ZeRO 0-2) or built partitioned
(--mode zero3: models.load_model(zero3=...), what train.py does for ZeRO-3), then LoRA and
deepspeed.initialize as in train.py's build(). Not a test (pytest does not collect it):
the measurement behind the README's "ZeRO-3 memory" figures.

Prints one JSON line per process. For each phase (load, lora, initialize): the peak
resident set during that phase (VmHWM, reset at the phase's start through
/proc/self/clear_refs) and the resident set at its end, split into anonymous memory
(RssAnon: tensors, malloc) and file pages (RssFile: mmap'ed checkpoint, libraries), in MiB.
"growth" is each peak minus the resident set at the start (after imports and the process
group), i.e. what building the model cost this process.

    PYTHONPATH=. python tests/zero3_load_memory.py --make /tmp/m129   # random 129M-parameter Llama, 490 MiB
    PYTHONPATH=. deepspeed --num_gpus 2 tests/zero3_load_memory.py --mode whole --model /tmp/m129
    PYTHONPATH=. deepspeed --num_gpus 2 tests/zero3_load_memory.py --mode zero3 --model /tmp/m129
"""

import argparse
import json
import os

import torch

import models

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--make", default=None, help="write the random model to this folder and exit")
p.add_argument("--mode", choices=["whole", "zero3"], default="zero3", help="how the model is loaded")
p.add_argument("--model", default=None, help="a model folder (from --make)")
p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
args = p.parse_args()


def status():
    """/proc/self/status -> {key: MiB} for the memory lines."""
    with open("/proc/self/status") as f:
        rows = [line.split() for line in f if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))]
    return {r[0].rstrip(":"): int(r[1]) // 1024 for r in rows}


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:     # "5": VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


if args.make:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(args.make)
    raise SystemExit
import deepspeed
from peft import LoraConfig, get_peft_model
deepspeed.init_distributed()
world = int(os.environ["WORLD_SIZE"])
ds = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
      "zero_force_ds_cpu_optimizer": False}
torch.distributed.all_reduce(torch.ones(1))          # the communication backend is set up first
start = status()["VmRSS"]
phases = {}


def mark(name):
    s = status()
    phases[name] = dict(peak=s["VmHWM"], growth=s["VmHWM"] - start, rss=s["VmRSS"],
                        anon=s["RssAnon"], file=s["RssFile"])
    reset_peak()


reset_peak()
model = models.load_model(args.model, zero3=ds if args.mode == "zero3" else None)
mark("load")
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj", "embed_tokens"]))
mark("lora")
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
deepspeed.initialize(model=model, optimizer=opt, config=ds)
mark("initialize")
held = sum(q.ds_tensor.numel() * q.ds_tensor.element_size() for q in model.parameters()) / 2**20
print(json.dumps(dict(mode=args.mode, rank=int(os.environ["RANK"]), start=start,
                      held_mib=round(held), **phases)), flush=True)
