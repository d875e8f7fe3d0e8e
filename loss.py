"""
The LOGO loss (Tang et al. 2024, arXiv 2410.18533, Eq. 2-3), one file, imports only torch.

Copy this file into your own trainer; it needs nothing else from this repo.

For one sample with a context+question x, one chosen response y_w and M >= 1 rejected
responses y_l^1..y_l^M, the reward of a response is its length-normalised log-likelihood
(SimPO, no reference model):

    r(y)  = beta / |y| * log pi(y | x)                          (= beta * mean token log-prob)

    L     = -log sigmoid( r(y_w) - 1/M * sum_j r(y_l^j) - gamma )        Eq. 2
            + lambda * ( -1/|y_w| * log pi(y_w | x) )                     Eq. 3, SFT term

The paper prints the SFT term as "+ lambda * log pi(y_w|x)"; as something to minimise it
must be the negative log-likelihood, which is what we add. M = 1 and lambda = 0 is SimPO.

The reference-based variant (the paper's Fig. 6c comparison; DPO's implicit reward, still
length-normalised so that beta and gamma keep their scale) measures each response against a
frozen reference policy pi_ref, e.g. the base model with the LoRA adapter switched off:

    r_ref(y) = beta / |y| * ( log pi(y | x) - log pi_ref(y | x) )       replaces r(y) in Eq. 2

Pass ref_chosen_logps / ref_rejected_logps (the reference's mean token log-probs, no grad)
to use it. At the first step of LoRA training pi = pi_ref, so every r_ref is exactly 0 and
the preference term is log(1 + e^gamma). (DPO proper sums the token log-probs and has no
gamma: pass mean * length as the log-probs and gamma=0.) The SFT term is unchanged.

Shapes: chosen_logps (B,) and rejected_logps (B, M) are *mean per-token* log-probs of
the response tokens given everything before them (see `sequence_logps` for the shift).
gamma is an absolute margin (paper: Llama-3-8B beta=10 gamma=3; Mistral-7B beta=2.5
gamma=0.25; Llama-2-7B beta=3 gamma=0.6). SimPO and the authors' code pass gamma/beta
instead: use `gamma_beta_ratio=` for that convention (gamma = ratio * beta).

Usage in your own trainer:

    from loss import logo_loss, sequence_logps
    c = sequence_logps(chosen_logits, chosen_ids, chosen_mask)        # (B,)
    r = torch.stack([sequence_logps(l, i, m) for l, i, m in rejected], dim=1)  # (B, M)
    loss, metrics = logo_loss(c, r, beta=10.0, gamma=3.0, sft_weight=0.1)
    loss.backward()
"""

import torch
import torch.nn.functional as F

def logo_loss(chosen_logps, rejected_logps, beta, gamma=None, sft_weight=0.0,
              gamma_beta_ratio=None, ref_chosen_logps=None, ref_rejected_logps=None):
    """Eq. 2 + lambda * Eq. 3 SFT term, averaged over the batch.

    chosen_logps (B,), rejected_logps (B, M): mean per-token log-probs.
    Pass exactly one of gamma (absolute margin) or gamma_beta_ratio (gamma / beta).
    ref_chosen_logps (B,), ref_rejected_logps (B, M): the reference-based variant (above);
    both or neither.
    Returns (loss, metrics): a scalar with grad, and a dict of detached scalars, all in
    float32 (float64 for float64 inputs) whatever the input dtype.
    """
    if (gamma is None) == (gamma_beta_ratio is None):
        raise ValueError("pass exactly one of gamma (absolute) or gamma_beta_ratio (gamma / beta)")
    if gamma is None:
        gamma = gamma_beta_ratio * beta
    if chosen_logps.dim() != 1 or rejected_logps.dim() != 2 \
            or rejected_logps.shape[0] != chosen_logps.shape[0] or rejected_logps.shape[1] < 1:
        raise ValueError(f"expected chosen_logps (B,) and rejected_logps (B, M) with M >= 1, got "
                         f"{tuple(chosen_logps.shape)} and {tuple(rejected_logps.shape)}")
    # At least float32 (bf16 keeps ~3 digits, too few for beta * logp); float64 stays float64.
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    c = chosen_logps.to(dtype)                                # (B,)
    r = rejected_logps.to(dtype)                              # (B, M)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    c_ref = c if ref_chosen_logps is None else c - ref_chosen_logps.detach().to(dtype)
    r_ref = r if ref_rejected_logps is None else r - ref_rejected_logps.detach().to(dtype)
    if c_ref.shape != c.shape or r_ref.shape != r.shape:
        raise ValueError("reference log-probs must have the shapes of chosen_logps and rejected_logps")
    reward_chosen = beta * c_ref                              # (B,)  r(y_w)
    reward_rejected = beta * r_ref.mean(dim=1)                # (B,)  1/M sum_j r(y_l^j)
    margin = reward_chosen - reward_rejected                  # (B,)
    # -log sigmoid(z) computed stably; at step 0 chosen ~ rejected so this is ~ log(1 + e^gamma)
    logo = -F.logsigmoid(margin - gamma)                      # (B,)
    sft = -c                                                  # (B,)  mean token NLL of y_w
    loss = (logo + sft_weight * sft).mean()
    metrics = {
        "logo": logo.mean(),
        "sft": sft.mean(),
        "reward_chosen": reward_chosen.mean(),
        "reward_rejected": reward_rejected.mean(),
        "reward_margin": margin.mean(),
        "reward_accuracy": (margin > 0).float().mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}

# ----------------------------------------------------------------------------------------
# From logits to log-probs. The next-token shift happens in exactly one place:
# `sequence_logps` pairs logits[:, t] with labels[:, t + 1]. `token_logps` takes
# already-paired rows, so callers that gather hidden states themselves (model_patch.py
# runs the output layer only where a response token is predicted) do the pairing once.

class _TokenLogps(torch.autograd.Function):
    """log_softmax(logits)[target], row-chunked, without keeping float32 vocab copies.

    autograd through `logits.float().log_softmax(-1)` would save an (N, V) float32 tensor
    for backward (for Llama-3: 128,256 floats = 0.5 MB per token). We save only the
    logits as given (often bf16) and the (N,) log-normaliser, and recompute the softmax
    chunk by chunk in backward: d logp / d logits = onehot(target) - softmax(logits).
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_size):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for i in range(0, logits.shape[0], chunk_size):
            x = logits[i:i + chunk_size].float()              # (chunk, V) float32, freed next loop
            lse[i:i + chunk_size] = torch.logsumexp(x, dim=-1)
            out[i:i + chunk_size] = x.gather(-1, targets[i:i + chunk_size, None])[:, 0]
        out -= lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.chunk_size):
            sl = slice(i, i + ctx.chunk_size)
            g = -torch.exp(logits[sl].float() - lse[sl, None])  # -softmax, (chunk, V)
            g.scatter_add_(-1, targets[sl, None], torch.ones_like(g[:, :1]))
            grad[sl] = (g * grad_out[sl, None]).to(logits.dtype)
        return grad, None, None

def token_logps(logits, targets, chunk_size=1024):
    """log p(targets[n] | row n) for logits (N, V) of any float dtype; returns (N,) float32.

    Rows must already be paired with the token they predict (no shift here)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must agree on every dimension but the last")
    flat = logits.reshape(-1, logits.shape[-1])
    return _TokenLogps.apply(flat, targets.reshape(-1).long(), chunk_size).view(targets.shape)

def sequence_logps(logits, labels, loss_mask, chunk_size=1024):
    """Mean log-prob of the masked tokens of each row: (B, T, V), (B, T), (B, T) -> (B,).

    THE SHIFT: the logits at position t predict the token at t + 1, so logits[:, :-1] are
    scored against labels[:, 1:], and loss_mask[:, 1:] says which of those labels count
    (mark the response tokens; the first response token is then predicted from the last
    prompt token, as it should be). Rows with an empty mask give NaN on purpose.
    """
    lp = token_logps(logits[:, :-1], labels[:, 1:], chunk_size)   # (B, T-1)
    m = loss_mask[:, 1:].float()
    return (lp * m).sum(-1) / m.sum(-1)
