"""loss.py against hand-worked values, SimPO's formula and a brute-force loop."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from loss import logo_loss, sequence_logps, token_logps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def brute_force(chosen, rejected, beta, gamma, sft_weight):
    """Eq. 2 + lambda * NLL, one Python float at a time."""
    total = 0.0
    for c, rs in zip(chosen, rejected):
        z = beta * c - beta * sum(rs) / len(rs) - gamma
        total += -log_sigmoid(z) + sft_weight * (-c)
    return total / len(chosen)


def test_a_hand_worked_example_gives_the_hand_computed_loss_and_metrics():
    # c = -1, r = (-2, -3), beta = 2, gamma = 0.5:
    # reward_chosen = -2, reward_rejected = 2 * -2.5 = -5, margin = 3, z = 2.5
    # logo = log(1 + e^-2.5) = 0.0788897, sft = 1, loss = 0.0788897 + 0.1 * 1
    loss, m = logo_loss(torch.tensor([-1.0]), torch.tensor([[-2.0, -3.0]]), beta=2.0, gamma=0.5,
                        sft_weight=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.5)) + 0.1, abs=1e-6)
    assert m["logo"].item() == pytest.approx(0.0788897, abs=1e-6)
    assert m["sft"].item() == pytest.approx(1.0)
    assert m["reward_chosen"].item() == pytest.approx(-2.0)
    assert m["reward_rejected"].item() == pytest.approx(-5.0)
    assert m["reward_margin"].item() == pytest.approx(3.0)
    assert m["reward_accuracy"].item() == 1.0


def test_one_rejected_and_no_sft_term_is_exactly_simpo():
    g = torch.Generator().manual_seed(0)
    c, r = -torch.rand(8, generator=g) * 3, -torch.rand(8, 1, generator=g) * 3
    beta, gamma = 10.0, 3.0
    # SimPO (Meng et al. 2024, Eq. 6) written independently with the sigmoid itself
    simpo = -torch.log(torch.sigmoid(beta * c - beta * r[:, 0] - gamma)).mean()
    loss, _ = logo_loss(c, r, beta=beta, gamma=gamma)
    assert loss.item() == pytest.approx(simpo.item(), rel=1e-6)


@pytest.mark.parametrize("M", [1, 2, 3, 5])
@pytest.mark.parametrize("B", [1, 4])
def test_any_number_of_rejected_matches_a_brute_force_loop(M, B):
    g = torch.Generator().manual_seed(M * 10 + B)
    c, r = -torch.rand(B, generator=g) * 4, -torch.rand(B, M, generator=g) * 4
    loss, m = logo_loss(c, r, beta=2.5, gamma=0.25, sft_weight=0.1)
    expected = brute_force(c.tolist(), r.tolist(), 2.5, 0.25, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    acc = sum(ci > sum(ri) / M for ci, ri in zip(c.tolist(), r.tolist())) / B
    assert m["reward_accuracy"].item() == pytest.approx(acc)


def test_gamma_beta_ratio_is_the_same_loss_as_the_absolute_gamma():
    c, r = torch.tensor([-0.5, -1.5]), torch.tensor([[-1.0, -2.0], [-1.0, -0.2]])
    a, _ = logo_loss(c, r, beta=10.0, gamma=3.0)
    b, _ = logo_loss(c, r, beta=10.0, gamma_beta_ratio=0.3)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)
    with pytest.raises(ValueError, match="exactly one"):
        logo_loss(c, r, beta=10.0, gamma=3.0, gamma_beta_ratio=0.3)
    with pytest.raises(ValueError, match="exactly one"):
        logo_loss(c, r, beta=10.0)


def test_gradients_reach_both_inputs_and_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    c = (-torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_()
    r = (-torch.rand(3, 2, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c, r: logo_loss(c, r, beta=2.0, gamma=0.5, sft_weight=0.1)[0], (c, r))
    loss, _ = logo_loss(c, r, beta=2.0, gamma=0.5, sft_weight=0.1)
    loss.backward()
    assert (c.grad != 0).all() and (r.grad != 0).all()
    # d loss / d c = (-sigmoid(-z) * beta - sft_weight) / B by hand, for every sample
    z = 2.0 * c.detach() - 2.0 * r.detach().mean(1) - 0.5
    torch.testing.assert_close(c.grad, (-torch.sigmoid(-z) * 2.0 - 0.1) / 3)
    torch.testing.assert_close(r.grad, (torch.sigmoid(-z) * 2.0 / 2 / 3)[:, None].expand(3, 2))


def test_bf16_inputs_give_the_float64_result_of_the_rounded_inputs():
    # beta=10 turns bf16's ~3 digits of a log-prob into a reward error of ~0.03: the loss
    # must be computed in float32 at least, so from bf16 inputs it equals, to float32
    # precision, the formula evaluated in float64 on the same (rounded) inputs.
    g = torch.Generator().manual_seed(2)
    c, r = -torch.rand(4, generator=g) * 2, -torch.rand(4, 2, generator=g) * 2
    cb, rb = c.bfloat16(), r.bfloat16()
    lb, mb = logo_loss(cb, rb, beta=10.0, gamma=3.0, sft_weight=0.1)
    assert lb.dtype == torch.float32 and mb["logo"].dtype == torch.float32
    c64, r64 = cb.double().tolist(), rb.double().tolist()
    assert lb.item() == pytest.approx(brute_force(c64, r64, 10.0, 3.0, 0.1), rel=1e-6)
    margins = [10.0 * x - 10.0 * sum(rs) / len(rs) for x, rs in zip(c64, r64)]
    expected = {"sft": -sum(c64) / 4, "reward_chosen": 10.0 * sum(c64) / 4,
                "reward_margin": sum(margins) / 4, "reward_accuracy": sum(m > 0 for m in margins) / 4,
                "logo": brute_force(c64, r64, 10.0, 3.0, 0.0)}
    for k, v in expected.items():
        assert mb[k].item() == pytest.approx(v, rel=1e-6, abs=1e-6), k
    # against the unrounded inputs the only error left is bf16's rounding of the inputs
    exact = brute_force(c.double().tolist(), r.double().tolist(), 10.0, 3.0, 0.1)
    assert lb.item() == pytest.approx(exact, rel=2e-2)


@pytest.mark.parametrize("shapes", [((3,), (3,)), ((3,), (2, 2)), ((3, 1), (3, 2)), ((3,), (3, 0))])
def test_bad_shapes_raise_a_value_error_naming_the_shapes(shapes):
    c, r = torch.zeros(shapes[0]), torch.zeros(shapes[1])
    with pytest.raises(ValueError, match=str(tuple(shapes[1])).replace("(", r"\(").replace(")", r"\)")):
        logo_loss(c, r, beta=1.0, gamma=0.0)


def test_metrics_are_detached_scalars_with_the_documented_keys():
    c = torch.tensor([-1.0, -2.0], requires_grad=True)
    r = torch.tensor([[-2.0], [-1.0]], requires_grad=True)
    loss, m = logo_loss(c, r, beta=1.0, gamma=0.0, sft_weight=0.1)
    assert loss.requires_grad and loss.dim() == 0
    assert set(m) == {"logo", "sft", "reward_chosen", "reward_rejected", "reward_margin",
                      "reward_accuracy"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    assert m["reward_accuracy"].item() == 0.5


def test_token_logps_equals_log_softmax_and_its_gradient_matches_autograd():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 50, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    ref = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    got = token_logps(logits, targets, chunk_size=8)   # several chunks, a ragged last one
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    w = torch.randn(37, generator=g, dtype=torch.float64)
    (gr,) = torch.autograd.grad((ref * w).sum(), logits)
    (gg,) = torch.autograd.grad((got.double() * w).sum(), logits)
    torch.testing.assert_close(gg, gr, rtol=1e-5, atol=1e-6)


def test_token_logps_passes_gradcheck():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=g)
    # forward accumulates in float32 by design; gradcheck with a tolerance that fits it
    assert torch.autograd.gradcheck(lambda x: token_logps(x, targets, chunk_size=2).double(),
                                    (logits,), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_token_logps_keeps_bf16_gradients_in_bf16():
    logits = torch.randn(6, 11, dtype=torch.bfloat16, requires_grad=True)
    lp = token_logps(logits, torch.arange(6))
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_sequence_logps_scores_logits_at_t_against_the_token_at_t_plus_one():
    # vocabulary of 3; row: tokens [0, 1, 2, 1]; mask marks tokens 2 and 3 as the response
    logits = torch.log(torch.tensor([[[0.1, 0.6, 0.3],     # predicts token 1 (prompt, not scored)
                                      [0.2, 0.2, 0.6],     # predicts token 2 (scored: 0.6)
                                      [0.5, 0.25, 0.25],   # predicts token 3 = 1 (scored: 0.25)
                                      [1 / 3, 1 / 3, 1 / 3]]]))  # predicts nothing
    labels = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[0, 0, 1, 1]])
    got = sequence_logps(logits, labels, mask)
    assert got.item() == pytest.approx((math.log(0.6) + math.log(0.25)) / 2, abs=1e-6)


def run_copied_alone(tmp_path, names, code):
    """Copy these repo files alone into an empty folder and run `code` there (no PYTHONPATH)."""
    for name in names:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]


def test_loss_and_positions_import_alone_with_only_torch(tmp_path):
    run_copied_alone(tmp_path, ["loss.py", "positions.py"],
                     "import sys, torch\n"
                     "before = set(sys.modules)\n"
                     "import loss, positions\n"
                     "new = sorted(m for m in set(sys.modules) - before if not m.startswith('torch'))\n"
                     "assert new == ['loss', 'positions'], new\n"
                     "assert 'transformers' not in sys.modules and 'model_patch' not in sys.modules\n")


def test_model_patch_and_loss_copied_alone_score_a_packed_row_with_torch_and_transformers_only(tmp_path):
    run_copied_alone(tmp_path, ["model_patch.py", "loss.py"],
                     "import sys, torch, transformers\n"
                     "before = set(sys.modules)\n"
                     "import model_patch\n"
                     "new = sorted(m for m in set(sys.modules) - before\n"
                     "             if m.split('.')[0] not in ('torch', 'transformers'))\n"
                     "assert new == ['loss', 'model_patch'], new\n"
                     "from transformers import LlamaConfig, LlamaForCausalLM\n"
                     "torch.manual_seed(0)\n"
                     "m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,\n"
                     "    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))\n"
                     "seg = torch.tensor([[0] * 6 + [1] * 3 + [2] * 4])\n"
                     "ids = torch.randint(3, 50, seg.shape)\n"
                     "pos = torch.tensor([list(range(6)) + [6, 7, 8] + [6, 7, 8, 9]])\n"
                     "lp, n = model_patch.response_logps(m, ids, pos, seg)\n"
                     "assert lp.shape == (1, 2) and n.tolist() == [[3, 4]], (lp, n)\n")


def brute_force_reference(chosen, rejected, ref_chosen, ref_rejected, beta, gamma, sft_weight):
    """The reference-based variant, one Python float at a time: r(y) = beta * (logp - logp_ref)."""
    total = 0.0
    for c, rs, c0, rs0 in zip(chosen, rejected, ref_chosen, ref_rejected):
        z = beta * (c - c0) - beta * sum(r - r0 for r, r0 in zip(rs, rs0)) / len(rs) - gamma
        total += -log_sigmoid(z) + sft_weight * (-c)
    return total / len(chosen)


@pytest.mark.parametrize("M", [1, 2, 3])
def test_the_reference_based_variant_matches_a_brute_force_loop(M):
    g = torch.Generator().manual_seed(M)
    c, r = -torch.rand(4, generator=g, dtype=torch.float64) * 4, -torch.rand(4, M, generator=g, dtype=torch.float64) * 4
    c0, r0 = -torch.rand(4, generator=g, dtype=torch.float64) * 4, -torch.rand(4, M, generator=g, dtype=torch.float64) * 4
    c.requires_grad_(True)                           # float64: the brute force's own precision
    loss, m = logo_loss(c, r, beta=2.5, gamma=0.25, sft_weight=0.1, ref_chosen_logps=c0,
                        ref_rejected_logps=r0)
    expected = brute_force_reference(c.tolist(), r.tolist(), c0.tolist(), r0.tolist(), 2.5, 0.25, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["reward_margin"].item() == pytest.approx(
        (2.5 * ((c - c0) - (r - r0).mean(1))).mean().item(), rel=1e-12)
    assert m["sft"].item() == pytest.approx(-c.mean().item(), rel=1e-6)   # SFT term as without
    loss.backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_the_reference_based_variant_starts_at_log_one_plus_e_gamma_when_policy_is_reference():
    c, r = torch.tensor([-1.3, -2.0]), torch.tensor([[-2.5, -0.7], [-1.0, -3.0]])
    loss, m = logo_loss(c, r, beta=10.0, gamma=3.0, ref_chosen_logps=c.clone(), ref_rejected_logps=r.clone())
    assert m["logo"].item() == pytest.approx(math.log1p(math.exp(3.0)), rel=1e-6)
    assert m["reward_margin"].item() == 0.0
    free, _ = logo_loss(c, r, beta=10.0, gamma=3.0)
    assert free.item() != pytest.approx(loss.item())        # reference-free differs here


def test_the_reference_based_variant_refuses_half_a_reference():
    with pytest.raises(ValueError, match="both"):
        logo_loss(torch.zeros(2), torch.zeros(2, 2), beta=1.0, gamma=0.0, ref_chosen_logps=torch.zeros(2))
