"""HR-PPO's teacher: a decentralized behaviour-cloned policy pi_BC, the anchor of its KL regulariser.

Human-Regularized PPO (Cornelisse & Vinitsky 2024), adapted to motion tokens as SPACeR's baseline
(`SpacerConfig.anchor = "hr-ppo"`). pi_BC has the self-play policy's late-fusion architecture with
2x the hidden width and sees the same ego-centric observations o. It is fitted by cross-entropy to
the tokens the controlled agents really executed in the logs,

    L_BC = -E[log pi_BC(a_log | o)],

on the observations met when those agents replay their logged tokens in the simulator (the
self-play env, so an agent at its goal is parked and, as in PPO, no longer a sample). PPO
(`ppo_anchor.train`, which receives pi_BC as its `teacher`) then adds

    beta_hr * KL(pi_BC(.|o) || pi(.|o)) = beta_hr * sum_a pi_BC(a|o) log(pi_BC(a|o) / pi(a|o))

to its loss. Unlike SPACeR's reference, pi_BC is decentralized: it sees o, not the whole scene.

SPACeR's HR-PPO teacher is trained on the full WOMD training set and reaches 92 % validation
accuracy. Ours is fitted on every training scene (`bc_scenes = 0`) and judged like it: top-1 token
accuracy on the *held-out* validation split's logs (`token_accuracy` on `bc_samples` of that split),
never on the tokens it was fitted to. Its accuracy and cost are in the README. Its training is a
fixed cost before PPO; the PPO budget (iterations x worlds) is the same for all three methods.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ppo_anchor import LateFusionPolicy, SpacerConfig, drop_goal, make_env, n_policy_steps
from scenes import Scenes


@torch.no_grad()
def replay_log_observations(scenes: Scenes, log_tokens: dict, table: torch.Tensor, n0: int, cfg: SpacerConfig,
                            goal_keep: torch.Tensor) -> dict:
    """Observations met when the controlled agents execute their logged tokens in the env.
    Returns flat samples {obs, agent_type, target} of controlled agents with a valid logged token,
    before they reach their goal (parked after it, they are no longer samples in PPO either)."""
    env = make_env(scenes, table, cfg)
    obs = env.reset()
    N = n_policy_steps(env.spt)
    log_ids, log_valid = log_tokens["ids"], log_tokens["id_valid"]                 # [B, A, N]
    samples = []
    for n in range(N):
        obs = drop_goal(obs, goal_keep)
        keep = env.controlled & ~env.done & log_valid[:, :, n0 + n]               # [B, A]
        samples.append(({k: v[keep] for k, v in obs.items()}, scenes.agent_type[keep],
                        log_ids[:, :, n0 + n][keep]))
        obs, _, _ = env.step(log_ids[:, :, n0 + n])
    return dict(obs={k: torch.cat([s[0][k] for s in samples]) for k in samples[0][0]},  # [M, ...]
                agent_type=torch.cat([s[1] for s in samples]),                    # [M]
                target=torch.cat([s[2] for s in samples]))                        # [M]


def bc_samples(scenes: Scenes, log_tokens: dict, table: torch.Tensor, n0: int, cfg: SpacerConfig,
               seed: int, n_scenes: int = 0) -> dict:
    """replay_log_observations over the first n_scenes scenes of a split (0: all), num_worlds at a
    time, with goal dropout drawn from `seed`. Returns flat samples {obs, agent_type, target} [M, ...]
    of the controlled agents' valid logged tokens, up to their goal."""
    gen = torch.Generator().manual_seed(seed)
    log_tokens = {k: v.to(scenes.device) for k, v in log_tokens.items()}
    n = scenes.B if n_scenes <= 0 else min(n_scenes, scenes.B)
    data = []
    for i in range(0, n, cfg.num_worlds):
        sl = slice(i, min(i + cfg.num_worlds, n))
        part = scenes.select(sl)
        keep = torch.rand(part.B, part.A, generator=gen) >= cfg.goal_dropout     # [B, A]
        goal_keep = keep.to(scenes.device)
        data.append(replay_log_observations(part, {k: v[sl] for k, v in log_tokens.items()}, table, n0, cfg,
                                            goal_keep))
    return dict(obs={k: torch.cat([d["obs"][k] for d in data]) for k in data[0]["obs"]},  # [M, ...]
                agent_type=torch.cat([d["agent_type"] for d in data]),            # [M]
                target=torch.cat([d["target"] for d in data]))                    # [M]


@torch.no_grad()
def token_accuracy(bc: LateFusionPolicy, samples: dict, batch: int = 8192) -> float:
    """Top-1 accuracy of pi_BC on the logged tokens of `samples` (bc_samples of one split)."""
    M = samples["target"].shape[0]
    correct = 0
    for start in range(0, M, batch):
        sl = slice(start, start + batch)
        logits, _ = bc({k: v[sl] for k, v in samples["obs"].items()}, samples["agent_type"][sl])  # [m, K]
        correct += int((logits.argmax(-1) == samples["target"][sl]).sum())
    return correct / max(M, 1)


def train_bc(cfg: SpacerConfig, scenes: Scenes, log_tokens: dict, val_scenes: Scenes, val_tokens: dict,
             table: torch.Tensor, n0: int, progress: bool = False) -> tuple:
    """pi_BC: the late-fusion policy with 2x hidden, cross-entropy on the logged tokens of the training
    `scenes` (the first cfg.bc_scenes; 0: all), with the same goal dropout as self-play, for
    cfg.bc_epochs epochs. Scored after every epoch on the held-out `val_scenes` (val_tokens: their
    tokenizer.encode). Returns (policy in eval mode, stats): val_accuracy (the last epoch's), its
    history per epoch, train_accuracy, the token counts and the seconds spent."""
    torch.manual_seed(cfg.seed)
    device = scenes.device
    t0 = time.perf_counter()
    data = bc_samples(scenes, log_tokens, table, n0, cfg, cfg.seed, cfg.bc_scenes)
    val = bc_samples(val_scenes, val_tokens, table, n0, cfg, cfg.seed + 1)
    obs, agent_type, target = data["obs"], data["agent_type"], data["target"]    # [M, ...]
    t_replay = time.perf_counter() - t0
    bc = LateFusionPolicy(table.shape[1], cfg.embed, cfg.bc_hidden, cfg.type_heads).to(device)
    opt = torch.optim.Adam(bc.parameters(), lr=1e-3)
    M = target.shape[0]
    history = []
    epochs = range(cfg.bc_epochs)
    if progress:
        epochs = tqdm(epochs, desc="hr-ppo BC teacher")
    for _ in epochs:
        bc.train()
        perm = torch.randperm(M, device=device)                                  # [M]
        for start in range(0, M, cfg.minibatch_size):
            mb = perm[start:start + cfg.minibatch_size]                           # [m]
            logits, _ = bc({k: v[mb] for k, v in obs.items()}, agent_type[mb])    # [m, K]
            loss = F.cross_entropy(logits, target[mb])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bc.eval()
        history.append(token_accuracy(bc, val))
        if progress:
            epochs.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{history[-1]:.3f}")
    t_fit = time.perf_counter() - t0 - t_replay
    stats = dict(val_accuracy=history[-1] if history else token_accuracy(bc, val),
                 val_accuracy_history=history,
                 train_accuracy=token_accuracy(bc, data), train_tokens=M, val_tokens=val["target"].shape[0],
                 train_scenes=scenes.B if cfg.bc_scenes <= 0 else min(cfg.bc_scenes, scenes.B),
                 val_scenes=val_scenes.B, epochs=cfg.bc_epochs, replay_s=t_replay, fit_s=t_fit)
    return bc, stats
