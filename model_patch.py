"""
The packed forward pass of LOGO on HF Llama / Mistral: M+1 responses scored against one
shared context in one pass, plus the RoPE settings for longer windows. (Presets and
loading live in models.py; this file does not import it.)

Copy this file with loss.py into another project: it imports torch and transformers only
(plus loss.py for the log-probs). Nothing here is patched at import time; every function
is explicit. Architectures other than those in PACKED_ARCHITECTURES are refused with one
line: their packed log-probs have not been tested equal to separate HF forwards.

The packed row (this is also the on-disk format prepare.py writes and train.py reads):

    input_ids    (T,)  prefix (context + question) | chosen | rejected 1 | ... | rejected M | pad
    position_ids (T,)  synthesized; every response starts at the same position
    segment_ids  (T,)  0 = prefix, 1 = chosen, 2..M+1 = rejected, -1 = padding

A prefix token attends causally to the prefix; a response token attends to the whole
prefix and causally to its own segment; padding attends only to itself. One forward pass
replaces the authors' M+1 copies of the context, and the output layer runs only on the
hidden states that predict response tokens. The attention never computes the masked
blocks: the causal prefix kernel plus one small block for the responses on CPU,
FlexAttention on CUDA (see "The packed forward" below; bench.py measures the gain).

    logps, counts = response_logps(model, input_ids, position_ids, segment_ids)  # (B, 1+M)
"""

import functools
import sys

import torch

from loss import sequence_logps, token_logps

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

# ----------------------------------------------------------------------------------------
# The packed forward. Three exact ways to run the attention of a packed row:
#   "split" (CPU default): the prefix through SDPA's causal kernel, then all response
#       queries at once against [prefix, response] keys under a small (R, P+R) additive mask
#       (P prefix, R response tokens). Nothing (T, T) is built or computed.
#   "flex" (CUDA default, needs triton): FlexAttention with a BlockMask from the segment
#       ids; fully masked blocks (prefix x responses, response x other responses) are skipped.
#   "mask" (the reference): a dense (B, 1, T, T) additive mask through the model's own
#       eager or SDPA attention, which computes every masked block.
# "split" and "flex" run in a function registered in transformers' attention registry. The
# layout reaches it as an explicit `packed_layout` keyword of the model's forward, which
# transformers hands to every attention call and gradient checkpointing keeps for the
# recompute. Calls without it (generation, evaluation) run the model's own attention.

# The architectures whose packed log-probs are tested equal to separate HF forwards
# (tests/test_model_patch.py). Others are refused: response_logps calls lm.model and
# lm.lm_head directly, which skips anything a *ForCausalLM does after the head (Gemma-2's
# final-logit softcapping: 8e-4 off, silently), and their attention may differ in ways the
# packed kernels do not reproduce. To add one, add it to the parity tests first.
PACKED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

def check_packable(lm, longest_row):
    """Refuse (ValueError, one line) what the packed forward cannot compute exactly: an
    architecture outside PACKED_ARCHITECTURES, or a sliding window shorter than a
    prefix + response row. A window at least that long never binds in the authors' layout
    (each response sees only its prefix), so ignoring it is exact; a shorter one would have
    to be applied in unpacked coordinates, which none of the three attention paths does.
    longest_row: the most tokens of any prefix + one response in the batch."""
    name = type(lm).__name__
    if name not in PACKED_ARCHITECTURES:
        raise ValueError(f"packed log-probs are tested for {', '.join(PACKED_ARCHITECTURES)} only, "
                         f"not {name}; use response_logps_unpacked (or add {name} to the parity tests)")
    window = getattr(lm.config, "sliding_window", None)
    if window is not None and getattr(lm.config, "use_sliding_window", True):
        if longest_row > window:
            raise ValueError(f"a prefix + response row has {longest_row} tokens, more than the model's "
                             f"sliding window of {window}: packed attention has no sliding window")

def causal_lm(model):
    """The *ForCausalLM under a peft / DeepSpeed wrapper (LoRA layers stay injected)."""
    while True:          # (peft forwards unknown attributes: hasattr(lm_head) tells nothing)
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()                    # peft
        elif hasattr(model, "module"):
            model = model.module                              # DeepSpeed engine, DDP
        else:
            return model

def packed_row_bounds(segment_ids):
    """Check the layout of (B, T) segment ids; return 1 + M and [(P, E)] per row: P prefix
    tokens, padding from E on. Every row must read 0..0 1..1 2..2 ... (M+1)..(M+1) -1..-1
    (non-empty prefix, a chosen response, every response once and in order), else ValueError."""
    seg = segment_ids.detach().cpu()
    num_resp, bounds = max(int(seg.max()), 1), []           # an all-prefix row: no chosen
    for b, s in enumerate(seg):
        runs = torch.unique_consecutive(s).tolist()
        if runs not in (list(range(num_resp + 1)), list(range(num_resp + 1)) + [-1]):
            raise ValueError(f"row {b}: segment ids must run 0 (prefix), 1 (chosen), 2..{num_resp} "
                             f"(rejected), then -1 (padding), each once and in order; got {runs}")
        bounds.append((int((s == 0).sum()), int((s >= 0).sum())))
    return num_resp, bounds

def longest_responses(segment_ids):
    """(B, T) segment ids -> per row the length of its longest response (a list)."""
    seg = segment_ids.detach().cpu()
    return [max(int((s == j).sum()) for j in range(1, int(s.max()) + 1)) for s in seg]

def packed_mask_mod(segment_ids):
    """FlexAttention mask_mod of packed rows: may query q attend to key kv? The prefix is
    causal; a response sees the prefix and its own earlier tokens; padding only itself."""
    def mask_mod(b, h, q, kv):
        sq, sk = segment_ids[b, q], segment_ids[b, kv]
        return ((kv <= q) & (((sk == 0) & (sq >= 0)) | ((sk == sq) & (sq > 0)))) | (q == kv)
    return mask_mod

def packed_attention_mask(segment_ids, dtype):
    """(B, T) segment ids -> (B, 1, T, T) additive mask in `dtype`: 0 attend, dtype min blocked.
    (In transformers 5.23 a bool mask is silently wrong under eager attention, and a 1/0
    float mask under both eager and SDPA: it has to be additive.)"""
    B, T = segment_ids.shape
    b, i = torch.arange(B, device=segment_ids.device), torch.arange(T, device=segment_ids.device)
    allowed = packed_mask_mod(segment_ids)(b[:, None, None], 0, i[:, None], i)   # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

class PackedLayout:
    """What packed attention needs, built once per forward (not per layer).

    bounds [(P, E)] per row; resp_masks per row an additive (1, 1, E-P, E) mask for the
    response queries (0 over the prefix, causal in the own segment, blocked elsewhere), or
    block_mask for flex. `mask` is the attention_mask handed to the model: transformers
    takes any 4D tensor or BlockMask as final, so it builds no (T, T) mask and never reads
    the position resets at each response start as separate packed sequences. For split it
    is the (B, 1, 1, T) integer segment ids, which any attention but ours rejects loudly.
    """

    def __init__(self, segment_ids, dtype, flex=False, bounds=None):
        self.bounds = bounds or packed_row_bounds(segment_ids)[1]
        self.resp_masks, self.block_mask = [], None
        if flex:
            B, T = segment_ids.shape               # compiled: blockwise, never a (T, T) tensor
            build = flex_function("create_block_mask", segment_ids.device.type)
            self.block_mask = build(packed_mask_mod(segment_ids), B, None, T, T, device=segment_ids.device)
        for b, (P, E) in enumerate(self.bounds if not flex else []):
            r = segment_ids[b, P:E]                                       # (R,) response segments
            causal = torch.ones(E - P, E - P, dtype=torch.bool, device=r.device).tril()
            own = (r[:, None] == r) & causal                              # (R, R)
            mask = torch.zeros(E - P, E, dtype=dtype, device=r.device)  # prefix columns stay 0
            mask[:, P:].masked_fill_(~own, torch.finfo(dtype).min)
            self.resp_masks.append(mask[None, None])
        self.mask = self.block_mask if flex else segment_ids[:, None, None, :]

def split_attention(query, key, value, layout, scaling, dropout=0.0):
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), row by row.
    GQA through SDPA's enable_gqa (no repeated keys). Padding (from E on) gets zeros."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa, rows = query.shape[1] != key.shape[1], []
    for b, ((P, E), resp_mask) in enumerate(zip(layout.bounds, layout.resp_masks)):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        prefix = sdpa(q[:, :, :P], k[:, :, :P], v[:, :, :P], dropout_p=dropout, is_causal=True,
                      scale=scaling, enable_gqa=gqa)                     # (1, H, P, D)
        resp = sdpa(q[:, :, P:E], k[:, :, :E], v[:, :, :E], attn_mask=resp_mask.to(q.dtype),
                    dropout_p=dropout, scale=scaling, enable_gqa=gqa)  # (1, H, E-P, D)
        pad = q.new_zeros(1, q.shape[1], q.shape[2] - E, q.shape[3])
        rows.append(torch.cat([prefix, resp, pad], dim=2))               # (1, H, T, D)
    return (rows[0] if len(rows) == 1 else torch.cat(rows)).transpose(1, 2).contiguous()

def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     packed_layout=None, **kwargs):
    """Registered as 'logo_<base>' (e.g. logo_sdpa). With packed_layout: split or flex.
    Without: the model's own <base> attention, with the mask transformers built for it."""
    if packed_layout is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        base = module.config._attn_implementation[len("logo_"):]
        eager = sys.modules[type(module).__module__].eager_attention_forward  # the arch's own
        return ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if packed_layout.block_mask is None:
        return split_attention(query, key, value, packed_layout, scaling, dropout), None
    flex = flex_function("flex_attention", query.device.type)
    out = flex(query, key, value, block_mask=packed_layout.block_mask, scale=scaling,
               enable_gqa=query.shape[1] != key.shape[1])               # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None

# FlexAttention with static shapes. Its kernels work on FLEX_BLOCK x FLEX_BLOCK tiles;
# response_logps pads a batch to a multiple of it, so one compiled kernel serves every length
# of a 128-token bucket (tests/test_flex_training.py, 8 lengths in 3 buckets: 6 compiles;
# unpadded 16; dynamic shapes 4, then every length runs the slower dynamic-shape kernel).
FLEX_BLOCK = 128
# torch.compile backend per device type: inductor writes Triton kernels on CUDA; a device with
# none runs flex eagerly, materialising the (T, T) scores (on CPU forward only). The tests set
# "cpu": "aot_eager" to run the CUDA path's graphs (mask, GQA, checkpointed backward) on a CPU.
FLEX_COMPILE = {"cuda": "inductor"}
# One compile per (bucket, grad mode): an 8B run's 8.2K-9K-token rows span ~7 buckets, and past
# dynamo's default of 8 recompiles flex would fall back to eager, dense scores: an OOM on a GPU.
FLEX_RECOMPILE_LIMIT = 64

def flex_function(name, device_type):
    """create_block_mask or flex_attention, compiled for `device_type` as FLEX_COMPILE says,
    or the eager function when it names no backend for it."""
    from torch.nn.attention import flex_attention as fa
    backend = FLEX_COMPILE.get(device_type)
    return getattr(fa, name) if backend is None else _compiled(name, backend)

@functools.cache
def _compiled(name, backend):
    """torch.compile(fn, dynamic=False), once per (function, backend). torch.compile of
    create_block_mask is the current API (torch 2.13 deprecates its `_compile=True`)."""
    from torch.nn.attention import flex_attention as fa
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * FLEX_RECOMPILE_LIMIT)
    return torch.compile(getattr(fa, name), backend=backend, dynamic=False)

def pad_to_multiple(input_ids, position_ids, segment_ids, multiple):
    """Right-pad (B, T) packed rows to a length that is a multiple of `multiple`: token 0,
    position 0, segment -1 (padding attends only to itself and is never scored)."""
    extra = -input_ids.shape[1] % multiple
    if extra == 0:
        return input_ids, position_ids, segment_ids
    pad = torch.nn.functional.pad
    return pad(input_ids, (0, extra)), pad(position_ids, (0, extra)), pad(segment_ids, (0, extra), value=-1)

def use_packed_attention(model):
    """Switch a model to 'logo_<its attention>' (idempotent; response_logps calls it).

    Registers packed_attention and the base's mask builder under that name on first use,
    not at import. Calls without packed_layout behave exactly as before. The switch has to
    outlive response_logps: under gradient checkpointing, backward recomputes the attention.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    config = causal_lm(model).config
    base = config._attn_implementation or "eager"
    if not base.startswith("logo_"):
        if base not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise ValueError(f"packed attention wraps eager, sdpa, flash or flex attention, "
                             f"not {base!r}")
        ALL_ATTENTION_FUNCTIONS.register("logo_" + base, packed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register("logo_" + base, ALL_MASK_ATTENTION_FUNCTIONS[base])
        config._attn_implementation = "logo_" + base
    return model

def response_targets(segment_ids):
    """Which hidden state predicts which response token, for a packed batch.

    Returns (rows, src, dst, seg): the hidden state at (rows, src) predicts the token at
    (rows, dst), which belongs to response segment seg (1 = chosen). The first token of
    every response is predicted from the last prefix token, not from the previous response.
    """
    rows, dst = torch.nonzero(segment_ids > 0, as_tuple=True)
    seg = segment_ids[rows, dst]
    prefix_len = (segment_ids == 0).sum(1)                    # (B,) prefix comes first
    first = segment_ids[rows, dst - 1] != seg                 # first token of its response
    src = torch.where(first, prefix_len[rows] - 1, dst - 1)
    return rows, src, dst, seg

def response_logps(model, input_ids, position_ids, segment_ids, attention="auto", chunk_size=1024):
    """Mean per-token log-prob of every response in packed rows, in one forward pass.

    input_ids, position_ids, segment_ids: (B, T). Returns (logps, counts), both (B, 1+M):
    column 0 is the chosen response, columns 1..M the rejected ones; logps float32.
    attention: "auto" (flex on CUDA with triton, else split), "split", "flex" or "mask"
    (see above). All but "mask" switch the model once: use_packed_attention.
    """
    from torch.utils._triton import has_triton
    lm = causal_lm(model)
    seg_cpu = segment_ids.detach().cpu()                      # the forward's one host copy of the layout
    num_resp, bounds = packed_row_bounds(seg_cpu)             # 1 + M, and checks the layout
    check_packable(lm, max(P + r for (P, _), r in zip(bounds, longest_responses(seg_cpu))))
    if attention == "auto":
        attention = "flex" if input_ids.is_cuda and has_triton() else "split"
    dtype = next(lm.parameters()).dtype
    if attention == "mask":
        if lm.config._attn_implementation.removeprefix("logo_") not in ("eager", "sdpa"):
            raise ValueError("attention='mask' needs a model loaded with eager or sdpa attention")
        kwargs = dict(attention_mask=packed_attention_mask(segment_ids, dtype))
    elif attention in ("split", "flex"):
        if attention == "flex":                               # static shapes, see FLEX_BLOCK
            input_ids, position_ids, segment_ids = pad_to_multiple(input_ids, position_ids, segment_ids, FLEX_BLOCK)
        use_packed_attention(lm)
        layout = PackedLayout(segment_ids, dtype, flex=attention == "flex", bounds=bounds)
        kwargs = dict(attention_mask=layout.mask, packed_layout=layout)
    else:
        raise ValueError(f"attention must be auto, split, flex or mask, not {attention!r}")
    hidden = lm.model(input_ids=input_ids, position_ids=position_ids.long(), use_cache=False,
                      **kwargs).last_hidden_state             # (B, T, hidden)
    rows, src, dst, seg = response_targets(segment_ids)
    logits = lm.lm_head(hidden[rows, src])                    # (n_resp_tokens, V) only
    lp = token_logps(logits, input_ids[rows, dst], chunk_size)
    flat = rows * num_resp + (seg.long() - 1)                 # slot in (B * (1+M)) per token
    sums = torch.zeros(len(input_ids) * num_resp, dtype=torch.float32, device=lp.device)
    sums = sums.index_add(0, flat, lp)
    counts = torch.zeros_like(sums, dtype=torch.long).index_add(0, flat, torch.ones_like(flat))
    return (sums / counts).view(-1, num_resp), counts.view(-1, num_resp)

def response_logps_unpacked(model, input_ids, position_ids, segment_ids, chunk_size=1024):
    """The same numbers in the authors' layout, for tests and bench.py: every response in
    its own row prefix + response (B * (1+M) rows, right-padded), full-vocabulary logits
    for every token, then loss.sequence_logps. Returns (logps, counts) like response_logps."""
    lm = causal_lm(model)
    num_resp = packed_row_bounds(segment_ids)[0]
    ids, pos, scored = [], [], []
    for b in range(len(segment_ids)):
        for j in range(1, num_resp + 1):
            keep = (segment_ids[b] == 0) | (segment_ids[b] == j)
            ids.append(input_ids[b, keep])
            pos.append(position_ids[b, keep])
            scored.append(segment_ids[b, keep] == j)
    L = max(len(x) for x in ids)

    def pad(rows):
        return torch.stack([torch.nn.functional.pad(x, (0, L - len(x))) for x in rows])
    # A 2D attention mask, even all ones: with none, transformers reads every jump in the
    # synthesized positions as the start of a new packed sequence.
    logits = lm(input_ids=pad(ids), position_ids=pad(pos).long(), use_cache=False,
                attention_mask=pad([torch.ones_like(x) for x in ids])).logits  # (B*(1+M), L, V)
    scored = pad(scored)
    logps = sequence_logps(logits, pad(ids), scored, chunk_size)
    return logps.view(-1, num_resp), scored.sum(1).view(-1, num_resp)
