"""
Positional indices synthesis (LOGO paper Sec. 3.1, Eq. 4 and Appendix D), imports only torch.

A real context of k tokens gets position ids spread over a longer window of K positions,
so a model learns (or keeps) long-range relative distances while attention only ever sees
k real tokens. LOGO: k = 16 chunks x 512 = 8,192 real tokens, K = 64K or 80K positions.

Continuous-chunk synthesis (9 samples in 10): one bias b_j per chunk, so positions inside a
chunk stay consecutive (local text structure intact) and gaps fall only between chunks.
Sparse-chunk synthesis (1 in 10): an independent gap before every token, which fills in
the relative distances that the between-chunk gaps of the continuous mode skip.

Why Eq. 4 as printed must be corrected: it draws b_i ~ U(1, j * (K - k) / N) for the
token's chunk j, independently per chunk, so chunk 5 can get a smaller bias than chunk 4
and positions run backwards (two chunks can even collide). Rotary models read relative
distances, so a backwards jump tells the model that later text came first. We draw chunk
j's bias from its own stratum [j*D, (j+1)*D] with D = (K - k) / N: the biases are
non-decreasing, positions are strictly increasing, chunk 0 can start at 0 and the last
chunk can end at K - 1, so the whole window is reachable.

The question and the M+1 responses follow the context (`pack_position_ids`): the question
continues right after the last context position and every response starts at the same
position right after the question, because they are alternative answers to one prompt.

    from positions import synthesize_position_ids, draw_mode, pack_position_ids
    g = torch.Generator().manual_seed(0)
    ctx = synthesize_position_ids([512] * 16, 65536, draw_mode(0.1, g), g)   # (8192,)
    pos = pack_position_ids(ctx, question_len=40, response_lens=[60, 55, 70])
"""

import torch

def synthesize_position_ids(chunk_lens, target_len, mode, generator=None):
    """Position ids for sum(chunk_lens) real tokens spread over [0, target_len).

    chunk_lens: lengths of the context chunks in order (the last may be shorter).
    mode: "continuous" (one bias per chunk) or "sparse" (a gap before every token).
    Returns an int64 tensor of length sum(chunk_lens), strictly increasing, all in
    [0, target_len); exactly arange(k) when target_len == k.
    """
    chunk_lens = [int(n) for n in chunk_lens]
    if not chunk_lens or min(chunk_lens) < 1:
        raise ValueError(f"chunk_lens must be a non-empty list of positive lengths, got {chunk_lens}")
    k, n = sum(chunk_lens), len(chunk_lens)
    if target_len < k:
        raise ValueError(f"target_len {target_len} is shorter than the {k} real tokens; "
                         "synthesis can only spread positions out, never squeeze them")
    slack = target_len - k                                    # K - k positions to skip in total
    if mode == "continuous":
        # Stratum j is [floor(j*slack/n), floor((j+1)*slack/n)]; strata touch, so the
        # biases are non-decreasing. randint's upper bound is exclusive, hence + 1.
        lo = torch.arange(n) * slack // n                     # (n,)
        hi = (torch.arange(n) + 1) * slack // n               # (n,)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        bias = lo + (u * (hi - lo + 1)).long().clamp(max=hi - lo)  # (n,) uniform integers in [lo, hi]
        bias = torch.repeat_interleave(bias, torch.tensor(chunk_lens))
        return torch.arange(k) + bias
    if mode == "sparse":
        # A uniform random k-subset of the window, sorted: every gap is random and the
        # positions are spread uniformly over [0, K). randperm is O(K): fine for K <= 1M.
        return torch.randperm(target_len, generator=generator)[:k].sort().values
    raise ValueError(f"mode must be 'continuous' or 'sparse', got {mode!r}")

def draw_mode(sparse_ratio, generator=None):
    """'sparse' with probability sparse_ratio, else 'continuous' (paper: 1 in 10 sparse)."""
    u = torch.rand((), generator=generator).item()
    return "sparse" if u < sparse_ratio else "continuous"

def pack_position_ids(context_position_ids, question_len, response_lens):
    """Positions of the packed row: context, then question, then each response in turn.

    The question continues right after the last context position; every response starts
    at the same position, right after the question. Returns int64 of length
    len(context) + question_len + sum(response_lens). To keep every position inside a
    window K, synthesize the context into K - question_len - max(response_lens).
    """
    ctx = torch.as_tensor(context_position_ids, dtype=torch.int64)
    start = int(ctx[-1]) + 1 if len(ctx) else 0
    question = start + torch.arange(question_len)
    answer_start = start + question_len
    responses = [answer_start + torch.arange(r) for r in response_lens]
    return torch.cat([ctx, question, *responses])

def distance_coverage(position_ids_list, target_len, batch_size=32):
    """Fraction of relative distances 0..target_len-1 that occur between two positions of
    the same sample, in at least one sample. The goal of the synthesis is a value near 1.

    For each sample the autocorrelation of its 0/1 position indicator x counts, for every
    distance d, the pairs (t, t + d) that are both occupied: sum_t x[t] x[t + d]. One FFT
    of length 2K (zero-padded, so it is not circular) gives all K distances at once.
    """
    covered = torch.zeros(target_len, dtype=torch.bool)
    for i in range(0, len(position_ids_list), batch_size):
        batch = position_ids_list[i:i + batch_size]
        x = torch.zeros(len(batch), target_len, dtype=torch.float64)   # (b, K) indicators
        for row, pos in enumerate(batch):
            pos = torch.as_tensor(pos, dtype=torch.int64)
            if pos.numel() and (pos.min() < 0 or pos.max() >= target_len):
                raise ValueError(f"sample {i + row} has positions outside [0, {target_len})")
            x[row, pos] = 1.0
        f = torch.fft.rfft(x, n=2 * target_len)
        autocorr = torch.fft.irfft(f * f.conj(), n=2 * target_len)[:, :target_len]
        covered |= (autocorr > 0.5).any(dim=0)                # counts are integers; FFT noise << 0.5
    return covered.double().mean().item()
