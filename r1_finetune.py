"""SMART-R1 (Pei et al., ICLR 2026): reinforcement fine-tuning of the next-token reference model
on the realism metric itself, with Metric-oriented Policy Optimization (MPO), inside an
SFT-RFT-SFT schedule. Paper facts: ../shared/research/smart_r1.md, sections 4-5.

The model pi_theta (reference_model.ReferenceModel) is a policy over motion tokens: at token step
n every controlled agent i picks a_n^i ~ pi_theta(. | s_n), and the transition is deterministic
(the token's motion is executed). One RFT step:

  1. Rollouts. For each of `scenes_per_step` training scenes, M closed-loop rollouts with the
     current model (top-k sampling at a temperature, dropout off), all in one batch.
  2. Reward. The WOSAC realism meta metric scores a *set* of rollouts of a scene (histogram
     likelihoods of the log under the rollouts), not one rollout. The M rollouts are split into
     G groups of M / G, and each group's set is scored as one sample:
         r_g = realism_meta(scene, rollouts of group g)          (NaN -> 0: no scored agents)
     G = 1 is the paper's setting (one scalar per scene); G > 1 gives GRPO a group to compare
     against and gives every method the same reward samples.
  3. Advantage, the same for every token of every rollout in group g:
         MPO        A_g = r_g - tau              tau fixed: by default the SFT-1 model's mean r
                                                 on training scenes, measured (same M and G)
                                                 before RFT (0.77 on WOMD in the paper)
         GRPO-like  A_g = (r_g - mean_g' r_g') / (std_g' r_g' + eps)     over the scene's G groups
         REINFORCE  A_g = r_g - tau, and no KL term (beta = 0)
  4. Loss, averaged over the valid (rollout, agent, token step) pairs of controlled agents after
     the history (n >= n0), with one teacher-forced causal pass over the executed sequence:
         L = mean [ -A * log pi_theta(a_n^i | s_n) + beta * k3 ],   beta = 0.04
         k3 = rho - log rho - 1,   rho = pi_sft(a_n^i | s_n) / pi_theta(a_n^i | s_n)
     pi_sft is the frozen SFT-1 model. k3 >= 0, it is 0 where the models agree, and its mean
     under pi_theta's samples is exactly KL(pi_theta || pi_sft) ("unbiased k3"). The paper
     writes the first term as -(pi / sg[pi]) A, whose value is -A and whose gradient is
     -A grad log pi: plain REINFORCE with a constant baseline, no clipping (one gradient step
     per batch of rollouts, so the update is on-policy).

Notes. log pi is the model's full softmax, while rollouts sample from its top-k at a
temperature (as evaluation does); the sampled token is always in the top-k, so log pi is finite.
Per-agent credit (each agent's own collision / off-road flags added to A) is not implemented:
every token of a group shares its group's A, as in the paper.

Scale (the toy default, R1Config): M = 8 rollouts scored as G = 2 sets of 4, 4 scenes per step,
24 steps, constant AdamW rate 1e-4; KL(pi || pi_sft) ends near 0.01-0.03 (RLFTSim targets 0.01),
where beta * k3 is a real force. Measured on the toy default (seed 0, README): rate 1e-4 lifts
realism meta from 0.645 (SFT) to 0.659, rate 1e-5 only to 0.647 over three seeds (KL 0.0004-0.003:
the policy barely moves in 24 steps). tau must be the mean reward of the *batches* RFT will see:
scenes differ in difficulty far more than rollouts do, and a tau measured on 16 fixed scenes sat
0.03-0.05 above it, so most advantages were negative, which pushes probability off whatever was
sampled (entropy rose, KL grew 2-4x, and the realism gain vanished).

Schedule (train.py --stage r1): BC -> SFT-1 (CAT-K) -> RFT (MPO) -> SFT-2 (CAT-K), against the
control SFT-SFT: the same SFT-1, then one CAT-K phase with the epochs of RFT and SFT-2 together.
"Equal budget" counts trajectories trained on: a CAT-K epoch rolls out and trains on each of the
n_train training scenes once; an RFT step rolls out and trains on scenes_per_step * M worlds. So
RFT is worth ceil(rft_steps * scenes_per_step * M / n_train) CAT-K epochs (`rft_epochs`), which
roughly matches compute too, since both costs are dominated by one rollout plus one
teacher-forced forward / backward per trajectory (RFT adds the WOSAC scoring and pi_sft's
forward pass; wall times are logged). In scene visits RFT is M times smaller.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

import reference_model as RM
import wosac_metrics as wm
from scenes import NOW, T, Scenes

ADVANTAGES = ("mpo", "grpo", "reinforce")


@dataclass
class R1Config:
    M: int = 8                    # rollouts per training scene in an RFT step
    groups: int = 2               # G: the M rollouts are scored as G sets of M / G (one reward each)
    scenes_per_step: int = 4      # training scenes per RFT gradient step
    rft_steps: int = 24           # RFT gradient steps (24 x 4 scenes x M = 8: two CAT-K epochs of trajectories)
    lr: float = 1e-4              # AdamW rate of RFT (constant; KL to SFT-1 ends near 0.01-0.03)
    weight_decay: float = 0.0     # AdamW weight decay during RFT (the KL term is the regulariser)
    grad_clip: float = 1.0        # gradient norm clip during RFT
    chunk_worlds: int = 8         # rollout worlds per forward / backward chunk (memory; the gradient is the same)
    beta: float = 0.04            # weight of KL_k3(pi || pi_sft)
    tau: float | None = None      # MPO's fixed baseline; None = SFT-1's mean reward on training scenes
    tau_scenes: int = 32          # random training scenes rolled out (M each) to measure tau
    advantage: str = "mpo"        # mpo: r - tau | grpo: group-normalised r | reinforce: r - tau, beta = 0
    top_k: int = 8                # top-k sampling of RFT rollouts (as in evaluation)
    temperature: float = 1.0      # sampling temperature of RFT rollouts
    save_every: int = 8           # RFT steps between checkpoints
    sft1_epochs: int = 0          # CAT-K epochs of SFT-1 from BC; 0 = the reference stage's CAT-K model
    sft2_epochs: int = 1          # CAT-K epochs of SFT-2 after RFT
    sft_lr: float | None = None   # CAT-K peak learning rate of SFT-1 / SFT-2; None = the reference stage's catk_lr
    eval_R: int = 32              # rollouts per held-out test scene (WOSAC uses 32)
    seed: int = 0                 # seeds scene order and rollout sampling


def quick_config() -> R1Config:
    """Tiny sizes for smoke runs (about a minute on 2 cores)."""
    return R1Config(M=4, groups=2, scenes_per_step=2, rft_steps=3, tau_scenes=2, save_every=1, sft1_epochs=0,
                    sft2_epochs=1, eval_R=4, lr=1e-4)


def check_config(cfg: R1Config) -> None:
    if cfg.advantage not in ADVANTAGES:
        raise ValueError(f"R1Config.advantage must be one of {ADVANTAGES}, got {cfg.advantage!r}")
    if cfg.groups < 1 or cfg.M % cfg.groups:
        raise ValueError(f"R1Config: M={cfg.M} rollouts must split into groups={cfg.groups} equal sets")
    if cfg.rft_steps < 1 or cfg.scenes_per_step < 1 or cfg.chunk_worlds < 1:
        raise ValueError("R1Config: rft_steps, scenes_per_step and chunk_worlds must be >= 1")
    if cfg.advantage == "grpo" and cfg.groups < 2:
        raise ValueError("R1Config: the GRPO-style advantage needs groups >= 2 (a group mean to compare with)")


# --------------------------------------------------------------------------------------------
# The loss: k3 KL estimator, advantages, MPO
# --------------------------------------------------------------------------------------------
def k3_kl(logp, logp_sft):
    """k3 = rho - log rho - 1 with rho = pi_sft / pi at the sampled tokens: logp, logp_sft [...] -> [...].
    Non-negative (x - 1 >= log x); its mean over samples of pi is KL(pi || pi_sft)."""
    log_rho = logp_sft - logp                                                  # [...]
    return log_rho.exp() - log_rho - 1


def advantages(r, kind: str, tau: float | None, eps: float = 1e-6):
    """Rewards of each scene's G groups r [B, G] -> advantages [B, G]."""
    if kind == "grpo":
        return (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)  # [B, G]
    if tau is None:
        raise ValueError(f"advantages: the {kind!r} advantage needs the threshold tau")
    return r - tau                                                             # [B, G]


def mpo_loss(logp, logp_sft, adv, mask, beta: float) -> tuple:
    """MPO: mean over masked tokens of -A log pi + beta k3.

    logp [W, A, N] log pi_theta of the sampled tokens (with gradient), logp_sft [W, A, N] (no
    gradient), adv [W] one advantage per rollout world, mask [W, A, N]. Returns (loss, stats)."""
    n = mask.sum().clamp(min=1)
    pg = -(adv[:, None, None] * logp)                                          # [W, A, N]
    kl = k3_kl(logp, logp_sft.detach())                                        # [W, A, N]
    loss = ((pg + beta * kl) * mask).sum() / n
    stats = dict(kl=float((kl.detach() * mask).sum() / n), logp=float((logp.detach() * mask).sum() / n))
    return loss, stats


# --------------------------------------------------------------------------------------------
# Rollouts and their rewards
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_rollouts(model, tok, scenes: Scenes, enc: dict, M: int, top_k: int, temperature: float,
                    generator=None) -> tuple:
    """M closed-loop rollouts of each scene in one batch of W = B * M worlds (scene-major).
    Returns (the repeated scenes, closed_loop's output: tokens, traj [W, A, 80, 3], controlled [W, A])."""
    rep = scenes.repeat(M)
    enc_rep = {k: v.repeat_interleave(M, 0) for k, v in enc.items()}          # [W, A, ...]
    was_training = model.training
    model.eval()
    out = RM.closed_loop(model, tok, rep, top_k=top_k, temperature=temperature, generator=generator, enc=enc_rep)
    model.train(was_training)
    return rep, out


@torch.no_grad()
def group_scores(scenes: Scenes, traj, G: int) -> dict:
    """WOSAC scores of G sets of rollouts per scene: traj [B, M, A, 80, 3] -> per-group metrics
    [B, G] (realism_meta with NaN -> 0, collision_rate, offroad_rate)."""
    B, M = traj.shape[:2]
    sets = traj.unflatten(1, (G, M // G)).flatten(0, 1)                        # [B*G, M/G, A, 80, 3]
    z = scenes.z[:, None, :, NOW:NOW + 1].expand(-1, M // G, -1, T - NOW - 1).repeat_interleave(G, 0)  # [B*G, M/G, A, 80]
    s = wm.score_rollouts(scenes.repeat(G), sets[..., :2], z, sets[..., 2])
    return {k: torch.nan_to_num(s[k].view(B, G)) for k in ("realism_meta", "collision_rate", "offroad_rate")}


def token_log_probs(model, scenes: Scenes, tokens: dict):
    """log pi of the executed tokens by one teacher-forced causal pass: [W, A, N]."""
    logits = model(scenes, tokens)                                             # [W, A, N, K]
    return logits.log_softmax(-1).gather(-1, tokens["ids"][..., None]).squeeze(-1)  # [W, A, N]


# --------------------------------------------------------------------------------------------
# One RFT step and the RFT loop
# --------------------------------------------------------------------------------------------
def rft_step(model, sft, tok, opt, scenes: Scenes, enc: dict, cfg: R1Config, tau: float | None,
             generator=None) -> dict:
    """Roll out, score, and take one gradient step of MPO (or a baseline, by cfg.advantage)."""
    B, M, G = scenes.B, cfg.M, cfg.groups
    t0 = time.perf_counter()
    rep, out = sample_rollouts(model, tok, scenes, enc, M, cfg.top_k, cfg.temperature, generator)
    t1 = time.perf_counter()
    score = group_scores(scenes, out["traj"].unflatten(0, (B, M)), G)         # [B, G] each
    r = score["realism_meta"]                                                  # [B, G]
    adv = advantages(r, cfg.advantage, tau).repeat_interleave(M // G, 1).flatten()  # [W] scene-major, as rep
    t2 = time.perf_counter()
    N = out["tokens"]["ids"].shape[-1]
    future = torch.arange(N, device=r.device) >= tok.n0                       # [N]
    mask = out["controlled"][..., None] & future                               # [W, A, N]
    n_tok = mask.sum().clamp(min=1)
    beta = 0.0 if cfg.advantage == "reinforce" else cfg.beta
    model.eval()                                     # no dropout: the gradient is of the policy that sampled
    opt.zero_grad(set_to_none=True)
    tot = dict(loss=0.0, kl=0.0, logp=0.0)
    for w0 in range(0, B * M, cfg.chunk_worlds):     # chunks of worlds bound memory; their gradients add up
        sl = slice(w0, w0 + cfg.chunk_worlds)
        sub, tokens = rep.select(sl), {k: v[sl] for k, v in out["tokens"].items()}
        logp = token_log_probs(model, sub, tokens)                             # [w, A, N]
        with torch.no_grad():
            logp_sft = token_log_probs(sft, sub, tokens)                       # [w, A, N]
        loss, stats = mpo_loss(logp, logp_sft, adv[sl], mask[sl], beta)
        share = float(mask[sl].sum() / n_tok)        # chunk means, weighted to the mean over all tokens
        (loss * share).backward()
        for k, v in dict(loss=loss.item(), **stats).items():
            tot[k] += v * share
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return dict(reward=float(r.mean()), adv_mean=float(adv.mean()), adv_pos=float((adv > 0).float().mean()),
                collision=float(score["collision_rate"].mean()), offroad=float(score["offroad_rate"].mean()),
                grad_norm=float(grad_norm), rollout_s=t1 - t0, score_s=t2 - t1, update_s=time.perf_counter() - t2, **tot)


def step_scenes(step: int, n_per: int, n_train: int, seed: int) -> torch.Tensor:
    """Training scene indices of an RFT step: consecutive slices of a fresh permutation per pass,
    a function of (step, seed) only, so a resumed run sees the same scenes."""
    pos = torch.arange(step * n_per, (step + 1) * n_per)                       # [n_per] global positions
    perm = {int(p): torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + int(p)))
            for p in (pos // n_train).unique()}                                # a pass or two
    return torch.stack([perm[int(p)][int(i)] for p, i in zip(pos // n_train, pos % n_train)])  # [n_per]


@torch.no_grad()
def measure_tau(model, tok, get_batch, n_train: int, cfg: R1Config) -> float:
    """The default MPO threshold: the mean group reward r_g of `model` over `tau_scenes` random
    training scenes with the RFT rollout settings (the same M and G, since the metric depends on
    the set size). Scenes differ in difficulty far more than rollouts do, so a small or fixed
    subset can put tau well above or below the mean reward of the RFT batches."""
    rewards = []
    n = min(cfg.tau_scenes, n_train)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + 99_991))[:n]  # [n]
    for b0 in range(0, n, cfg.scenes_per_step):
        idx = order[b0:b0 + cfg.scenes_per_step]
        scenes, enc = get_batch(idx)
        gen = torch.Generator(device=scenes.device).manual_seed(cfg.seed * 1_000_003 + 999_999 - b0)
        _, out = sample_rollouts(model, tok, scenes, enc, cfg.M, cfg.top_k, cfg.temperature, gen)
        rewards.append(group_scores(scenes, out["traj"].unflatten(0, (scenes.B, cfg.M)), cfg.groups)["realism_meta"])
    return float(torch.cat(rewards).mean())


def frozen_copy(model):
    """pi_sft: a frozen copy in eval mode."""
    sft = copy.deepcopy(model).eval()
    for p in sft.parameters():
        p.requires_grad_(False)
    return sft


def train_rft(model, sft, tok, get_batch, n_train: int, cfg: R1Config, tau: float | None, opt,
              start_step: int = 0, history: list | None = None, save_fn=None, progress: bool = True) -> list:
    """RFT steps start_step..cfg.rft_steps - 1 on `model` (in place) against the frozen `sft`.

    get_batch(idx) -> (scenes, enc) gives training scenes `idx` (trimmed, on the model's device)
    and their log tokens. save_fn(step, history) is called every cfg.save_every steps and at the
    end. Returns the per-step history (dicts of floats)."""
    from tqdm import tqdm
    check_config(cfg)
    history = list(history or [])
    bar = tqdm(range(start_step, cfg.rft_steps), desc=f"RFT ({cfg.advantage})", disable=not progress, leave=False)
    for step in bar:
        scenes, enc = get_batch(step_scenes(step, cfg.scenes_per_step, n_train, cfg.seed))
        gen = torch.Generator(device=scenes.device).manual_seed(cfg.seed * 1_000_003 + step)
        h = rft_step(model, sft, tok, opt, scenes, enc, cfg, tau, gen)
        history.append(dict(step=step + 1, **h))
        bar.set_postfix(r=f"{h['reward']:.3f}", kl=f"{h['kl']:.4f}", loss=f"{h['loss']:.4f}")
        if save_fn is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.rft_steps):
            save_fn(step + 1, history)
    return history


def rft_epochs(cfg: R1Config, n_train: int) -> int:
    """RFT's budget in CAT-K epochs for the SFT-SFT control: trajectories trained on / n_train."""
    return math.ceil(cfg.rft_steps * cfg.scenes_per_step * cfg.M / n_train)


# --------------------------------------------------------------------------------------------
# Results across seeds
# --------------------------------------------------------------------------------------------
def summary_table(evals: list, keys: tuple) -> str:
    """Markdown table of mean +- std over seeds: evals is a list (one per seed) of
    {row name: {metric: value}}; a row is shown with the seeds that have it."""
    rows = list(dict.fromkeys(name for e in evals for name in e))
    lines = ["| model | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in rows:
        have = [e[name] for e in evals if name in e]
        vals = torch.tensor([[m.get(k, math.nan) for k in keys] for m in have], dtype=torch.float64)  # [seeds, keys]
        std = vals.std(0) if len(vals) > 1 else torch.zeros(len(keys), dtype=torch.float64)  # [keys]
        cells = ["-" if math.isnan(m) else f"{m:.4f} +- {s:.4f}" if len(vals) > 1 else f"{m:.4f}"
                 for m, s in zip(vals.mean(0).tolist(), std.tolist())]  # a metric a seed did not log: "-"
        lines.append(f"| {name} | {len(vals)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
