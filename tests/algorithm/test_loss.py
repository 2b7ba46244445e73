import pytest
import torch

from grpo_steps.grpo.loss import Normalizers, aggregate, k3_kl, policy_loss


def _inputs(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 2).requires_grad_(True)
    old = logps.detach() + 0.3 * torch.randn(B, T, generator=g)
    ref = logps.detach() + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0  # a one-token completion
    return logps, old, ref, adv, mask


def test_k3_is_nonnegative_and_zero_at_equality():
    x = torch.randn(100)
    assert torch.all(k3_kl(x, x + torch.randn(100)) >= 0)
    assert torch.allclose(k3_kl(x, x), torch.zeros(100))


def test_on_policy_grpo_loss_value_and_gradient_is_policy_gradient():
    logps, _, _, adv, mask = _inputs()
    norm = Normalizers(6, int(mask.sum()), 5)
    loss, _ = policy_loss(logps, logps.detach(), adv, mask, norm, loss_type="grpo")
    # ratio == 1 everywhere: loss = -mean_i(A_i), gradient wrt logp_it = -A_i / (|o_i| * B)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    loss.backward()
    expected = -(adv.unsqueeze(1) * mask) / mask.sum(1, keepdim=True) / 6
    torch.testing.assert_close(logps.grad, expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_big_batch_loss_and_gradient(loss_type):
    logps, old, ref, adv, mask = _inputs(1)
    norm = Normalizers(6, int(mask.sum()), 5)
    kw = dict(loss_type=loss_type, beta=0.05, ref_logps=ref, epsilon_low=0.2, epsilon_high=0.28)
    big, _ = policy_loss(logps, old, adv, mask, norm, **kw)
    big.backward()
    g_big = logps.grad.clone()
    logps.grad = None
    total = 0.0
    for sl in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part, _ = policy_loss(logps[sl], old[sl], adv[sl], mask[sl], norm, **{**kw, "ref_logps": ref[sl]})
        part.backward()
        total += part.item()
    assert total == pytest.approx(big.item(), abs=1e-6)
    torch.testing.assert_close(logps.grad, g_big)


def test_aggregations_follow_their_definitions():
    per_token = torch.arange(12, dtype=torch.float32).view(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    n = Normalizers(3, int(mask.sum()), 6)
    seq_means = torch.tensor([(0 + 1) / 2, (4 + 5 + 6 + 7) / 4, 8.0])
    assert aggregate(per_token, mask, "grpo", n).item() == pytest.approx(seq_means.mean().item())
    assert aggregate(per_token, mask, "dapo", n).item() == pytest.approx((0 + 1 + 22 + 8) / 7)
    assert aggregate(per_token, mask, "dr_grpo", n).item() == pytest.approx((0 + 1 + 22 + 8) / (3 * 6))


def test_clip_higher_clips_positive_advantages_at_epsilon_high():
    logps = torch.log(torch.tensor([[1.25], [1.25]]))
    old = torch.zeros(2, 1)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1)
    n = Normalizers(2, 2, 1)
    loss, stats = policy_loss(logps, old, adv, mask, n, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2)
    # ratio 1.25 > 1.2: positive advantage clipped at 1.2, negative side takes the unclipped -1.25
    assert loss.item() == pytest.approx((-1.2 + 1.25) / 2)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    loss_hi, stats_hi = policy_loss(logps, old, adv, mask, n, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
    assert loss_hi.item() == pytest.approx((-1.25 + 1.25) / 2)
    assert stats_hi["clip_ratio/high_mean"].item() == 0


def test_sequence_level_ratio_is_length_normalised_geometric_mean():
    logps = torch.tensor([[0.1, 0.3, 0.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    n = Normalizers(1, 2, 3)
    loss, _ = policy_loss(logps, old, torch.tensor([1.0]), mask, n, loss_type="grpo",
                          importance_sampling_level="sequence", epsilon_low=10, epsilon_high=10)
    assert loss.item() == pytest.approx(-torch.exp(torch.tensor(0.2)).item(), rel=1e-6)


def test_beta_needs_reference():
    logps, old, _, adv, mask = _inputs()
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, Normalizers(6, 20, 5), beta=0.1)
