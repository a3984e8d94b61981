"""The policy's fast max pooling (policy.winners_max) computes what the plain masked max computes:
value and every weight gradient, with empty sets, ties of identical inputs, odd chunk sizes, and
through a whole PPO update."""
import pytest
import torch

import policy
import ppo_anchor as PA
from env import EGO_DIM, PARTNER_DIM, ROAD_DIM


def plain_pool(net, x, mask):
    """The definition: masked max over all set elements, autograd through every one of them."""
    return policy.masked_max(net(x), mask)


def sets(S=7, n_set=20, F=10, seed=0):
    """x [2, S, P, F] with duplicated elements (exact ties), mask with empty and full sets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, S, n_set, F, generator=g)                                   # [2, S, P, F]
    x[..., 5, :] = x[..., 4, :]                                                    # identical inputs tie
    x[1, 2, 9:12] = x[1, 2, 8:9]                                                   # a run of identical inputs
    mask = torch.rand(2, S, n_set, generator=g) < 0.6                              # [2, S, P]
    mask[..., 4:6] = True
    mask[0, 0] = False                                                             # an empty set
    mask[1, 3] = True                                                              # a full set
    mask[1, 2, 8:12] = True
    return x, mask


@pytest.mark.parametrize("chunk", [128, 3])
def test_winners_max_equals_masked_max_in_value_and_weight_gradients(monkeypatch, chunk):
    monkeypatch.setattr(policy, "WINNER_CHUNK", chunk)
    torch.manual_seed(0)
    net = policy.embed_mlp(10, 32)
    x, mask = sets()
    w = torch.randn(2, 7, 32)                                                      # [2, S, D]
    outs = []
    for pool in (plain_pool, policy.winners_max):
        net.zero_grad()
        out = pool(net, x, mask)                                                   # [2, S, D]
        (out * w).sum().backward()
        outs.append((out.detach(), *[p.grad.clone() for p in net.parameters()]))
    assert outs[1][0].shape == (2, 7, 32) and bool((outs[1][0][0, 0] == 0).all())  # empty set: zeros
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_winners_max_with_every_set_empty_gives_zeros_and_no_gradient():
    net = policy.embed_mlp(10, 8)
    x = torch.randn(3, 5, 10)                                                      # [S, P, F]
    out = policy.winners_max(net, x, torch.zeros(3, 5, dtype=torch.bool))          # [S, D]
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 8))
    assert all(p.grad is None or bool((p.grad == 0).all()) for p in net.parameters())


def test_first_max_is_the_first_valid_arg_max():
    torch.manual_seed(1)
    net = policy.embed_mlp(10, 16)
    x, mask = sets(S=9, n_set=13)
    x, mask = x.flatten(0, 1), mask.flatten(0, 1)                                  # [S, P, F], [S, P]
    with torch.no_grad():
        y = net(x).masked_fill(~mask.unsqueeze(-1), float("-inf"))                 # [S, P, D]
        p = torch.arange(13).view(1, 13, 1).expand_as(y)                           # [S, P, D]
        first = torch.where(y == y.amax(-2, keepdim=True), p, 13).amin(-2)         # [S, D]
    got = policy.first_max(net, x, mask)                                           # [S, D]
    nonempty = mask.any(-1)                                                        # [S]
    assert torch.equal(got[nonempty], first[nonempty])
    assert bool(((got >= 0) & (got < 13)).all()) and bool((~nonempty).any())


def test_pooled_embed_without_autograd_equals_masked_max():
    torch.manual_seed(2)
    net = policy.embed_mlp(10, 16)
    x, mask = sets()
    for no_autograd in (torch.no_grad, torch.inference_mode):
        with no_autograd():
            assert torch.equal(policy.pooled_embed(net, x, mask), plain_pool(net, x, mask))


def test_ppo_update_with_winners_max_equals_it_with_the_plain_masked_max(monkeypatch):
    """Two epochs of minibatch PPO (spacer anchor) from the same weights and shuffles: the same losses
    and the same weights afterwards, whichever pooling the policy uses."""
    torch.manual_seed(3)
    M, K = 300, 16
    obs = dict(ego=torch.randn(M, EGO_DIM), partners=torch.randn(M, 16, PARTNER_DIM),
               partner_mask=torch.rand(M, 16) < 0.6, road=torch.randn(M, 64, ROAD_DIM),
               road_mask=torch.rand(M, 64) < 0.95)                                 # [M, ...]
    obs["partner_mask"][:20] = False                                               # agents alone
    batch = dict(obs=obs, actions=torch.randint(0, K, (M,)), logprobs=torch.randn(M) - 3,
                 values=torch.randn(M), advantages=torch.randn(M), returns=torch.randn(M),
                 agent_type=torch.randint(0, 3, (M,)), anchor_logp=torch.randn(M, K).log_softmax(-1))
    cfg = PA.anchor_config("spacer", update_epochs=2, minibatch_size=64)
    start = PA.LateFusionPolicy(K).state_dict()
    results = []
    for pool in (plain_pool, policy.pooled_embed):
        monkeypatch.setattr(policy, "pooled_embed", pool)
        pi = PA.LateFusionPolicy(K)
        pi.load_state_dict(start)
        opt = torch.optim.Adam(pi.parameters(), lr=1e-3, eps=1e-5)
        stats = PA.ppo_update(pi, opt, batch, cfg, 0.1, torch.Generator().manual_seed(0))
        results.append((stats, [p.detach().clone() for p in pi.parameters()]))
    for k in results[0][0]:
        assert results[0][0][k] == pytest.approx(results[1][0][k], rel=1e-4, abs=1e-6), k
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
