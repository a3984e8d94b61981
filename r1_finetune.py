"""SMART-R1 (Pei et al., ICLR 2026): reinforcement fine-tuning of the next-token reference model
on the realism metric itself, with Metric-oriented Policy Optimization (MPO), inside an
SFT-RFT-SFT schedule. Paper facts: ../shared/research/smart_r1.md, sections 4-5.

The model pi_theta (reference_model.ReferenceModel) is a policy over motion tokens: at token step
n every controlled agent i picks a_n^i ~ pi_theta(. | s_n), and the transition is deterministic
(the token's motion is executed). One RFT step:

  1. Rollouts. For each of `scenes_per_step` training scenes, M closed-loop rollouts of the
     current model (dropout off), all in one batch, sampled from the policy itself: the full
     softmax at temperature 1 (see "Sampling and the gradient").
  2. Reward. The WOSAC realism meta metric scores a *set* of rollouts of a scene (histogram
     likelihoods of the log under the rollouts), not one rollout. The M rollouts are split into
     G groups of M / G, and each group's set is scored as one sample:
         r_g = realism_meta(scene, rollouts of group g)
     G = 1 is the paper's setting and the default: all M rollouts of a scene form one set, one
     reward per scene (a set of a few rollouts gives a biased, noisy histogram likelihood).
     A set with no scored agents has r_g = NaN: its tokens are masked out of the loss (no
     gradient) and counted (`n_nan_groups`). Scoring it 0 instead would give A = -tau, a
     penalty for a scene the metric cannot judge.
  3. Advantage, the same for every token of every rollout in group g:
         MPO        A_g = r_g - tau              tau fixed: by default the SFT-1 model's mean r
                                                 on training scenes, measured (same M and G)
                                                 before RFT (0.77 on WOMD in the paper)
         GRPO-like  A_g = (r_g - mean_g' r_g') / (std_g' r_g' + eps)     over the scene's G groups
         REINFORCE  A_g = r_g - tau, and no KL term (beta = 0)
     The GRPO-style variant runs with G = grpo_groups >= 4 sets per scene: with G = 2,
     (r - mean) / std is always +-1, a sign without a size; check_config rejects G < 4.
  4. Loss, averaged over the valid (rollout, agent, token step) pairs of controlled agents after
     the history (n >= n0), with one teacher-forced causal pass over the executed sequence:
         L = mean [ -A * log pi_theta(a_n^i | s_n) + beta * k3 ],   beta = 0.04
         k3 = rho - log rho - 1,   rho = pi_sft(a_n^i | s_n) / pi_theta(a_n^i | s_n)
     pi_sft is the frozen SFT-1 model. k3 >= 0, it is 0 where the models agree, and its mean
     under pi_theta's samples is exactly KL(pi_theta || pi_sft) ("unbiased k3"). The paper
     writes the first term as -(pi / sg[pi]) A, whose value is -A and whose gradient is
     -A grad log pi: plain REINFORCE with a constant baseline, no clipping (one gradient step
     per batch of rollouts, so the update is on-policy).

Sampling and the gradient. A constant baseline leaves the policy gradient unbiased because of the
score-function identity sum_a q(a) grad log q(a) = grad sum_a q(a) = 0, which holds only when the
distribution q that samples is the one whose log-probability is differentiated. Sampling from the
renormalised top-k q = pi / Z_k while differentiating the full softmax's log pi = log q + log Z_k
adds E_q[A] grad log Z_k to the gradient: a constant advantage then moves the policy, and mostly
negative advantages push probability out of the top k (entropy and KL grow, the reward falls);
the k3 mean under q is not KL(pi || pi_sft) either. So `policy_log_probs(logits, rft_top_k)` is
the one definition of the RFT policy, used by the sampler and the loss alike. The default
rft_top_k = 0 is the full softmax: q = pi, the policy MPO's formula is written for, whose KL to
pi_sft is 0 at the first step and is what beta weighs, and whose samples cover every token pi_sft
gives mass, which k3 needs (E_q[rho] = 1). rft_top_k = k > 0 makes the policy the renormalised
top-k in both places: its policy gradient is unbiased too, but its KL to the full-softmax pi_sft
starts at -log Z_k > 0 and k3's mean falls short of it by pi_sft's mass outside the top k.
Evaluation keeps its own top-k sampling (train.py); RFT never uses it.

Logged per RFT step (train_rft's history): reward (mean r_g over scored sets), kl (the k3 mean),
kl_exact (sum_a q log(q / pi_sft) over the vocabulary, averaged over the same sampled states: the
teacher-forced pass computes every logit anyway), entropy of q, n_nan_groups, collision and
off-road rates of the rollouts, and wall times. Per-agent credit (each agent's own collision
flags added to A) is not implemented: every token of a group shares its group's A, as in the paper.

Scale (the toy default, R1Config): M = 16 rollouts per scene scored as one set, 4 scenes per step,
16 steps (1024 scored rollouts), constant AdamW rate 1e-4. tau must be the mean reward of the
*batches* RFT will see, so it is measured on random training scenes: scenes differ in difficulty
far more than rollouts do, and a tau measured on a few fixed scenes can sit well above the batch
mean, which makes most advantages negative. Measured numbers: README, SMART-R1 section.

Schedule (train.py --stage r1, `schedule`): BC -> SFT-1 (N CAT-K epochs) -> RFT (MPO) -> SFT-2
(N CAT-K epochs), against the control SFT-SFT: the same SFT-1, then N more CAT-K epochs. Both arms
train 2N CAT-K epochs from BC, and SFT-2 and the control's second phase are the same phase (N
epochs, the same peak rate, warm-up, cosine decay and shuffling) from different starts, so the
paired difference per seed is RFT's effect (the paper: 16 / RFT / 16 against 32). The old
trajectory-matched control is a named variant, reported separately: SFT-1, then N + rft_epochs
CAT-K epochs, where a CAT-K epoch trains on each of the n_train training scenes once and RFT's
scenes_per_step * M * rft_steps trained rollouts count as ceil(that / n_train) epochs.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace

import torch

import distributed as D
import reference_model as RM
import wosac_metrics as wm
from scenes import NOW, T, Scenes, check_finite

ADVANTAGES = ("mpo", "grpo", "reinforce")
GRPO_MIN_GROUPS = 4               # fewer sets per scene and (r - mean) / std is a sign, not a size


@dataclass
class R1Config:
    M: int = 16                   # rollouts per training scene in an RFT step
    groups: int = 1               # G: the M rollouts are scored as G sets of M / G; 1 = one reward per scene
    grpo_groups: int = 4          # G of the GRPO-style variant (>= GRPO_MIN_GROUPS sets to normalise over)
    scenes_per_step: int = 4      # training scenes per RFT gradient step
    rft_steps: int = 16           # RFT gradient steps (16 x 4 scenes x M = 16: 1024 scored rollouts)
    lr: float = 1e-4              # AdamW rate of RFT (constant)
    weight_decay: float = 0.0     # AdamW weight decay during RFT (the KL term is the regulariser)
    grad_clip: float = 1.0        # gradient norm clip during RFT
    chunk_worlds: int = 8         # rollout worlds per forward / backward chunk (memory; same gradient)
    beta: float = 0.04            # weight of KL_k3(pi || pi_sft)
    tau: float | None = None      # MPO's fixed baseline; None = SFT-1's mean reward on training scenes
    tau_scenes: int = 32          # random training scenes rolled out (M each) to measure tau
    advantage: str = "mpo"        # mpo: r - tau | grpo: group-normalised r | reinforce: r - tau, beta = 0
    rft_top_k: int = 0            # the RFT policy, sampled and differentiated: 0 = full softmax, k = top-k
    save_every: int = 8           # RFT steps between checkpoints
    sft_epochs: int = 2           # N: CAT-K epochs of SFT-1 and of SFT-2; the SFT-SFT control gets 2N
    sft_lr: float | None = None   # CAT-K peak rate of every SFT phase; None = the reference stage's catk_lr
    eval_R: int = 32              # rollouts per held-out test scene (WOSAC uses 32)
    seed: int = 0                 # seeds scene order and rollout sampling


def check_config(cfg: R1Config) -> None:
    if cfg.advantage not in ADVANTAGES:
        raise ValueError(f"R1Config.advantage must be one of {ADVANTAGES}, got {cfg.advantage!r}")
    if cfg.groups < 1 or cfg.M % cfg.groups:
        raise ValueError(f"R1Config: M={cfg.M} rollouts must split into groups={cfg.groups} equal sets")
    if cfg.rft_steps < 1 or cfg.scenes_per_step < 1 or cfg.chunk_worlds < 1:
        raise ValueError("R1Config: rft_steps, scenes_per_step and chunk_worlds must be >= 1")
    if cfg.advantage == "grpo" and cfg.groups < GRPO_MIN_GROUPS:
        raise ValueError(f"R1Config: the GRPO-style advantage needs groups >= {GRPO_MIN_GROUPS} sets per "
                         f"scene (got groups={cfg.groups}; with 2, (r - mean) / std is always +-1); "
                         f"set grpo_groups and M so that M % grpo_groups == 0")
    if cfg.rft_top_k < 0:
        raise ValueError(f"R1Config.rft_top_k must be 0 (full softmax) or a positive k, got {cfg.rft_top_k}")
    if cfg.sft_epochs < 0:
        raise ValueError(f"R1Config.sft_epochs (N) must be >= 0, got {cfg.sft_epochs}")


def variant_config(cfg: R1Config, kind: str) -> R1Config:
    """The RFT configuration of advantage `kind`: GRPO scores grpo_groups sets per scene, the
    others keep cfg's groups. Checked, so a bad variant fails before any training."""
    out = replace(cfg, advantage=kind, groups=cfg.grpo_groups if kind == "grpo" else cfg.groups)
    check_config(out)
    return out


def rft_epochs(cfg: R1Config, n_train: int) -> int:
    """RFT's trajectories trained on, counted in CAT-K epochs (one epoch = n_train trajectories)."""
    return math.ceil(cfg.rft_steps * cfg.scenes_per_step * cfg.M / n_train)


def schedule(cfg: R1Config, n_train: int) -> dict:
    """CAT-K epochs of each SFT phase. sft1 starts from BC; sft2 from RFT; sftsft (the paper's
    control) and sftsft_traj (the trajectory-matched variant) from SFT-1. CAT-K epochs from BC:
    SFT-RFT-SFT = sft1 + sft2 = 2N = sft1 + sftsft = SFT-SFT."""
    N = cfg.sft_epochs
    return dict(sft1=N, sft2=N, sftsft=N, sftsft_traj=N + rft_epochs(cfg, n_train))


# --------------------------------------------------------------------------------------------
# The policy, the loss: k3 KL estimator, advantages, MPO
# --------------------------------------------------------------------------------------------
def policy_log_probs(logits, top_k: int):
    """log q over the vocabulary, logits [..., K] -> [..., K]: the RFT policy. top_k = 0 is the full
    softmax (q = pi); top_k = k renormalises over the k largest logits (-inf elsewhere), which is
    what reference_model.sample_top_k draws from at temperature 1."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]                      # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))               # [..., K]
    return logits.log_softmax(-1)                                              # [..., K]


def k3_kl(logp, logp_sft):
    """k3 = rho - log rho - 1 with rho = pi_sft / pi at the sampled tokens: logp, logp_sft [...] -> [...].
    Non-negative (x - 1 >= log x); its mean over samples of pi is KL(pi || pi_sft)."""
    log_rho = logp_sft - logp                                                  # [...]
    return log_rho.exp() - log_rho - 1


def advantages(r, kind: str, tau: float | None, eps: float = 1e-6):
    """Rewards of each scene's G groups r [B, G] -> advantages [B, G]; NaN where r is NaN (a set
    with no scored agents), and GRPO's mean and std are over the scene's other, scored groups."""
    if kind == "grpo":
        ok = ~r.isnan()                                                        # [B, G]
        n = ok.sum(1, keepdim=True).clamp(min=1)                               # [B, 1]
        mean = r.nan_to_num(0.0).sum(1, keepdim=True) / n                      # [B, 1]
        std = (((r - mean).nan_to_num(0.0) ** 2).sum(1, keepdim=True) / n).sqrt()  # [B, 1]
        return (r - mean) / (std + eps)                                        # [B, G]
    if tau is None:
        raise ValueError(f"advantages: the {kind!r} advantage needs the threshold tau")
    return r - tau                                                             # [B, G]


def world_advantages(r, kind: str, tau: float | None, M: int):
    """Group rewards r [B, G] -> one advantage per rollout world [B * M], scene-major as
    sample_rollouts orders them: each of the G groups' M / G rollouts shares its group's A."""
    return advantages(r, kind, tau).repeat_interleave(M // r.shape[1], 1).flatten()  # [B * M]


def mpo_loss(logp, logp_sft, adv, mask, beta: float) -> tuple:
    """MPO: mean over masked tokens of -A log pi + beta k3.

    logp [W, A, N] log pi_theta of the sampled tokens (with gradient), logp_sft [W, A, N] (no
    gradient), adv [W] one advantage per rollout world (NaN: an unscored set, left out like a
    masked token), mask [W, A, N]. Returns (loss, stats)."""
    ok = mask & ~adv.isnan()[:, None, None]                                    # [W, A, N]
    n = ok.sum().clamp(min=1)
    # zero the unused entries *before* the arithmetic: a NaN advantage or a -inf log-prob there
    # would otherwise turn the zero gradient of a masked product into NaN
    logp = torch.where(ok, logp, 0.0)                                          # [W, A, N]
    logp_sft = torch.where(ok, logp_sft.detach(), 0.0)                         # [W, A, N]
    pg = -(adv.nan_to_num(0.0)[:, None, None] * logp)                          # [W, A, N]
    kl = k3_kl(logp, logp_sft)                                                 # [W, A, N], 0 where not ok
    loss = ((pg + beta * kl) * ok).sum() / n
    stats = dict(kl=float((kl.detach() * ok).sum() / n), logp=float((logp.detach() * ok).sum() / n))
    return loss, stats


@torch.no_grad()
def vocab_stats(logq, logq_sft, mask) -> dict:
    """Exact KL(q || pi_sft) = sum_a q(a) log(q(a) / pi_sft(a)) and entropy of q over the
    vocabulary, averaged over the masked states: logq, logq_sft [W, A, N, K], mask [W, A, N]."""
    q = logq.exp()                                                             # [W, A, N, K]
    q_log_q = torch.special.xlogy(q, q)                                        # [W, A, N, K], 0 where q = 0
    kl = (q_log_q - q * logq_sft).sum(-1)                                      # [W, A, N]
    entropy = -q_log_q.sum(-1)                                                 # [W, A, N]
    n = mask.sum().clamp(min=1)
    return dict(kl_exact=float((kl * mask).sum() / n), entropy=float((entropy * mask).sum() / n))


# --------------------------------------------------------------------------------------------
# Rollouts and their rewards
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_rollouts(model, tok, scenes: Scenes, enc: dict, M: int, top_k: int, generator=None) -> tuple:
    """M closed-loop rollouts of each scene in one batch of W = B * M worlds (scene-major), sampled
    from policy_log_probs(., top_k): reference_model's top-k sampler at temperature 1, with k = K
    (every token) for top_k = 0. Returns (the repeated scenes, closed_loop's output: tokens,
    traj [W, A, 80, 3], controlled [W, A])."""
    was_training = model.training
    model.eval()
    k = top_k if top_k > 0 else model.cfg.K
    # the M worlds of a scene share its map and history: closed_loop computes those once per scene
    out = RM.closed_loop(model, tok, scenes, top_k=k, temperature=1.0, generator=generator, enc=enc, repeats=M)
    model.train(was_training)
    return scenes.repeat(M), out


@torch.no_grad()
def group_scores(scenes: Scenes, traj, G: int) -> dict:
    """WOSAC scores of G sets of rollouts per scene: traj [B, M, A, 80, 3] -> per-group metrics
    [B, G] (realism_meta, collision_rate, offroad_rate; NaN for a set with no scored agents)."""
    B, M = traj.shape[:2]
    sets = traj.unflatten(1, (G, M // G)).flatten(0, 1)                        # [B*G, M/G, A, 80, 3]
    z = scenes.z[:, None, :, NOW:NOW + 1].expand(-1, M // G, -1, T - NOW - 1)  # [B, M/G, A, 80]
    s = wm.score_rollouts(scenes.repeat(G), sets[..., :2], z.repeat_interleave(G, 0), sets[..., 2])
    return {k: s[k].view(B, G) for k in ("realism_meta", "collision_rate", "offroad_rate")}


def sequence_log_probs(model, scenes: Scenes, tokens: dict, top_k: int):
    """log q over the vocabulary at every executed state, by one teacher-forced causal pass:
    [W, A, N, K]."""
    return policy_log_probs(model(scenes, tokens), top_k)                      # [W, A, N, K]


def nanmean(x) -> float:
    """Mean of the non-NaN entries (NaN if none); over every rank's entries under torchrun."""
    if D.active():
        return D.nanmean(x)
    return float(x.nanmean()) if bool((~x.isnan()).any()) else math.nan


# --------------------------------------------------------------------------------------------
# One RFT step and the RFT loop
# --------------------------------------------------------------------------------------------
def rft_step(model, sft, tok, opt, scenes: Scenes, enc: dict, cfg: R1Config, tau: float | None,
             generator=None, where: str = "rft_step") -> dict:
    """Roll out, score, and take one gradient step of MPO (or a baseline, by cfg.advantage). A
    non-finite loss, k3 or gradient norm raises FloatingPointError naming `where` and the term,
    before the step (the weights stay as they were). Under torchrun each rank brings its own
    scenes: the loss is the mean over every rank's tokens (each rank divides by the all-ranks
    count), the gradients are summed over the ranks before the clip, and the statistics are over
    every rank's rollouts, so the step is the same as one process's on all the scenes (up to the
    sampled rollouts themselves)."""
    B, M, G = scenes.B, cfg.M, cfg.groups
    t0 = time.perf_counter()
    rep, out = sample_rollouts(model, tok, scenes, enc, M, cfg.rft_top_k, generator)
    t1 = time.perf_counter()
    score = group_scores(scenes, out["traj"].unflatten(0, (B, M)), G)         # [B, G] each
    r = score["realism_meta"]                                                  # [B, G], NaN: unscored set
    adv = world_advantages(r, cfg.advantage, tau, M)                          # [W] scene-major, as rep
    t2 = time.perf_counter()
    N = out["tokens"]["ids"].shape[-1]
    future = torch.arange(N, device=r.device) >= tok.n0                       # [N]
    mask = out["controlled"][..., None] & future & ~adv.isnan()[:, None, None]  # [W, A, N]
    n_tok = int(D.all_sum(float(mask.sum())))        # every rank's tokens
    beta = 0.0 if cfg.advantage == "reinforce" else cfg.beta
    model.eval()                                     # no dropout: the gradient is of the policy that sampled
    opt.zero_grad(set_to_none=True)
    tot = dict(loss=0.0, kl=0.0, logp=0.0, kl_exact=0.0, entropy=0.0)
    chunks = range(0, B * M, cfg.chunk_worlds) if n_tok else ()   # chunks bound memory; gradients add up
    for w0 in chunks:
        sl = slice(w0, w0 + cfg.chunk_worlds)
        sub, tokens = rep.select(sl), {k: v[sl] for k, v in out["tokens"].items()}
        logq = sequence_log_probs(model, sub, tokens, cfg.rft_top_k)          # [w, A, N, K]
        with torch.no_grad():
            logq_sft = sequence_log_probs(sft, sub, tokens, 0)                 # [w, A, N, K] pi_sft, full
        ids = tokens["ids"][..., None]                                         # [w, A, N, 1]
        logp, logp_sft = logq.gather(-1, ids).squeeze(-1), logq_sft.gather(-1, ids).squeeze(-1)  # [w, A, N]
        loss, stats = mpo_loss(logp, logp_sft, adv[sl], mask[sl], beta)
        check_finite(dict(k3=stats["kl"], mpo_loss=loss.detach()),
                     f"{where}, worlds {w0}..{w0 + sub.B - 1}")
        share = float(mask[sl].sum()) / n_tok        # chunk means, weighted to the mean over all tokens
        (loss * share).backward()
        for k, v in dict(loss=loss.item(), **stats, **vocab_stats(logq.detach(), logq_sft, mask[sl])).items():
            tot[k] += v * share
    if n_tok > 0:                                    # every set unscored: no step at all, not a zero one
        D.all_reduce_grads(model.parameters())
        tot = dict(zip(tot, D.all_sum(list(tot.values()))))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        check_finite(grad_norm, f"{where}: the gradient norm")             # before the step, not after
        opt.step()
    else:
        grad_norm, tot = 0.0, {k: math.nan for k in tot}
    return dict(reward=nanmean(r), n_nan_groups=int(D.all_sum(float(r.isnan().sum()))),
                adv_mean=nanmean(adv), adv_pos=D.all_mean(float((adv > 0).float().mean())),
                collision=nanmean(score["collision_rate"]),
                offroad=nanmean(score["offroad_rate"]), grad_norm=grad_norm, rollout_s=t1 - t0,
                score_s=t2 - t1, update_s=time.perf_counter() - t2, **tot)


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
    training scenes with the RFT rollout settings (the same M, G and policy, since the metric
    depends on the set size). Scenes differ in difficulty far more than rollouts do, so a small
    or fixed subset can put tau well above or below the mean reward of the RFT batches."""
    rewards = []
    n = min(cfg.tau_scenes, n_train)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + 99_991)
    order = torch.randperm(n_train, generator=gen)[:n]                         # [n]
    for b0 in range(0, n, cfg.scenes_per_step):
        idx = D.shard(order[b0:b0 + cfg.scenes_per_step])                     # this rank's scenes
        scenes, enc = get_batch(idx)
        gen = torch.Generator(device=scenes.device).manual_seed(cfg.seed * 1_000_003 + 999_999 - b0
                                                                + 500_009 * D.rank())
        _, out = sample_rollouts(model, tok, scenes, enc, cfg.M, cfg.rft_top_k, gen)
        traj = out["traj"].unflatten(0, (scenes.B, cfg.M))                     # [b, M, A, 80, 3]
        rewards.append(group_scores(scenes, traj, cfg.groups)["realism_meta"].flatten())  # [b * G]
    tau = nanmean(torch.cat(rewards))
    if math.isnan(tau):
        raise ValueError(f"measure_tau: none of the {n} training scenes has a scored agent; set R1Config.tau")
    return tau


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
    bar = tqdm(range(start_step, cfg.rft_steps), desc=f"RFT ({cfg.advantage})", leave=False,
               disable=not (progress and D.is_writer()))
    for step in bar:       # under torchrun each rank rolls out its shard of the step's scenes
        scenes, enc = get_batch(D.shard(step_scenes(step, cfg.scenes_per_step, n_train, cfg.seed)))
        seed = cfg.seed * 1_000_003 + step + 500_009 * D.rank()               # each rank its own draws
        gen = torch.Generator(device=scenes.device).manual_seed(seed)
        h = rft_step(model, sft, tok, opt, scenes, enc, cfg, tau, gen,
                     where=f"RFT ({cfg.advantage}) step {step + 1}")
        history.append(dict(step=step + 1, **h))
        bar.set_postfix(r=f"{h['reward']:.3f}", kl=f"{h['kl_exact']:.4f}", H=f"{h['entropy']:.2f}")
        if save_fn is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.rft_steps):
            save_fn(step + 1, history)
    return history


# --------------------------------------------------------------------------------------------
# Results across seeds
# --------------------------------------------------------------------------------------------
