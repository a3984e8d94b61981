"""SPACeR: decentralized self-play PPO anchored by a centralized tokenized reference model.

Chang et al., "SPACeR: Self-Play Anchoring with Centralized Reference Models", ICLR 2026.

Every controlled agent of B worlds is driven by one small shared policy pi_theta(a | o) that sees
only its own ego-centric observation o. It acts in the motion-token vocabulary of the reference
model p_ref (K tokens per agent type), so the two are categoricals over the same K actions and the
reference can anchor the policy in two ways:

    likelihood reward (Eq. 1, 3)   r_t = r_task + alpha * log p_ref(a_t | s_t)
    exact KL penalty  (Eq. 2, 5)   loss = L_PPO + beta * KL(pi(.|o_t) || p_ref(.|s_t))
                                   KL = sum_a pi(a|o_t) log(pi(a|o_t) / p_ref(a|s_t))

with r_task = w_goal 1[goal] - w_coll 1[collided] - w_off 1[off-road] from the simulator. p_ref
is *centralized*: s_t is the whole scene plus every agent's tokens so far. It is frozen and
queried once per rollout: the executed tokens of the whole rollout (the log's history first) go
through ONE causal teacher-forced pass, whose position n is p_ref(. | s_n) for every agent.
Because the simulator's token mode executes exactly the chosen token, log p_ref(a_t | s_t)
scores the motion that really happened.

L_PPO is the usual clipped surrogate (Schulman et al. 2017) with GAE advantages:

    delta_t = r_t + gamma (1 - d_t) V(o_{t+1}) - V(o_t)
    A_t = delta_t + gamma lambda (1 - d_t) A_{t+1}        (d_t = 1: the agent's episode ends with step t)
    rho = pi(a_t|o_t) / pi_old(a_t|o_t),           L_clip = -E[min(rho A, clip(rho, 1-eps, 1+eps) A)]
    L_PPO = L_clip + c_v (V - R)^2 / 2 - c_ent H[pi]

Baselines from the same code (`SpacerConfig.anchor`):
- "ppo":    alpha = beta = 0, r_task only.
- "hr-ppo": Human-Regularized PPO (Cornelisse & Vinitsky 2024) adapted to tokens, as SPACeR's
  baseline: a *decentralized* behaviour-cloned policy pi_BC (same architecture, 2x hidden, same
  observations) is fitted to the logs' tokens, then PPO adds beta_hr * KL(pi_BC || pi) (forward
  KL, the direction of SPACeR's camera-ready HR-PPO: it makes pi cover every token pi_BC likes).
- "spacer": the anchors above; defaults alpha = 0, beta = 0.1, the paper's best setting (Fig. 3:
  beta = 0.1 beats 0.01 and 1; Table A2: the likelihood reward adds nothing on top of the KL,
  .74 either way; Fig. A1: alpha = 0.1 alone collapses the policy's entropy). README: the toy sweep.

Goal reached = done (env.py, `at_goal="stop"`), as in GPUDrive where SPACeR trains: w_goal is the
agent's last reward, d_t = 1 at that step (no bootstrapping through the parked state), and its later
steps leave the loss, the anchors and the return statistics (`alive` [N, B, A]). It stays parked at
its goal (GPUDrive's WOSAC setting), so every scored agent still has positions for all 80 steps.

Scaled to a tutorial: 16 worlds x 40 steps per rollout, minibatches of 512, learning rate 1e-3,
and rewards divided by a running std of the return (`ReturnScaler`; the per-step collision and
off-road penalties make raw returns reach tens, and the critic's gradient would then swamp the
actor's in the shared trunk). The rest is SPACeR's Table A3 (gamma 0.99, lambda 0.95, clip 0.2,
4 epochs, value coefficient 0.3, entropy 1e-4, gradient norm 0.5). Only controlled agents act
and enter the loss; the others replay their log.

Sampling: training and evaluation both sample a_t ~ pi(.|o_t) from the full softmax (`sample_tokens`,
`eval_top_k = 0`): PPO's ratio, entropy and KL anchor are computed for it, so it is the trained policy.
The paper trains the same way but evaluates with top-1 / top-5 (Fig. 3, Table R3), a truncated policy
that was never trained; `eval_top_k = k` is that choice as an opt-in. (The reference, trained by
likelihood rather than RL, keeps SMART's top-k rollouts.)

Policy: GPUDrive's late-fusion MLP. The ego, the partners and the road points each go through
Linear-LayerNorm-Tanh-Linear (width 64); partners and road points are max-pooled over their
masks; the three embeddings are concatenated, mapped to 64 hidden units (Linear-Tanh; the Tanh
is ours, GPUDrive has a plain Linear there) and read by an actor and a critic. Token ids mean
different motions for different agent types, so by default the actor has one head per agent
type (SPACeR's VRU variant, Table A1: .729 with it, .685 without): 66,585 parameters at K = 200,
the paper's "about 65k". GPUDrive's 128 hidden units would give 117,401 (`--hidden 128`), and
`type_heads=False` the single-head policy of the paper's vehicle-only runs. GPUDrive's 0.01
dropout is left out: it would make the PPO ratio noisy.

Goal dropout (SPACeR Sec. 3): for a fraction of the agents the ego's goal features are zeroed for a
whole episode while the goal reward is still paid, so the policy also learns to drive without one.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from env import EnvConfig, MultiAgentEnv
from policy import (InputLinear, LateFusionPolicy, count_parameters, embed_mlp,  # noqa: F401 (PA.*)
                    layer_init, masked_max, pooled_embed)
from scenes import NOW, T, Scenes, check_finite, read_file

GOAL_FEATURES = slice(6, 9)  # goal x, goal y, goal distance in env.observe's ego layout
ANCHORS = ("spacer", "ppo", "hr-ppo")


@dataclass
class SpacerConfig:
    anchor: str = "spacer"  # spacer (reference anchors) | ppo (task reward only) | hr-ppo (KL to a BC policy)
    alpha: float = 0.0            # weight of the likelihood reward alpha * log p_ref(a_t | s_t) (spacer only)
    beta: float = 0.1               # weight of the exact KL(pi || p_ref) in the loss (spacer only; see above)
    beta_hr: float = 0.01           # weight of KL(pi_BC || pi) in the loss (hr-ppo only; HR-PPO's value)
    # reward (SPACeR / GPUDrive weights)
    w_goal: float = 1.0             # reward for reaching the goal, paid once
    w_coll: float = 0.75            # penalty per 0.1 s step in collision
    w_off: float = 0.75             # penalty per 0.1 s step off-road
    goal_dropout: float = 0.2    # fraction of agents whose goal is hidden from the observation for an episode
    # PPO (SPACeR Table A3, scaled down to a tutorial budget)
    lr: float = 1e-3                # Adam learning rate, constant (paper 3e-4 over 1e9 steps)
    gamma: float = 0.99             # discount per policy step (0.2 s)
    gae_lambda: float = 0.95        # GAE lambda
    clip_coef: float = 0.2          # PPO ratio clip
    update_epochs: int = 4          # passes over each rollout
    minibatch_size: int = 512       # agent-steps per gradient step (about 20 per epoch of a rollout)
    vf_coef: float = 0.3            # value loss weight
    ent_coef: float = 1e-4          # entropy bonus weight
    max_grad_norm: float = 0.5      # global gradient-norm clip
    # scale
    num_worlds: int = 16            # worlds (scenes) simulated together per rollout (~10k agent-steps)
    iterations: int = 50            # rollouts + PPO updates
    embed: int = 64                 # width of the ego / partner / road embeddings
    hidden: int = 64                # width of the fused hidden layer (64: ~67k parameters, the paper's ~65k)
    type_heads: bool = True         # one actor head per agent type (else one shared head)
    # HR-PPO's behaviour-cloned policy
    bc_hidden: int = 128            # 2x the policy's hidden width
    bc_scenes: int = 0              # training scenes replayed to make BC data (0: all of them)
    bc_epochs: int = 4              # passes over the BC data (hr_ppo.py; README: its cost and accuracy)
    # evaluation
    eval_rollouts: int = 32         # R rollouts per test scene (WOSAC)
    eval_top_k: int = 0             # 0: the full softmax, as in training; k: the paper's top-k evaluation
    eval_batch: int = 8             # test scenes per evaluation batch (x R worlds)
    save_every: int = 10            # iterations between checkpoints
    seed: int = 42                  # seed (Table A3)


def check_config(cfg: SpacerConfig) -> None:
    if cfg.anchor not in ANCHORS:
        raise ValueError(f"SpacerConfig.anchor must be one of {ANCHORS}, got {cfg.anchor!r}")
    if cfg.anchor != "spacer" and (cfg.alpha != 0 or cfg.beta != 0):
        raise ValueError(f"SpacerConfig.alpha / beta anchor to the reference and only apply to "
                         f"anchor='spacer'; got anchor={cfg.anchor!r} with alpha={cfg.alpha}, "
                         f"beta={cfg.beta}")
    if not 0.0 <= cfg.goal_dropout <= 1.0:
        raise ValueError(f"SpacerConfig.goal_dropout must be in [0, 1], got {cfg.goal_dropout}")


def anchor_config(anchor: str, **overrides) -> SpacerConfig:
    """The config of one of the three methods: ppo and hr-ppo switch off the reference anchors."""
    base = dict(anchor=anchor) if anchor == "spacer" else dict(anchor=anchor, alpha=0.0, beta=0.0)
    cfg = SpacerConfig(**{**base, **overrides})
    check_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Small pieces of the algorithm
# --------------------------------------------------------------------------------------------
def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_a p(a) (log p(a) - log q(a)) over the last dim (Eq. 5): [..., K] -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def drop_goal(obs: dict, goal_keep: torch.Tensor) -> dict:
    """Zero the goal features of agents with goal_keep [B, A] False (goal dropout)."""
    ego = obs["ego"].clone()                                                      # [B, A, EGO_DIM]
    ego[..., GOAL_FEATURES] *= goal_keep.unsqueeze(-1).to(ego.dtype)
    return {**obs, "ego": ego}


def sample_tokens(logits: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Sample ids [...] from logits [..., K], among the top_k most likely tokens when top_k > 0."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))                  # [..., K]
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])                     # [M, K]
    return torch.multinomial(probs, 1).reshape(logits.shape[:-1])                # [...]


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float,
        dones: torch.Tensor | None = None) -> tuple:
    """Generalized advantage estimation over a fixed-length episode that ends after the last step
    (so V after it is 0). dones [N, ...] bool: the agent's episode ended with step t (its goal), so
    neither V(o_{t+1}) nor the advantages after t flow back into step t.
    rewards, values [N, ...] -> (advantages [N, ...], returns [N, ...])."""
    advantages = torch.zeros_like(rewards)                                        # [N, ...]
    lastgaelam = torch.zeros_like(rewards[0])                                     # [...]
    for t in reversed(range(rewards.shape[0])):
        next_value = values[t + 1] if t + 1 < rewards.shape[0] else torch.zeros_like(values[t])
        nonterminal = 1.0 if dones is None else (~dones[t]).to(rewards.dtype)     # [...]
        delta = rewards[t] + gamma * nonterminal * next_value - values[t]
        advantages[t] = lastgaelam = delta + gamma * lam * nonterminal * lastgaelam
    return advantages, advantages + values


def anchored_reward(r_task: torch.Tensor, logp_ref: torch.Tensor, actions: torch.Tensor,
                    alpha: float) -> tuple:
    """Eq. 1: r = r_task + alpha * log p_ref(a_t | s_t) of the token actually executed.
    r_task [N, B, A], logp_ref [N, B, A, K], actions [N, B, A] -> (r [N, B, A], log p_ref(a_t) [N, B, A])."""
    logp_exec = logp_ref.gather(-1, actions.unsqueeze(-1)).squeeze(-1)           # [N, B, A]
    return r_task + alpha * logp_exec, logp_exec


# --------------------------------------------------------------------------------------------
# Self-play rollout and the reference query
# --------------------------------------------------------------------------------------------
def make_env(scenes: Scenes, table: torch.Tensor, cfg: SpacerConfig) -> MultiAgentEnv:
    """The self-play world, the same in training and evaluation: token mode, agents done (parked)
    at their goal."""
    env_cfg = EnvConfig(mode="token", at_goal="stop", w_goal=cfg.w_goal, w_coll=cfg.w_coll, w_off=cfg.w_off)
    return MultiAgentEnv(scenes, env_cfg, token_table=table)


def n_policy_steps(spt: int) -> int:
    return (T - 1 - NOW) // spt                                                   # 40 at spt = 2


FORWARD_CHUNK = 128  # agents per policy call in rollouts (see controlled_forward)


def controlled_forward(net: LateFusionPolicy, obs: dict, agent_type: torch.Tensor,
                       ctrl: torch.Tensor) -> tuple:
    """The policy on the controlled agents only (the others replay their log, padding never acts):
    obs [B, A, ...], agent_type, ctrl [B, A] -> (logits [M, K], value [M]).

    Rows are independent, so the M agents go through in chunks of FORWARD_CHUNK: one call over a
    whole step (16 worlds: M ~ 2,800, a [M, 64, 64] road activation of 46 MB) runs out of cache and
    re-faults fresh pages at every layer; 128-row chunks (a [128, 64, 64] activation, 2 MB, stays in
    the L2 cache) give the same numbers (tested) markedly faster on CPU (README, "Speed and size")."""
    obs = {k: v[ctrl] for k, v in obs.items()}                                   # [M, ...]
    agent_type = agent_type[ctrl]                                                 # [M]
    M = agent_type.shape[0]
    if M <= FORWARD_CHUNK:
        return net(obs, agent_type)
    parts = [net({k: v[i:i + FORWARD_CHUNK] for k, v in obs.items()}, agent_type[i:i + FORWARD_CHUNK])
             for i in range(0, M, FORWARD_CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])   # [M, K], [M]


@torch.no_grad()
def collect_rollout(policy: LateFusionPolicy, env: MultiAgentEnv, goal_keep: torch.Tensor,
                    teacher: LateFusionPolicy | None = None) -> dict:
    """Run every world's controlled agents for one episode with the shared policy, sampling from
    pi. Storage is preallocated [N, B, A, ...] with N = 40 policy steps (zeros where an agent is
    not controlled). actions are the tokens executed (a parked agent's zero-motion token), alive
    [N, B, A] the controlled agents not yet done when acting at step n, dones [N, B, A] those done
    with step n. With a `teacher` (HR-PPO's BC policy), also stores its log-probabilities on the
    same observations."""
    obs = env.reset()
    N, (B, A) = n_policy_steps(env.spt), env.controlled.shape
    agent_type, ctrl = env.s.agent_type, env.controlled                           # [B, A]
    K, dev = policy.K, env.device
    buf = {k: torch.zeros((N,) + v.shape, dtype=v.dtype, device=dev)
           for k, v in obs.items()}                                               # [N, B, A, ...]
    actions = torch.zeros(N, B, A, dtype=torch.long, device=dev)                  # [N, B, A]
    logprobs = torch.zeros(N, B, A, device=dev)                                   # [N, B, A]
    values = torch.zeros(N, B, A, device=dev)                                     # [N, B, A]
    rewards = torch.zeros(N, B, A, device=dev)                                    # [N, B, A]
    alive = torch.zeros(N, B, A, dtype=torch.bool, device=dev)                    # [N, B, A]
    dones = torch.zeros(N, B, A, dtype=torch.bool, device=dev)                    # [N, B, A]
    logp_all = torch.zeros(N, B, A, K, device=dev)                                # [N, B, A, K]
    teacher_logp = torch.zeros(N, B, A, K, device=dev) if teacher is not None else None  # [N, B, A, K]
    for n in range(N):
        obs = drop_goal(obs, goal_keep)
        for k, v in obs.items():
            buf[k][n] = v
        logits, value = controlled_forward(policy, obs, agent_type, ctrl)         # [M, K], [M]
        logp = logits.log_softmax(-1)                                             # [M, K]
        a = sample_tokens(logits)                                                 # [M] full softmax
        actions[n][ctrl], values[n][ctrl], logp_all[n][ctrl] = a, value, logp
        logprobs[n][ctrl] = logp.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        if teacher is not None:
            teacher_logp[n][ctrl] = controlled_forward(teacher, obs, agent_type, ctrl)[0].log_softmax(-1)
        alive[n] = ctrl & ~env.done
        obs, rewards[n], info = env.step(actions[n])
        actions[n], dones[n] = info["actions"], info["agent_done"] & alive[n]
    # the poses at the token boundaries
    pose = torch.cat([env.traj_pos, env.traj_yaw.unsqueeze(-1)], -1)[:, :, ::env.spt]  # [B, A, N + 1, 3]
    return dict(obs=buf, pose=pose, actions=actions, logprobs=logprobs, logp_all=logp_all, values=values,
                r_task=rewards, teacher_logp=teacher_logp, ctrl=ctrl, alive=alive, dones=dones,
                goal=env.goal_reached & ctrl, collided=env.ever_collided & ctrl,
                offroad=env.ever_offroad & ctrl)


@torch.no_grad()
def reference_log_probs(log_p_ref, scenes: Scenes, log: dict, roll: dict, n0: int) -> torch.Tensor:
    """log p_ref(. | s_t) at every executed future step, from ONE causal teacher-forced pass.

    The token sequence is the log's history (ids before n0) followed by the executed future:
    controlled agents' sampled tokens, the others' logged tokens (they replay the log); the
    boundary poses are the log's (tokenizer.encode) and, for controlled agents after n0, those the
    simulator reached. log: tokenizer.encode of `scenes` (ids, id_valid [B, A, N], pose
    [B, A, N + 1, 3], pose_valid [B, A, N + 1]); roll: collect_rollout's actions [Nf, B, A], ctrl
    [B, A], pose [B, A, N + 1, 3]. log_p_ref(scenes, ids, id_valid, pose, pose_valid) -> [B, A, N, K].
    Returns [Nf, B, A, K]."""
    Nf = roll["actions"].shape[0]
    ctrl = roll["ctrl"].unsqueeze(-1)                                              # [B, A, 1]
    ids, valid = log["ids"].clone(), log["id_valid"].clone()                       # [B, A, N]
    ids[:, :, n0:n0 + Nf] = torch.where(ctrl, roll["actions"].permute(1, 2, 0), log["ids"][:, :, n0:n0 + Nf])
    valid[:, :, n0:n0 + Nf] |= ctrl                                        # controlled agents live to the end
    pose, pose_valid = log["pose"].clone(), log["pose_valid"].clone()        # [B, A, N + 1, 3], [B, A, N + 1]
    pose[:, :, n0 + 1:] = torch.where(ctrl.unsqueeze(-1), roll["pose"][:, :, n0 + 1:], pose[:, :, n0 + 1:])
    pose_valid[:, :, n0 + 1:] |= ctrl
    logp = log_p_ref(scenes, ids, valid, pose, pose_valid)                         # [B, A, N, K]
    return logp[:, :, n0:n0 + Nf].permute(2, 0, 1, 3).contiguous()                # [Nf, B, A, K]


# --------------------------------------------------------------------------------------------
# The PPO update with the anchor term
# --------------------------------------------------------------------------------------------
def ppo_update(policy, optimizer, batch: dict, cfg: SpacerConfig, anchor_coef: float, gen=None) -> dict:
    """Epochs of shuffled minibatches over flat samples [M, ...] (controlled agent-steps only).

    batch["anchor_logp"] [M, K] is log p_ref (spacer: + anchor_coef KL(pi || p_ref)) or
    log pi_BC (hr-ppo: + anchor_coef KL(pi_BC || pi)); None for plain PPO."""
    M = batch["actions"].shape[0]
    forward_kl = cfg.anchor == "hr-ppo"
    # statistics stay on the device and are read once at the end: no host sync per minibatch
    zero = torch.zeros((), device=batch["actions"].device)
    stats = {k: zero for k in ("pg_loss", "v_loss", "entropy", "kl_anchor", "approx_kl", "clipfrac")}
    n_mb = 0
    for epoch in range(cfg.update_epochs):
        perm = torch.randperm(M, generator=gen).to(batch["actions"].device)      # [M]
        for start in range(0, M, cfg.minibatch_size):
            mb = perm[start:start + cfg.minibatch_size]                           # [m]
            obs = {k: v[mb] for k, v in batch["obs"].items()}                     # [m, ...]
            logits, value = policy(obs, batch["agent_type"][mb])                  # [m, K], [m]
            logp_all = logits.log_softmax(-1)                                     # [m, K]
            newlogp = logp_all.gather(-1, batch["actions"][mb, None]).squeeze(-1)  # [m]
            logratio = newlogp - batch["logprobs"][mb]                            # [m]
            ratio = logratio.exp()                                                # [m]
            with torch.no_grad():
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfrac = ((ratio - 1.0).abs() > cfg.clip_coef).float().mean()
            adv = batch["advantages"][mb]                                         # [m]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8) if adv.numel() > 1 else adv
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
            v_loss = 0.5 * ((value - batch["returns"][mb]) ** 2).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
            kl = zero
            if batch.get("anchor_logp") is not None:
                anchor = batch["anchor_logp"][mb]                                 # [m, K]
                kl = exact_kl(anchor, logp_all) if forward_kl else exact_kl(logp_all, anchor)  # [m]
                loss = loss + anchor_coef * kl.mean()
                stats["kl_anchor"] = stats["kl_anchor"] + kl.mean().detach()
            optimizer.zero_grad()
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            # one NaN term would make every weight NaN at this step: stop before it, naming the term
            terms = dict(policy_loss=pg_loss, value_loss=v_loss, kl_anchor=kl.mean(), entropy=entropy,
                         grad_norm=grad_norm)
            if not bool(torch.isfinite(torch.stack([v.detach() for v in terms.values()])).all()):  # one sync
                where = f"ppo_update: epoch {epoch + 1}, minibatch {start // cfg.minibatch_size + 1}"
                check_finite(terms, where)
            optimizer.step()
            for k, v in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy", entropy),
                         ("approx_kl", approx_kl), ("clipfrac", clipfrac)):
                stats[k] = stats[k] + v.detach()
            n_mb += 1
    return {k: v.item() / max(n_mb, 1) for k, v in stats.items()}


def flatten(roll: dict, advantages, returns, agent_type, anchor_logp) -> dict:
    """[N, B, A, ...] storage -> flat samples [M, ...] of the agent-steps trained: controlled agents
    acting before their goal (roll["alive"])."""
    N = roll["actions"].shape[0]
    keep = roll["alive"]                                                          # [N, B, A]
    pick = lambda x: x[keep]                                                      # [M, ...]
    return dict(obs={k: pick(v) for k, v in roll["obs"].items()}, actions=pick(roll["actions"]),
                logprobs=pick(roll["logprobs"]), values=pick(roll["values"]), advantages=pick(advantages),
                returns=pick(returns), agent_type=pick(agent_type.unsqueeze(0).expand(N, -1, -1)),
                anchor_logp=pick(anchor_logp) if anchor_logp is not None else None)


class ReturnScaler:
    """Divide rewards by a running std of the discounted return (as CleanRL's continuous PPO does
    with gym's NormalizeReward). Collision and off-road penalties accrue every 0.1 s step, so raw
    returns reach tens; unscaled, the critic's gradient would swamp the actor's in the shared trunk."""

    def __init__(self, gamma: float):
        self.gamma, self.count, self.mean, self.var = gamma, 1e-4, 0.0, 1.0

    def __call__(self, rewards: torch.Tensor, mask: torch.Tensor,
                 where: str = "ReturnScaler") -> torch.Tensor:
        """rewards [N, B, A], mask [B, A] (agents whose returns count) or [N, B, A] (agent-steps:
        an agent done at its goal stops counting) -> scaled rewards [N, B, A].
        A non-finite reward of a counted agent raises FloatingPointError naming `where` (train passes
        the iteration) before the running statistics change: one NaN would otherwise stay in them
        for good and scale every later reward to NaN."""
        mask = mask.expand_as(rewards)                                            # [N, B, A]
        ret, rets = torch.zeros_like(rewards[0]), []                              # [B, A]
        for t in range(rewards.shape[0]):
            ret = self.gamma * ret + rewards[t]
            rets.append(ret[mask[t]])
        x = torch.cat(rets).double()                                              # [M]
        check_finite(rewards[mask], f"{where}: the rewards (the return statistics are left unchanged)")
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        tot = self.count + n  # parallel (Chan et al.) update of the running mean and variance
        delta = m - self.mean
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / tot) / tot
        self.mean, self.count = self.mean + delta * n / tot, tot
        return rewards / math.sqrt(self.var + 1e-8)


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    var = target.var()
    return float("nan") if var == 0 else (1 - (target - pred).var() / var).item()


# --------------------------------------------------------------------------------------------
# Training: rollout -> anchor -> GAE -> PPO, repeated (CleanRL's loop)
# --------------------------------------------------------------------------------------------
def train(cfg: SpacerConfig, scenes: Scenes, log_tokens: dict, table: torch.Tensor, n0: int, log_p_ref=None,
          teacher: LateFusionPolicy | None = None, state: dict | None = None, ckpt_fn=None,
          progress: bool = False) -> tuple:
    """Self-play PPO on the training `scenes` (a pool; each iteration draws num_worlds of them).

    log_tokens: tokenizer.encode of the pool (ids, id_valid [B_pool, A, N], pose [B_pool, A, N + 1, 3],
    pose_valid); table [3, K, spt, 3]; log_p_ref(scenes, ids, id_valid, pose, pose_valid) -> [B, A, N, K]
    the frozen reference (needed by spacer; with the others it only feeds the diagnostics);
    teacher: HR-PPO's BC policy; state: a checkpoint dict to resume from; ckpt_fn(state) is called
    every cfg.save_every iterations and at the end.
    Returns (policy, history list of per-iteration dicts)."""
    check_config(cfg)
    if cfg.anchor == "spacer" and log_p_ref is None:
        raise ValueError("anchor='spacer' needs the reference: pass log_p_ref")
    if cfg.anchor == "hr-ppo" and teacher is None:
        raise ValueError("anchor='hr-ppo' needs the behaviour-cloned teacher policy")
    device = scenes.device
    torch.manual_seed(cfg.seed)
    K = table.shape[1]
    policy = LateFusionPolicy(K, cfg.embed, cfg.hidden, cfg.type_heads).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    scaler = ReturnScaler(cfg.gamma)
    history, start = [], 0
    if state is not None:
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.__dict__.update(state["return_scaler"])
        history, start = list(state["history"]), int(state["iteration"])
        torch.set_rng_state(state["rng"])
    anchor_coef = cfg.beta if cfg.anchor == "spacer" else cfg.beta_hr if cfg.anchor == "hr-ppo" else 0.0
    bar = range(start, cfg.iterations)
    if progress:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"spacer[{cfg.anchor}]", initial=start, total=cfg.iterations)
    for it in bar:
        t0 = time.perf_counter()
        idx = torch.randperm(scenes.B)[: cfg.num_worlds]                          # [B]
        worlds = scenes.select(idx.to(device))
        env = make_env(worlds, table, cfg)
        goal_keep = torch.rand(worlds.B, worlds.A, device=device) >= cfg.goal_dropout  # [B, A]

        # ---- self-play rollout: every controlled agent acts with the shared policy --------
        roll = collect_rollout(policy, env, goal_keep, teacher)
        t_roll = time.perf_counter() - t0

        # ---- anchoring: one causal pass of the frozen reference over the executed tokens --
        logp_ref = None
        if log_p_ref is not None:
            log = {k: v[idx.to(v.device)].to(device) for k, v in log_tokens.items()}  # [B, A, N(+1), ...]
            logp_ref = reference_log_probs(log_p_ref, worlds, log, roll, n0)      # [N, B, A, K]
            rewards, logp_exec = anchored_reward(roll["r_task"], logp_ref, roll["actions"],
                                                 cfg.alpha if cfg.anchor == "spacer" else 0.0)  # [N, B, A]
            rewards = torch.where(roll["alive"], rewards, torch.zeros_like(rewards))  # none after the goal
        else:
            rewards, logp_exec = roll["r_task"], None
        t_ref = time.perf_counter() - t0 - t_roll

        # ---- GAE and the PPO update over controlled agents before their goal --------------
        alive = roll["alive"]                                                     # [N, B, A]
        scaled = scaler(rewards, alive, f"spacer[{cfg.anchor}] iteration {it + 1}")  # [N, B, A]
        # [N, B, A]
        advantages, returns = gae(scaled, roll["values"], cfg.gamma, cfg.gae_lambda, roll["dones"])
        anchor_logp = logp_ref if cfg.anchor == "spacer" else roll["teacher_logp"]
        batch = flatten(roll, advantages, returns, worlds.agent_type, anchor_logp)
        stats = ppo_update(policy, optimizer, batch, cfg, anchor_coef)

        # ---- diagnostics ------------------------------------------------------------------
        M = batch["actions"].shape[0]
        ctrl = roll["ctrl"]
        n_ctrl = max(int(ctrl.sum()), 1)
        simulated = int(ctrl.sum()) * roll["actions"].shape[0]  # the budget: every controlled agent-step
        dt = time.perf_counter() - t0
        row = dict(iteration=it + 1, **stats,
                   explained_variance=explained_variance(batch["values"], batch["returns"]),
                   task_reward=(roll["r_task"].sum(0)[ctrl]).mean().item() if bool(ctrl.any()) else 0.0,
                   goal_rate=roll["goal"].sum().item() / n_ctrl,
                   collision_rate=roll["collided"].sum().item() / n_ctrl,
                   offroad_rate=roll["offroad"].sum().item() / n_ctrl, agent_steps=simulated,
                   trained_steps=M, sps=simulated / dt, rollout_s=t_roll, reference_s=t_ref,
                   update_s=dt - t_roll - t_ref)
        if logp_ref is not None and bool(alive.any()):
            row["logp_ref_exec"] = logp_exec[alive].mean().item()
            # of the rollout's pi
            row["kl_ref"] = exact_kl(roll["logp_all"][alive], logp_ref[alive]).mean().item()
        history.append(row)
        if progress:
            bar.set_postfix(R=f"{row['task_reward']:.2f}", goal=f"{row['goal_rate']:.2f}",
                            coll=f"{row['collision_rate']:.2f}", H=f"{row['entropy']:.2f}",
                            kl=f"{row.get('kl_ref', float('nan')):.2f}", sps=f"{row['sps']:.0f}")
        if ckpt_fn is not None and ((it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations):
            ckpt_fn(dict(policy=policy.state_dict(), K=K, optimizer=optimizer.state_dict(), iteration=it + 1,
                         history=history, rng=torch.get_rng_state(), return_scaler=dict(scaler.__dict__),
                         cfg=asdict(cfg)))
    return policy, history


# --------------------------------------------------------------------------------------------
# Evaluation: R closed-loop rollouts per test scene, scored with the WOSAC metrics
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def policy_rollout(policy: LateFusionPolicy, scenes: Scenes, R: int, table: torch.Tensor, cfg: SpacerConfig,
                   timing: dict | None = None) -> tuple:
    """R closed-loop episodes of every scene in one env of B * R worlds (goals given; the training
    env and, with eval_top_k = 0, the training sampler: see the module docstring). Returns the
    executed futures pos [B, R, A, 80, 2], z [B, R, A, 80], yaw [B, R, A, 80].
    timing["policy_s"], when given, accumulates the seconds spent in the policy alone."""
    worlds = scenes.repeat(R)
    env = make_env(worlds, table, cfg)
    obs = env.reset()
    ctrl = env.controlled                                                         # [B*R, A]
    ids = torch.zeros(ctrl.shape, dtype=torch.long, device=env.device)            # [B*R, A]
    for _ in range(n_policy_steps(env.spt)):
        t0 = time.perf_counter()
        logits, _ = controlled_forward(policy, obs, worlds.agent_type, ctrl)      # [M, K]
        ids[ctrl] = sample_tokens(logits, cfg.eval_top_k)
        if timing is not None:
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            timing["policy_s"] = timing.get("policy_s", 0.0) + time.perf_counter() - t0
        obs, _, _ = env.step(ids)
    return tuple(x.unflatten(0, (scenes.B, R)) for x in env.rollout_future())    # [B, R, A, 80, ...]


def load_policy(path, device="cpu") -> tuple:
    """(policy in eval mode, SpacerConfig) from a policy.pt written by train.py --stage spacer."""
    fix = "run `python train.py --stage spacer` (--overwrite to replace a corrupt run)"
    d = read_file(path, "a SPACeR policy checkpoint", fix, keys=("policy", "K", "cfg"), device=device)
    try:
        cfg = SpacerConfig(**d["cfg"])
        policy = LateFusionPolicy(d["K"], cfg.embed, cfg.hidden, cfg.type_heads).to(device)
        policy.load_state_dict(d["policy"])
    except (TypeError, RuntimeError, ValueError) as e:  # a config or weights of another shape
        raise ValueError(f"{path}: not a SPACeR policy checkpoint of this code ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); {fix}") from None
    return policy.eval(), cfg
