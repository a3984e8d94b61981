"""HR-PPO's teacher: a decentralized behaviour-cloned policy pi_BC, the anchor of its KL regulariser.

Human-Regularized PPO (Cornelisse & Vinitsky 2024), adapted to motion tokens as SPACeR's baseline
(`SpacerConfig.anchor = "hr-ppo"`). pi_BC has the self-play policy's late-fusion architecture with
2x the hidden width and sees the same ego-centric observations o. It is fitted by cross-entropy to
the tokens the controlled agents really executed in the logs,

    L_BC = -E[log pi_BC(a_log | o)],

on the observations met when those agents replay their logged tokens in the simulator. PPO
(`ppo_anchor.train`, which receives pi_BC as its `teacher`) then adds

    beta_hr * KL(pi_BC(.|o) || pi(.|o)) = beta_hr * sum_a pi_BC(a|o) log(pi_BC(a|o) / pi(a|o))

to its loss. Unlike SPACeR's reference, pi_BC is decentralized: it sees o, not the whole scene.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ppo_anchor import LateFusionPolicy, SpacerConfig, drop_goal, make_env, n_policy_steps
from scenes import Scenes


@torch.no_grad()
def replay_log_observations(scenes: Scenes, log_tokens: dict, table: torch.Tensor, n0: int, cfg: SpacerConfig,
                            goal_keep: torch.Tensor) -> dict:
    """Observations met when the controlled agents execute their logged tokens in the env.
    Returns flat samples {obs, agent_type, target} of controlled agents with a valid logged token."""
    env = make_env(scenes, table, cfg)
    obs = env.reset()
    N = n_policy_steps(env.spt)
    log_ids, log_valid = log_tokens["ids"], log_tokens["id_valid"]                 # [B, A, N]
    samples = []
    for n in range(N):
        obs = drop_goal(obs, goal_keep)
        keep = env.controlled & log_valid[:, :, n0 + n]                           # [B, A]
        samples.append(({k: v[keep] for k, v in obs.items()}, scenes.agent_type[keep],
                        log_ids[:, :, n0 + n][keep]))
        obs, _, _ = env.step(log_ids[:, :, n0 + n])
    return dict(obs={k: torch.cat([s[0][k] for s in samples]) for k in samples[0][0]},  # [M, ...]
                agent_type=torch.cat([s[1] for s in samples]),                    # [M]
                target=torch.cat([s[2] for s in samples]))                        # [M]


def train_bc(cfg: SpacerConfig, scenes: Scenes, log_tokens: dict, table: torch.Tensor, n0: int,
             progress: bool = False) -> tuple:
    """pi_BC: the late-fusion policy with 2x hidden, cross-entropy on the logged tokens of the first
    cfg.bc_scenes scenes, with the same goal dropout as self-play. Returns (policy, final accuracy)."""
    torch.manual_seed(cfg.seed)
    device = scenes.device
    K = table.shape[1]
    data = []
    for i in range(0, min(cfg.bc_scenes, scenes.B), cfg.num_worlds):
        part = scenes.select(slice(i, min(i + cfg.num_worlds, cfg.bc_scenes, scenes.B)))
        sl = slice(i, i + part.B)
        goal_keep = torch.rand(part.B, part.A, device=device) >= cfg.goal_dropout  # [B, A]
        data.append(replay_log_observations(part, {k: v[sl] for k, v in log_tokens.items()}, table, n0, cfg,
                                            goal_keep))
    obs = {k: torch.cat([d["obs"][k] for d in data]) for k in data[0]["obs"]}    # [M, ...]
    agent_type = torch.cat([d["agent_type"] for d in data])                     # [M]
    target = torch.cat([d["target"] for d in data])                             # [M]
    bc = LateFusionPolicy(K, cfg.embed, cfg.bc_hidden, cfg.type_heads).to(device)
    opt = torch.optim.Adam(bc.parameters(), lr=1e-3)
    M = target.shape[0]
    epochs = range(cfg.bc_epochs)
    if progress:
        epochs = tqdm(epochs, desc="hr-ppo BC teacher")
    for _ in epochs:
        perm = torch.randperm(M, device=device)                                  # [M]
        correct = 0
        for start in range(0, M, cfg.minibatch_size):
            mb = perm[start:start + cfg.minibatch_size]                           # [m]
            logits, _ = bc({k: v[mb] for k, v in obs.items()}, agent_type[mb])    # [m, K]
            loss = F.cross_entropy(logits, target[mb])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += (logits.argmax(-1) == target[mb]).sum().item()
        if progress:
            epochs.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / M:.3f}")
    bc.eval()
    return bc, correct / max(M, 1)
