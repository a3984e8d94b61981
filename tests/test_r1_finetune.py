"""Tests of SMART-R1's MPO (r1_finetune.py): the loss's gradient, the score-function identity of
the sampled-and-differentiated policy, the k3 KL estimator, advantages (GRPO's group count,
unscored sets), the SFT-RFT-SFT schedule, a toy-categorical policy improvement, and RFT steps of a
tiny reference model on toy scenes."""
import pytest
import torch

import evaluate as E
import presets
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


def expected_gradient(theta, sample_logq, diff_logp, adv: float):
    """E_{a ~ q}[grad of mpo_loss at a single sample a] with a constant advantage, exactly (a sum
    over the vocabulary): sample_logq, diff_logp: theta [K] -> log-probs [K]."""
    q = sample_logq(theta).detach().exp()                                      # [K]
    total = 0.0
    for a in q.nonzero().flatten().tolist():                                   # the tokens q can sample
        logp = diff_logp(theta)[a].view(1, 1, 1)                               # [W=1, A=1, N=1]
        one = torch.ones(1, 1, 1, dtype=torch.bool)
        loss, _ = R1.mpo_loss(logp, logp.detach(), torch.tensor([adv]), one, 0.0)
        total = total + q[a] * loss
    return torch.autograd.grad(total, theta)[0]                                # [K]


def test_constant_advantage_has_zero_expected_gradient_only_when_sampler_and_loss_agree():
    """Score-function identity: sum_a q(a) grad log q(a) = 0, so a constant advantage must not move
    the policy. It holds for policy_log_probs (full softmax, and the renormalised top-k), and
    fails for the old pair: samples from the top-k, gradient of the full softmax's log pi."""
    theta = torch.randn(10, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    for top_k in (0, 3):
        pol = lambda t, k=top_k: R1.policy_log_probs(t, k)                     # noqa: E731
        g = expected_gradient(theta, pol, pol, adv=-0.2)
        assert g.abs().max() < 1e-6, (top_k, g)
    old = expected_gradient(theta, lambda t: R1.policy_log_probs(t, 3), lambda t: t.log_softmax(-1), adv=-0.2)
    assert old.abs().max() > 1e-3, old
    # and the rollout sampler draws from exactly that policy: top_k = 0 passes k = K to
    # reference_model.sample_top_k at temperature 1
    logits = torch.randn(6, generator=torch.Generator().manual_seed(1))
    for top_k in (0, 3):
        k = top_k if top_k > 0 else logits.shape[0]
        ids = RM.sample_top_k(logits.expand(200_000, -1), k, 1.0, torch.Generator().manual_seed(2))  # [2e5]
        freq = torch.bincount(ids, minlength=6).float() / ids.numel()          # [6]
        assert torch.allclose(freq, R1.policy_log_probs(logits, top_k).exp(), atol=5e-3), (top_k, freq)


def test_k3_mean_under_the_sampler_is_the_exact_kl():
    """The k3 mean over samples of the full-softmax RFT policy approaches KL(pi || pi_sft), which
    vocab_stats computes exactly; with the old pair (top-k samples, full-softmax log pi) it does
    not approach KL(pi || pi_sft)."""
    g = torch.Generator().manual_seed(3)
    logits, logits_sft = 2 * torch.randn(8, generator=g), 2 * torch.randn(8, generator=g)
    logq_sft = R1.policy_log_probs(logits_sft, 0)                              # [8] pi_sft: full softmax
    n = 400_000
    for top_k in (0, 3):
        logq = R1.policy_log_probs(logits, top_k)                              # [8]
        ids = RM.sample_top_k(logits.expand(n, -1), top_k or 8, 1.0, g)        # [n]
        k3 = R1.k3_kl(logq[ids], logq_sft[ids])                                # [n]
        exact = R1.vocab_stats(logq.view(1, 1, 1, 8), logq_sft.view(1, 1, 1, 8), torch.ones(1, 1, 1))
        kl = float((logq.exp() * (logq - logq_sft)).nan_to_num().sum())
        assert abs(exact["kl_exact"] - kl) < 1e-5
        # E_q[rho] = pi_sft(support of q), so k3's mean is KL(q || pi_sft) only when q covers pi_sft:
        # with a top-k policy it falls short by pi_sft's mass outside the top k
        outside = float(logq_sft.exp()[logq.isinf()].sum())
        assert (outside == 0) == (top_k == 0)
        err = 4 * float(k3.std()) / n ** 0.5                                   # 4 standard errors
        assert abs(float(k3.mean()) - (kl - outside)) < err, (top_k, float(k3.mean()), kl)
        assert abs(exact["entropy"] + float(torch.special.xlogy(logq.exp(), logq.exp()).sum())) < 1e-5
    logpi = logits.log_softmax(-1)                                             # [8]
    kl_pi = float((logpi.exp() * (logpi - logq_sft)).sum())
    old = float(R1.k3_kl(logpi[ids], logq_sft[ids]).mean())                    # ids: the top-3 samples
    assert abs(old - kl_pi) > 0.05, (old, kl_pi)


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
    # an unscored set (NaN) stays NaN, and GRPO normalises over the scene's scored sets only
    r_nan = torch.tensor([[0.5, float("nan"), 0.7, 0.6, 0.8]])
    a_nan = R1.advantages(r_nan, "grpo", None)
    assert a_nan[0, 1].isnan() and torch.allclose(a_nan[0, [0, 2, 3, 4]], a[0], atol=1e-6)
    assert R1.advantages(r_nan, "mpo", 0.6)[0, 1].isnan()


def test_config_checks_and_the_grpo_group_count():
    R1.check_config(R1.R1Config())
    assert R1.R1Config().groups == 1 and R1.R1Config().rft_top_k == 0   # one reward per scene, pi itself
    with pytest.raises(ValueError, match="groups"):
        R1.check_config(R1.R1Config(M=8, groups=3))
    with pytest.raises(ValueError, match="GRPO-style advantage needs groups >= 4"):
        R1.check_config(R1.R1Config(M=8, groups=2, advantage="grpo"))
    assert R1.variant_config(R1.R1Config(), "grpo").groups == 4          # M = 16 -> 4 sets of 4
    assert R1.variant_config(R1.R1Config(), "reinforce").groups == 1
    with pytest.raises(ValueError, match="groups"):
        R1.variant_config(R1.R1Config(M=6), "grpo")
    with pytest.raises(ValueError, match="rft_top_k"):
        R1.check_config(R1.R1Config(rft_top_k=-1))
    R1.check_config(R1.R1Config(**presets.R1_QUICK))
    R1.variant_config(R1.R1Config(**presets.R1_QUICK), "grpo")


def test_schedule_gives_both_arms_2n_catk_epochs():
    """The paper's split: SFT-1 = N, SFT-2 = N, the SFT-SFT control = SFT-1 + N = 2N CAT-K epochs;
    the trajectory-matched variant adds RFT's trajectories counted in epochs."""
    for N in (1, 2, 16):
        s = R1.schedule(R1.R1Config(sft_epochs=N), n_train=256)
        assert s["sft1"] == N and s["sft1"] + s["sft2"] == 2 * N and s["sft1"] + s["sftsft"] == 2 * N
        assert s["sftsft_traj"] == N + 4                                       # 16 x 4 x 16 / 256 = 4
    assert R1.schedule(R1.R1Config(), 256)["sft2"] == R1.R1Config().sft_epochs


def test_unscored_set_gives_no_gradient():
    """A world whose set has no scored agents (adv NaN) contributes exactly zero gradient, even
    with a -inf log-prob at a masked token; the rest is the loss over the other worlds alone."""
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(4, 3, 5, generator=g).log_softmax(-1).requires_grad_(True)  # [W, A, N]
    logp_sft = torch.randn(4, 3, 5, generator=g).log_softmax(-1)               # [W, A, N]
    mask = torch.rand(4, 3, 5, generator=g) > 0.2                             # [W, A, N]
    adv = torch.tensor([float("nan"), 0.3, -0.2, 0.1])
    with torch.no_grad():
        logp[1, 0, 0] = float("-inf")                       # e.g. a log token outside a top-k
    mask[1, 0, 0] = False
    loss, _ = R1.mpo_loss(logp, logp_sft, adv, mask, beta=0.04)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[0] == 0).all() and (grad[1, 0, 0] == 0)
    sub = logp.detach()[1:].clone().requires_grad_(True)
    sub_loss, _ = R1.mpo_loss(sub, logp_sft[1:], adv[1:], mask[1:], beta=0.04)
    (sub_grad,) = torch.autograd.grad(sub_loss, sub)
    assert torch.isclose(loss, sub_loss) and torch.allclose(grad[1:], sub_grad)


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
        every = torch.ones_like(logp, dtype=torch.bool)
        loss, _ = R1.mpo_loss(logp, logp_sft_all[a].view(-1, 1, 1), adv, every, beta)
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


def tiny_setup(n_scenes: int = 2):
    scenes = make_toy_scenes(n_scenes, seed=7)
    tok = MotionTokenizer.fit(scenes, TokenizerConfig(K=32))
    torch.manual_seed(0)
    model = RM.ReferenceModel(RM.ReferenceConfig(K=32, D=16, heads=2, layers=1, dropout=0.1, window=3,
                                                 map_neighbours=4, agent_neighbours=3), tok.table)
    return scenes, tok, model


def trainable_copy(sft):
    m = R1.frozen_copy(sft)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def test_one_rft_step_on_toy_scenes():
    """A tiny reference model on 2 toy scenes: G = 1 scores all M rollouts of a scene as one set
    (one reward, one A per scene), the first step's KL is 0 (pi = pi_sft), the policy moves and
    pi_sft does not."""
    scenes, tok, model = tiny_setup()
    sft = R1.frozen_copy(model)
    enc = tok.encode(scenes)
    cfg = R1.R1Config(M=4, lr=1e-3)                                            # groups = 1: the default
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    h = R1.rft_step(model, sft, tok, opt, scenes, enc, cfg, tau=0.3, generator=gen)
    assert abs(h["kl"]) < 1e-6 and abs(h["kl_exact"]) < 1e-6 and h["logp"] < 0
    assert 0 < h["entropy"] <= torch.log(torch.tensor(32.0)) and h["n_nan_groups"] == 0
    assert 0 < h["reward"] < 1 and abs(h["adv_mean"] - (h["reward"] - 0.3)) < 1e-5
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not p.requires_grad for p in sft.parameters())
    assert all(torch.equal(p, q) for p, q in zip(sft.parameters(), before))
    # chunking the teacher-forced pass over worlds does not change the gradient
    grads = []
    for chunk in (8, 3):
        m = trainable_copy(sft)
        R1.rft_step(m, sft, tok, torch.optim.SGD(m.parameters(), lr=0.0), scenes, enc,
                    R1.R1Config(M=4, chunk_worlds=chunk), tau=0.3, generator=torch.Generator().manual_seed(0))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    # G = 1: one reward per scene, the realism meta of all its M rollouts, shared by all M worlds
    _, out = R1.sample_rollouts(model, tok, scenes, enc, 4, 0, torch.Generator().manual_seed(1))
    traj = out["traj"].unflatten(0, (2, 4))                                   # [B, M, A, 80, 3]
    z = scenes.z[:, None, :, NOW:NOW + 1].expand(-1, 4, -1, T - NOW - 1)      # [B, M, A, 80]
    direct = wm.score_rollouts(scenes, traj[..., :2], z, traj[..., 2])["realism_meta"]  # [B]
    r = R1.group_scores(scenes, traj, 1)["realism_meta"]                      # [B, 1]
    assert r.shape == (2, 1) and torch.allclose(r[:, 0], direct)
    adv = R1.world_advantages(r, "mpo", 0.3, M=4).view(2, 4)                  # [B, M]
    assert torch.allclose(adv, (direct - 0.3)[:, None].expand(2, 4))
    halves = R1.group_scores(scenes, traj, 2)["realism_meta"]                 # [B, 2]
    first = wm.score_rollouts(scenes, traj[:, :2, ..., :2], z[:, :2], traj[:, :2, ..., 2])["realism_meta"]
    assert torch.allclose(halves[:, 0], first)


def test_unscored_scene_is_masked_not_penalised():
    """A scene with no scored agents has realism NaN: it is counted, and the step's gradient is
    exactly that of the other scene's tokens alone (not a penalty A = -tau on its tokens)."""
    scenes, tok, model = tiny_setup()
    scenes.eval_mask[0] = False                                                # scene 0: nothing to score
    sft = R1.frozen_copy(model)
    enc = tok.encode(scenes)
    cfg = R1.R1Config(M=4)
    m = trainable_copy(sft)
    h = R1.rft_step(m, sft, tok, torch.optim.SGD(m.parameters(), lr=0.0), scenes, enc, cfg, tau=0.3,
                    generator=torch.Generator().manual_seed(0))
    assert h["n_nan_groups"] == 1 and 0 < h["reward"] < 1
    got = torch.cat([p.grad.flatten() for p in m.parameters()])
    # the same rollouts (same generator), the loss over scene 1's worlds only
    rep, out = R1.sample_rollouts(sft, tok, scenes, enc, 4, 0, torch.Generator().manual_seed(0))
    r = R1.group_scores(scenes, out["traj"].unflatten(0, (2, 4)), 1)["realism_meta"]  # [B, 1]
    assert r[0].isnan().all() and abs(float(r[1, 0]) - h["reward"]) < 1e-6
    ref = trainable_copy(sft).eval()
    sl = slice(4, 8)
    tokens = {k: v[sl] for k, v in out["tokens"].items()}
    logq = R1.sequence_log_probs(ref, rep.select(sl), tokens, 0)               # [4, A, N, K]
    logq_sft = R1.sequence_log_probs(sft, rep.select(sl), tokens, 0)           # [4, A, N, K]
    ids = tokens["ids"][..., None]                                             # [4, A, N, 1]
    mask = out["controlled"][sl][..., None] & (torch.arange(ids.shape[2]) >= tok.n0)  # [4, A, N]
    loss, _ = R1.mpo_loss(logq.gather(-1, ids).squeeze(-1), logq_sft.gather(-1, ids).squeeze(-1),
                          (r[1, 0] - 0.3).expand(4), mask, cfg.beta)
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in ref.parameters()])
    assert want.abs().max() > 0 and torch.allclose(got, want, atol=1e-7, rtol=1e-4)
    # every scene unscored: no step at all, nothing NaN
    scenes.eval_mask[:] = False
    m2 = trainable_copy(sft)
    h2 = R1.rft_step(m2, sft, tok, torch.optim.AdamW(m2.parameters(), lr=1e-2), scenes, enc, cfg, tau=0.3,
                     generator=torch.Generator().manual_seed(0))
    assert h2["n_nan_groups"] == 2
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), sft.parameters()))


def test_budget_and_seed_table():
    """RFT's CAT-K-epoch equivalent counts trajectories; the seed table shows mean +- std."""
    assert R1.rft_epochs(R1.R1Config(rft_steps=24, scenes_per_step=4, M=8), n_train=384) == 2
    assert R1.rft_epochs(R1.R1Config(rft_steps=25, scenes_per_step=4, M=8), n_train=384) == 3
    evals = [{"BC": {"m": 0.5}, "SFT": {"m": 0.6}}, {"BC": {"m": 0.7}}]
    table = E.seed_table(evals, ("m",)).splitlines()
    assert table[2] == "| BC | 2 | 0.6000 +- 0.1414 |" and table[3] == "| SFT | 1 | 0.6000 |"


def test_rft_step_stops_on_a_non_finite_k3_before_the_step():
    """A NaN in pi_sft makes k3 (and so the MPO loss) NaN: rft_step stops naming where and the term,
    and the weights are those before the step."""
    scenes, tok, model = tiny_setup()
    sft = R1.frozen_copy(model)
    with torch.no_grad():
        for p in sft.parameters():
            p.fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(FloatingPointError, match=r"RFT \(mpo\) step 3, worlds 0\.\.7.*k3"):
        R1.rft_step(model, sft, tok, opt, scenes, tok.encode(scenes), R1.R1Config(M=4), tau=0.3,
                    generator=torch.Generator().manual_seed(0), where="RFT (mpo) step 3")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
