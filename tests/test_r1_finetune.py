"""Tests of SMART-R1's MPO (r1_finetune.py): the loss's gradient, the k3 KL estimator, advantages,
a toy-categorical policy improvement, and one RFT step of a tiny reference model on toy scenes."""

import pytest
import torch

import r1_finetune as R1
import reference_model as RM
import wosac_metrics as wm
from scenes import NOW, T
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes


def categorical_logp(theta, a):
    """log pi(a) of a categorical with logits theta [K] at samples a [W], in the loss's [W, 1, 1] layout."""
    return theta.log_softmax(-1)[a].view(-1, 1, 1)


def test_mpo_gradient_is_reinforce_with_baseline_when_beta_is_zero():
    """beta = 0: grad L = -mean_w A_w grad log pi(a_w), and for a softmax grad log pi(a) = e_a - pi."""
    g = torch.Generator().manual_seed(0)
    K, W = 5, 12
    theta = torch.randn(K, generator=g).requires_grad_(True)
    a = torch.randint(K, (W,), generator=g)
    adv = torch.randn(W, generator=g)
    mask = torch.ones(W, 1, 1, dtype=torch.bool)
    mask[:3] = False                                       # masked tokens do not count at all
    logp = categorical_logp(theta, a)
    loss, _ = R1.mpo_loss(logp, logp.detach() - 0.3, adv, mask, beta=0.0)
    loss.backward()
    pi = theta.detach().softmax(-1)
    keep = mask.view(-1)
    expected = -(adv[keep, None] * (torch.nn.functional.one_hot(a[keep], K) - pi)).mean(0)
    assert torch.allclose(theta.grad, expected, atol=1e-6), (theta.grad, expected)
    # and the loss value is -mean A (log pi), the REINFORCE surrogate
    assert torch.isclose(loss, -(adv[keep] * logp.view(-1)[keep]).mean(), atol=1e-6)


def test_k3_is_nonnegative_zero_at_agreement_and_unbiased():
    g = torch.Generator().manual_seed(1)
    lp, lq = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (R1.k3_kl(lp, lq) >= 0).all()
    x = torch.randn(50, generator=g).requires_grad_(True)
    k = R1.k3_kl(x, x.detach())
    assert k.abs().max() == 0
    k.sum().backward()
    assert x.grad.abs().max() < 1e-7                      # no pull at all where the models agree
    # its mean under pi's samples is KL(pi || pi_sft): sum_a pi(a) k3(a) = KL exactly
    p, q = torch.randn(7, generator=g).log_softmax(-1), torch.randn(7, generator=g).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum()
    assert torch.isclose((p.exp() * R1.k3_kl(p, q)).sum(), kl, atol=1e-6)
    assert float(kl) > 0.01


def test_advantages():
    r = torch.tensor([[0.5, 0.7, 0.6, 0.8], [0.2, 0.2, 0.2, 0.2]])
    assert torch.allclose(R1.advantages(r, "mpo", 0.6), r - 0.6)
    a = R1.advantages(r, "grpo", None)
    assert torch.allclose(a[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(a[0].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert a[0].argmax() == 3 and a[0].argmin() == 0
    assert (a[1] == 0).all()                               # a tie gives no signal
    with pytest.raises(ValueError, match="tau"):
        R1.advantages(r, "mpo", None)
    with pytest.raises(ValueError, match="groups"):
        R1.check_config(R1.R1Config(M=8, groups=3))


def run_toy_policy(adv_kind: str, beta: float, steps: int = 150, seed: int = 0) -> tuple:
    """MPO on a 6-way categorical 'policy' with a known noisy reward; B scenes x G groups of
    samples per step. Returns (expected reward before, after, KL(pi || pi_sft) after)."""
    g = torch.Generator().manual_seed(seed)
    reward = torch.tensor([0.1, 0.3, 0.9, 0.2, 0.5, 0.0])
    theta = torch.zeros(6, requires_grad=True)             # starts uniform = pi_sft
    logp_sft_all = theta.detach().log_softmax(-1)
    tau = float(reward.mean())                             # the SFT policy's mean reward
    opt = torch.optim.Adam([theta], lr=0.05)
    before = float((theta.detach().softmax(-1) * reward).sum())
    B, G = 4, 4
    for _ in range(steps):
        a = torch.multinomial(theta.detach().softmax(-1), B * G, replacement=True, generator=g)  # [B*G]
        r = (reward[a] + 0.1 * torch.randn(B * G, generator=g)).view(B, G)  # [B, G]
        adv = R1.advantages(r, adv_kind, tau).flatten()                   # [B*G]
        logp = categorical_logp(theta, a)
        loss, _ = R1.mpo_loss(logp, logp_sft_all[a].view(-1, 1, 1), adv, torch.ones_like(logp, dtype=torch.bool), beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pi = theta.detach().softmax(-1)
    return before, float((pi * reward).sum()), float((pi * (pi.log() - logp_sft_all)).sum())


def test_mpo_raises_the_reward_of_a_toy_policy():
    before, after, _ = run_toy_policy("mpo", beta=0.04)
    assert after > before + 0.3, (before, after)
    _, after_grpo, _ = run_toy_policy("grpo", beta=0.04)
    assert after_grpo > before + 0.3, (before, after_grpo)
    # a strong KL anchor keeps the policy near pi_sft; beta = 0 drifts further
    _, _, kl_free = run_toy_policy("mpo", beta=0.0)
    _, _, kl_anchored = run_toy_policy("mpo", beta=5.0)
    assert kl_anchored < 0.5 * kl_free, (kl_anchored, kl_free)


def test_step_scenes_cover_each_pass_once():
    idx = torch.cat([R1.step_scenes(s, 4, 10, seed=3) for s in range(5)])  # two passes over 10
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    assert torch.equal(R1.step_scenes(2, 4, 10, seed=3), idx[8:12])      # a function of the step
    assert not torch.equal(R1.step_scenes(0, 4, 10, seed=4), idx[:4])


def test_one_rft_step_on_toy_scenes():
    """A tiny reference model on 2 toy scenes: the rewards are WOSAC scores of each group's set,
    the first step's KL is 0 (pi = pi_sft), the policy moves and pi_sft does not."""
    scenes = make_toy_scenes(2, seed=7)
    tok = MotionTokenizer.fit(scenes, TokenizerConfig(K=32))
    torch.manual_seed(0)
    model = RM.ReferenceModel(RM.ReferenceConfig(K=32, D=16, heads=2, layers=1, dropout=0.1, window=3,
                                                 map_neighbours=4, agent_neighbours=3), tok.table)
    sft = R1.frozen_copy(model)
    enc = tok.encode(scenes)
    cfg = R1.R1Config(M=4, groups=2, lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    before = [p.detach().clone() for p in model.parameters()]
    h = R1.rft_step(model, sft, tok, opt, scenes, enc, cfg, tau=0.3, generator=torch.Generator().manual_seed(0))
    assert abs(h["kl"]) < 1e-6 and h["logp"] < 0
    assert 0 < h["reward"] < 1 and abs(h["adv_mean"] - (h["reward"] - 0.3)) < 1e-5
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not p.requires_grad for p in sft.parameters())
    assert all(torch.equal(p, q) for p, q in zip(sft.parameters(), before))
    # chunking the teacher-forced pass over worlds does not change the gradient
    grads = []
    for chunk in (8, 3):
        m = R1.frozen_copy(sft)
        for p in m.parameters():
            p.requires_grad_(True)
        c = R1.R1Config(M=4, groups=2, chunk_worlds=chunk)
        R1.rft_step(m, sft, tok, torch.optim.SGD(m.parameters(), lr=0.0), scenes, enc, c, tau=0.3,
                    generator=torch.Generator().manual_seed(0))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    # group_scores: one set of all M rollouts equals score_rollouts of those rollouts
    _, out = R1.sample_rollouts(model, tok, scenes, enc, 4, 8, 1.0, torch.Generator().manual_seed(1))
    traj = out["traj"].unflatten(0, (2, 4))                                   # [B, M, A, 80, 3]
    z = scenes.z[:, None, :, NOW:NOW + 1].expand(-1, 4, -1, T - NOW - 1)      # [B, M, A, 80]
    direct = wm.score_rollouts(scenes, traj[..., :2], z, traj[..., 2])["realism_meta"]
    assert torch.allclose(R1.group_scores(scenes, traj, 1)["realism_meta"][:, 0], torch.nan_to_num(direct))
    halves = R1.group_scores(scenes, traj, 2)["realism_meta"]                 # [B, 2]
    first = wm.score_rollouts(scenes, traj[:, :2, ..., :2], z[:, :2], traj[:, :2, ..., 2])["realism_meta"]
    assert torch.allclose(halves[:, 0], torch.nan_to_num(first))


def test_budget_and_seed_table():
    """RFT's CAT-K-epoch equivalent counts trajectories; the seed table shows mean +- std."""
    assert R1.rft_epochs(R1.R1Config(rft_steps=24, scenes_per_step=4, M=8), n_train=384) == 2
    assert R1.rft_epochs(R1.R1Config(rft_steps=25, scenes_per_step=4, M=8), n_train=384) == 3
    evals = [{"BC": {"m": 0.5}, "SFT": {"m": 0.6}}, {"BC": {"m": 0.7}}]
    table = R1.summary_table(evals, ("m",)).splitlines()
    assert table[2] == "| BC | 2 | 0.6000 +- 0.1414 |" and table[3] == "| SFT | 1 | 0.6000 |"
