"""SPACeR pieces: exact KL, GAE, the anchored reward of the executed token, and a short anchored
run that pulls the policy toward a (stand-in) reference distribution."""
import copy
import dataclasses
import math

import pytest
import torch

import ppo_anchor as PA
import reference_model as RM
from env import EGO_DIM, PARTNER_DIM, ROAD_DIM
from scenes import NOW, apply_local, save_atomic, wrap_angle
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes

K = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: one intra-op thread is as fast, and far faster on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    scenes = make_toy_scenes(3, seed=7)
    tok = MotionTokenizer.fit(scenes, TokenizerConfig(K=K, steps_per_token=2))
    enc = tok.encode(scenes)
    return scenes, tok, enc


def test_exact_kl_equals_brute_force_sum():
    torch.manual_seed(0)
    logp = torch.randn(3, 5).log_softmax(-1)
    logq = torch.randn(3, 5).log_softmax(-1)
    got = PA.exact_kl(logp, logq)
    for i in range(3):
        brute = 0.0
        for a in range(5):
            p, q = math.exp(logp[i, a]), math.exp(logq[i, a])
            brute += p * math.log(p / q)
        assert got[i].item() == pytest.approx(brute, rel=1e-5, abs=1e-6)
    assert PA.exact_kl(logp, logp).abs().max().item() < 1e-6  # KL(p || p) = 0
    assert (got > 0).all()


def test_gae_matches_hand_computation():
    gamma, lam = 0.9, 0.5
    r = torch.tensor([[1.0], [0.0], [2.0]])                          # [N=3, 1]
    v = torch.tensor([[0.5], [1.0], [-1.0]])                         # [N, 1]
    d2 = 2.0 - (-1.0)                                                # last step: V after it is 0
    d1 = 0.0 + gamma * -1.0 - 1.0
    d0 = 1.0 + gamma * 1.0 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = PA.gae(r, v, gamma, lam)
    assert torch.allclose(adv[:, 0], torch.tensor([a0, a1, a2]))
    assert torch.allclose(ret, adv + v)
    # lambda = 1 gives discounted Monte-Carlo returns
    _, ret1 = PA.gae(r, v, gamma, 1.0)
    assert torch.allclose(ret1[:, 0], torch.tensor([1 + gamma**2 * 2, gamma * 2, 2.0]))


def test_gae_does_not_bootstrap_through_a_done_agent():
    """Done with step 1 (its goal): step 1's advantage is r_1 - V_1, with neither V(o_2) nor step 2's
    advantage flowing back, and changing what comes after the goal changes nothing before it."""
    gamma, lam = 0.9, 0.5
    r = torch.tensor([[1.0], [0.0], [2.0]])                          # [N=3, 1]
    v = torch.tensor([[0.5], [1.0], [-1.0]])                         # [N, 1]
    dones = torch.tensor([[False], [True], [False]])                 # [N, 1]
    a1 = 0.0 - 1.0
    a0 = (1.0 + gamma * 1.0 - 0.5) + gamma * lam * a1
    adv, ret = PA.gae(r, v, gamma, lam, dones)
    assert torch.allclose(adv[:2, 0], torch.tensor([a0, a1])) and torch.allclose(ret, adv + v)
    after = PA.gae(torch.tensor([[1.0], [0.0], [-50.0]]), torch.tensor([[0.5], [1.0], [30.0]]), gamma, lam,
                   dones)[0]
    assert torch.equal(after[:2], adv[:2])
    assert not torch.allclose(PA.gae(r, v, gamma, lam)[0][:2], adv[:2])  # without dones it would bootstrap


def test_policy_size_heads_and_init():
    one = PA.LateFusionPolicy(200, hidden=128, type_heads=False)
    emb = lambda d: d * 64 + 64 + 2 * 64 + 64 * 64 + 64              # Linear, LayerNorm, Linear
    encoders = emb(EGO_DIM) + emb(PARTNER_DIM) + emb(ROAD_DIM)
    assert PA.count_parameters(one) == encoders + 192 * 128 + 128 + 128 * 200 + 200 + 129
    # the default: 64 hidden units and one head per agent type, about the paper's 65k
    default = PA.count_parameters(PA.LateFusionPolicy(200))
    assert default == encoders + 192 * 64 + 64 + 3 * (64 * 200 + 200) + 65
    assert 60_000 < default < 70_000
    multi = PA.LateFusionPolicy(K, type_heads=True)
    obs = dict(ego=torch.randn(2, 4, EGO_DIM), partners=torch.randn(2, 4, 3, PARTNER_DIM),
               partner_mask=torch.rand(2, 4, 3) > 0.3, road=torch.randn(2, 4, 5, ROAD_DIM),
               road_mask=torch.rand(2, 4, 5) > 0.3)
    types = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    logits, value = multi(obs, types)
    assert logits.shape == (2, 4, K) and value.shape == (2, 4)
    # each agent reads the head of its own type
    for t in range(3):
        other, _ = multi(obs, torch.full_like(types, t))
        assert torch.allclose(logits[types == t], other[types == t])
        assert not torch.allclose(logits[types != t], other[types != t])
    # actor init std 0.01: the starting policy is near uniform
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert (ent > math.log(K) - 0.01).all()
    # a masked-out partner cannot change the output
    obs2 = {**obs, "partners": torch.where(obs["partner_mask"][..., None], obs["partners"], 1e3)}
    assert torch.allclose(multi(obs2, types)[0], logits)


def test_top_k_sampling_stays_in_top_k():
    torch.manual_seed(0)
    logits = torch.randn(50, K)
    top = logits.topk(3, -1).indices
    ids = torch.stack([PA.sample_tokens(logits, top_k=3) for _ in range(20)])  # [20, 50]
    assert (ids.unsqueeze(-1) == top.unsqueeze(0)).any(-1).all()


def test_anchored_reward_scores_the_executed_token(world):
    """The reference prefers the logged token; the policy executes other tokens. The likelihood
    reward must be log p_ref of what was executed (not of the log, not of the reference's mode),
    and what was executed is what the simulator moved the agent along."""
    scenes, tok, enc = world
    n0, A = tok.n0, scenes.A
    cfg = PA.SpacerConfig(goal_dropout=0.0)
    torch.manual_seed(1)
    policy = PA.LateFusionPolicy(K)
    env = PA.make_env(scenes, tok.table, cfg)
    roll = PA.collect_rollout(policy, env, torch.ones(scenes.B, A, dtype=torch.bool))
    seen = {}

    def log_p_ref(sc, ids, valid, pose, pose_valid):  # stand-in: log 0 on the logged token, -10 elsewhere
        seen.update(ids=ids.clone(), valid=valid.clone(), pose=pose.clone())
        lp = torch.full(ids.shape + (K,), -10.0)
        return lp.scatter(-1, enc["ids"].unsqueeze(-1), 0.0)

    lp = PA.reference_log_probs(log_p_ref, scenes, enc, roll, n0)
    Nf = roll["actions"].shape[0]
    assert lp.shape == (Nf, scenes.B, A, K)
    # the reference saw the history, the executed tokens of controlled agents, the log of the others
    ctrl = roll["ctrl"]
    assert torch.equal(seen["ids"][:, :, :n0], enc["ids"][:, :, :n0])
    assert torch.equal(seen["ids"][:, :, n0:n0 + Nf][ctrl], roll["actions"].permute(1, 2, 0)[ctrl])
    assert torch.equal(seen["ids"][:, :, n0:][~ctrl], enc["ids"][:, :, n0:][~ctrl])
    # the boundary poses handed over are those the reference itself derives from these tokens
    pose, pose_valid = RM.poses_from_ids(tok, scenes, seen["ids"], seen["valid"])
    assert torch.allclose(seen["pose"][pose_valid], pose[pose_valid], atol=1e-3)
    r, logp_exec = PA.anchored_reward(roll["r_task"], lp, roll["actions"], alpha=0.5)
    executed_is_log = roll["actions"] == enc["ids"][:, :, n0:n0 + Nf].permute(2, 0, 1)  # [N, B, A]
    m = ctrl.expand_as(executed_is_log)
    assert bool((~executed_is_log & m).any())  # the case where it matters occurs
    expect = torch.where(executed_is_log, 0.0, -10.0)
    assert torch.equal(logp_exec[m], expect[m])
    assert torch.allclose(r, roll["r_task"] + 0.5 * logp_exec)
    # executing those tokens from the logged step-10 pose reproduces the simulated trajectory
    start = torch.cat([scenes.pos[:, :, NOW], scenes.yaw[:, :, NOW, None]], -1)  # [B, A, 3]
    poses = tok.decode(start, roll["actions"].permute(1, 2, 0), scenes.agent_type)  # [B, A, 80, 3]
    pos, _, _ = env.rollout_future()
    assert torch.allclose(poses[ctrl][..., :2], pos[ctrl], atol=1e-3)


def test_agents_done_at_their_goal_leave_rewards_and_advantages(world):
    """A self-play rollout where agents reach their goals mid-episode: after the step that reached
    it, an agent earns no task reward, executes the zero-motion token (parked, its pose held),
    leaves the trained samples, and its parked steps cannot change the advantages of its last
    live steps (train's GAE reads roll["dones"])."""
    scenes, tok, enc = world
    torch.manual_seed(3)
    env = PA.make_env(scenes, tok.table, PA.SpacerConfig())
    roll = PA.collect_rollout(PA.LateFusionPolicy(K), env, torch.ones(scenes.B, scenes.A, dtype=torch.bool))
    alive, dones, ctrl = roll["alive"], roll["dones"], roll["ctrl"]              # [N, B, A], [B, A]
    N = alive.shape[0]
    parked = ctrl & ~alive                                                       # [N, B, A]
    mid = dones[1:-1].any(0) & alive[0]                                          # [B, A] done mid-episode
    assert bool(mid.any()), "some agent must reach its goal during the episode"
    assert torch.equal(roll["r_task"][parked], torch.zeros(int(parked.sum())))
    assert bool((roll["actions"][parked] == 0).all())
    # alive stops right after the done step, for good
    done_at = dones.float().argmax(0)                                            # [B, A]
    steps = torch.arange(N).view(N, 1, 1)                                        # [N, 1, 1]
    assert torch.equal(alive[:, mid], (steps <= done_at)[:, mid])
    pos, _, _ = env.rollout_future()                                             # [B, A, 80, 2]
    b, a = mid.nonzero()[0].tolist()
    t = 2 * (int(done_at[b, a]) + 1)
    assert torch.equal(pos[b, a, t:], pos[b, a, t - 1:t].expand(80 - t, 2))       # held to the end
    # GAE: values and rewards of parked steps do not reach the live ones
    rewards = roll["r_task"]
    adv, _ = PA.gae(rewards, roll["values"], 0.99, 0.95, dones)
    noise = torch.where(parked, 100.0 * torch.randn_like(rewards), torch.zeros_like(rewards))  # [N, B, A]
    adv2, _ = PA.gae(rewards + noise, roll["values"] + noise, 0.99, 0.95, dones)
    assert torch.allclose(adv[alive], adv2[alive], atol=1e-5)
    adv3, _ = PA.gae(rewards + noise, roll["values"] + noise, 0.99, 0.95)        # without dones: leaks
    assert not torch.allclose(adv[alive], adv3[alive], atol=1e-3)


def test_evaluation_samples_the_distribution_training_samples(world):
    """A policy with known logits (the actor's weights zero, its bias the logits), so every token it
    picks is a draw from softmax(logits). The tokens of evaluation rollouts (policy_rollout, read
    back from the executed trajectories) and of training rollouts (collect_rollout) both follow
    that distribution, tail included: the old top-8 evaluation never executed the 8 least likely
    of these 16 tokens (over 30 % of the mass)."""
    scenes, tok, enc = world
    torch.manual_seed(0)
    logits = torch.linspace(0.0, -1.2, K)                                        # [K]
    probs = logits.softmax(-1)                                                   # [K]
    tail = probs[8:].sum().item()
    assert tail > 0.3
    policy = PA.LateFusionPolicy(K)
    with torch.no_grad():
        policy.actor.weight.zero_()
        policy.actor.bias.copy_(logits.repeat(policy.n_heads))
    cfg = PA.SpacerConfig(goal_dropout=0.0)
    R, spt = 4, tok.table.shape[2]
    pos, _, yaw = PA.policy_rollout(policy, scenes, R, tok.table, cfg)           # [B, R, A, 80, ...]
    now = torch.cat([scenes.pos[:, :, NOW], scenes.yaw[:, :, NOW, None]], -1)    # [B, A, 3]
    traj = torch.cat([pos, yaw.unsqueeze(-1)], -1)                               # [B, R, A, 80, 3]
    traj = torch.cat([now.unsqueeze(1).expand(-1, R, -1, -1).unsqueeze(3), traj], 3)  # [B, R, A, 81, 3]
    start = traj[:, :, :, :-1:spt]                                               # [B, R, A, N, 3]
    nxt = traj[:, :, :, 1:].unflatten(3, (-1, spt))                              # [B, R, A, N, spt, 3]
    table = tok.table[scenes.agent_type][:, None, :, None]                       # [B, 1, A, 1, K, spt, 3]
    cand = apply_local(start.unsqueeze(-2), table)                               # [B, R, A, N, K, spt, 3]
    diff = nxt.unsqueeze(4) - cand                                               # [B, R, A, N, K, spt, 3]
    diff = torch.cat([diff[..., :2], wrap_angle(diff[..., 2:])], -1).abs()
    best = diff.flatten(-2).amax(-1).min(-1)                                     # [B, R, A, N]
    # the agent acts at token n unless it came within the goal radius at a pose up to its start
    d_goal = (traj[..., :2] - scenes.goal[:, None, :, None]).norm(dim=-1)        # [B, R, A, 81]
    reached = (d_goal < 2.0).float().cummax(-1).values.bool()[..., :-1:spt]      # [B, R, A, N]
    acting = scenes.controlled[:, None, :, None] & ~reached                      # [B, R, A, N]
    assert best.values[acting].max().item() < 1e-3                              # each is exactly a token
    ids_eval = best.indices[acting]                                              # [M]
    env = PA.make_env(scenes.repeat(R), tok.table, cfg)
    roll = PA.collect_rollout(policy, env, torch.ones(scenes.B * R, scenes.A, dtype=torch.bool))
    ids_train = roll["actions"][roll["alive"]]                                   # [M']
    for ids in (ids_eval, ids_train):
        freq = torch.bincount(ids, minlength=K).float() / ids.numel()           # [K]
        assert ids.numel() > 3000
        assert freq[8:].sum().item() == pytest.approx(tail, abs=0.03)
        assert (freq - probs).abs().max().item() < 0.02


def test_flatten_keeps_only_controlled_agents_before_their_goal(world):
    scenes, tok, enc = world
    cfg = PA.SpacerConfig()
    env = PA.make_env(scenes, tok.table, cfg)
    roll = PA.collect_rollout(PA.LateFusionPolicy(K), env, torch.ones(scenes.B, scenes.A, dtype=torch.bool))
    z = torch.zeros_like(roll["values"])
    batch = PA.flatten(roll, z, z, scenes.agent_type, None)
    alive = roll["alive"]                                                        # [N, B, A]
    assert not bool((alive & ~roll["ctrl"]).any())                               # only controlled agents
    assert int(alive.sum()) < roll["actions"].shape[0] * int(roll["ctrl"].sum())  # goals were reached
    assert batch["actions"].shape[0] == int(alive.sum())
    assert batch["obs"]["road"].shape[1:] == roll["obs"]["road"].shape[3:]


def test_short_anchored_run_pulls_policy_toward_reference(world, tmp_path):
    """A fixed stand-in reference distribution per agent type; with the KL anchor the policy's
    KL(pi || p_ref) falls well below its uniform start, and without it (PPO) it does not.
    Resuming from the checkpoint of iteration 2 reproduces iteration 3 exactly."""
    scenes, tok, enc = world
    torch.manual_seed(0)
    ref_logits = (3.0 * torch.randn(3, K)).log_softmax(-1)          # [3, K]

    def log_p_ref(sc, ids, valid, pose, pose_valid):
        return ref_logits[sc.agent_type].unsqueeze(2).expand(*ids.shape, K)  # [B, A, N, K]

    def run(anchor, state=None, ckpts=None, **kw):
        cfg = PA.anchor_config(anchor, num_worlds=2, iterations=3, minibatch_size=512, lr=3e-3,
                               goal_dropout=0.0, save_every=1, **kw)
        policy, hist = PA.train(cfg, scenes, enc, tok.table, tok.n0, log_p_ref=log_p_ref, state=state,
                                ckpt_fn=None if ckpts is None else lambda st: ckpts.append(copy.deepcopy(st)))
        return policy, hist

    ckpts = []
    policy, spacer = run("spacer", ckpts=ckpts, beta=1.0)
    _, ppo = run("ppo")
    assert spacer[0]["kl_ref"] == pytest.approx(ppo[0]["kl_ref"], rel=0.05)  # same near-uniform start
    assert spacer[-1]["kl_ref"] < 0.5 * spacer[0]["kl_ref"]
    assert ppo[-1]["kl_ref"] > 0.8 * ppo[0]["kl_ref"]
    assert spacer[-1]["logp_ref_exec"] > spacer[0]["logp_ref_exec"] + 0.5
    for row in spacer:
        assert math.isfinite(row["pg_loss"]) and 0.0 <= row["clipfrac"] <= 1.0
    # --resume: from the iteration-2 checkpoint, iteration 3 comes out the same
    assert [c["iteration"] for c in ckpts] == [1, 2, 3]
    _, resumed = run("spacer", state=ckpts[1], beta=1.0)
    assert len(resumed) == 3 and resumed[-1]["kl_ref"] == pytest.approx(spacer[-1]["kl_ref"], rel=1e-5)
    # the saved policy loads back to the same network
    save_atomic(ckpts[-1], tmp_path / "policy.pt")
    loaded, cfg = PA.load_policy(tmp_path / "policy.pt")
    obs = PA.make_env(scenes, tok.table, cfg).reset()
    assert torch.equal(loaded(obs, scenes.agent_type)[0], policy(obs, scenes.agent_type)[0])


def ppo_batch(world, anchor: bool):
    """One rollout of a fresh policy as ppo_update's flat batch (zero advantages and returns)."""
    scenes, tok, enc = world
    torch.manual_seed(0)
    policy = PA.LateFusionPolicy(K)
    env = PA.make_env(scenes, tok.table, PA.SpacerConfig())
    roll = PA.collect_rollout(policy, env, torch.ones(scenes.B, scenes.A, dtype=torch.bool))
    z = torch.zeros_like(roll["values"])                                         # [N, B, A]
    anchor_logp = roll["logp_all"].clone() if anchor else None                   # [N, B, A, K]
    return policy, PA.flatten(roll, z.clone(), z.clone(), scenes.agent_type, anchor_logp)


@pytest.mark.parametrize("field, term", [("advantages", "policy_loss"), ("returns", "value_loss"),
                                         ("anchor_logp", "kl_anchor")])
def test_ppo_update_stops_on_a_non_finite_term_before_the_step(world, field, term):
    """A NaN in the advantages, the returns or the anchor's log-probs stops the update with the
    term named, and no weight has changed (the step that would have made them NaN never ran)."""
    policy, batch = ppo_batch(world, anchor=True)
    batch[field][0] = float("nan")
    before = copy.deepcopy(policy.state_dict())
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    with pytest.raises(FloatingPointError, match=f"ppo_update: epoch 1, minibatch 1.*{term}"):
        PA.ppo_update(policy, opt, batch, PA.SpacerConfig(minibatch_size=10 ** 6), anchor_coef=0.1)
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    policy, batch = ppo_batch(world, anchor=True)                                # the same batch, finite
    PA.ppo_update(policy, torch.optim.Adam(policy.parameters(), lr=1e-3), batch, PA.SpacerConfig(), 0.1)
    assert all(bool(torch.isfinite(p).all()) for p in policy.parameters())


def test_return_scaler_rejects_a_non_finite_reward_and_keeps_its_statistics():
    """Before: one NaN reward made the running variance NaN for good. Now it is rejected with the
    iteration named and the statistics are untouched, so the next finite rollout scales as usual."""
    scaler = PA.ReturnScaler(0.99)
    mask = torch.tensor([[True, True, False]])                                   # [B, A]
    rewards = torch.ones(4, 1, 3)                                                # [N, B, A]
    scaler(rewards, mask)
    stats = dict(scaler.__dict__)
    bad = rewards.clone()
    bad[2, 0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="iteration 7: the rewards"):
        scaler(bad, mask, "spacer iteration 7")
    assert scaler.__dict__ == stats
    bad[2, 0, 1], bad[1, 0, 2] = 1.0, float("inf")                              # an agent that does not count
    out = scaler(bad, mask)
    assert bool(torch.isfinite(out[:, mask]).all()) and math.isfinite(scaler.var)


def test_load_policy_names_a_wrong_shape_or_corrupt_checkpoint(tmp_path):
    cfg = PA.SpacerConfig()
    other = PA.LateFusionPolicy(K + 1)                                # weights for another vocabulary
    save_atomic(dict(policy=other.state_dict(), K=K, cfg=dataclasses.asdict(cfg)), tmp_path / "policy.pt")
    with pytest.raises(ValueError, match=r"policy\.pt: not a SPACeR policy checkpoint of this code "
                                         r"\(RuntimeError: .*size mismatch.*--stage spacer"):
        PA.load_policy(tmp_path / "policy.pt")
    save_atomic(dict(policy=other.state_dict(), K=K + 1), tmp_path / "policy.pt")
    with pytest.raises(ValueError, match=r"policy\.pt: lacks \['cfg'\], expected a SPACeR policy checkpoint"):
        PA.load_policy(tmp_path / "policy.pt")
    (tmp_path / "policy.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"policy\.pt: empty file"):
        PA.load_policy(tmp_path / "policy.pt")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt: not found .*--stage spacer"):
        PA.load_policy(tmp_path / "nowhere.pt")
