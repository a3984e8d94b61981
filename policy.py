"""The decentralized SPACeR policy pi_theta(a | o) and V(o): GPUDrive's late-fusion MLP.

The ego, the partners and the road points each go through Linear-LayerNorm-Tanh-Linear (width 64);
partners and road points are max-pooled over their masks; the three embeddings are concatenated,
mapped to the hidden layer (Linear-Tanh) and read by an actor (one head per agent type) and a
critic. ppo_anchor.py describes the choices; this file holds the network and its one trick:

Max pooling sends gradient only to the winners. pooled[s, d] = max_p y[s, p, d] depends on one
set element per channel, so every element that wins no channel contributes exactly zero to every
weight gradient. With a gradient to take (the PPO update), `pooled_embed` therefore
    1. runs the embedding over all P elements without autograd (no saved activations, in place)
       and marks the winners: the valid elements that are the max of at least one channel;
    2. runs it again, with autograd, over the winners only (about 20 of the 64 road points of a
       sample, 8 of its 16 partner slots) and takes each channel's value from its winner's row.
The value is the same function of the same rows; the weight gradients are the same sums without
their zero terms. (amax splits a tie's gradient among the tied elements, this gives it all to the
first: the same weight gradient, because only identical inputs tie and they make identical
activations.) tests/test_speed_equivalence.py compares it with the plain masked max.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from env import EGO_DIM, PARTNER_DIM, ROAD_DIM

N_TYPES = 3                  # vehicle, pedestrian, cyclist


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class InputLinear(nn.Linear):
    """nn.Linear (same function and parameters) for a narrow input of ~10 raw features: with W^T
    contiguous, autograd forms the weight gradient as x^T g instead of g^T x, which MKL runs several
    times slower at N = 32k rows; it was the PPO update's costliest matmul (README, speed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight.t().contiguous())  # [N, d]
        return y.view(*x.shape[:-1], self.out_features)                           # [..., d]


def embed_mlp(d_in: int, d: int) -> nn.Sequential:
    first = layer_init(InputLinear(d_in, d))
    return nn.Sequential(first, nn.LayerNorm(d), nn.Tanh(), layer_init(nn.Linear(d, d)))


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the set dim of x [..., P, D] where mask [..., P]; an empty set gives zeros. amax, not
    max().values: the same values without the costly arg-max indices (its gradient splits only among
    exact ties, which only identical inputs produce). The definition `pooled_embed` computes."""
    pooled = x.masked_fill(~mask.unsqueeze(-1), -1e9).amax(-2)                 # [..., D]
    return torch.where(mask.any(-1, keepdim=True), pooled, torch.zeros_like(pooled))


WINNER_CHUNK = 128  # samples per no-grad pass in winners_max: [128, 64, 64] floats stay in L2 cache


@torch.no_grad()
def first_max(net: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """p*(s, d), the first valid element p where net(x)[s, p, d] is the channel's max over the set:
    x [S, P, F], mask [S, P] -> [S, D] (some p of an empty set: its pooled value is zeroed).
    From amax alone (an arg-max over P is 30x slower): is_max * (P - p) peaks at the first max."""
    P = x.shape[1]
    y = net(x)                                                                    # [S, P, D]
    y.masked_fill_(~mask.unsqueeze(-1), float("-inf"))
    is_max = y.eq_(y.amax(-2, keepdim=True))                                      # [S, P, D] 1.0 / 0.0
    first = is_max.mul_(torch.arange(P, 0, -1, dtype=y.dtype, device=y.device).unsqueeze(1))  # [S, P, D]
    return (P - first.amax(-2)).long().clamp_(max=P - 1)  # [S, D]; clamp: a NaN channel has no max


def winners_max(net: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_max(net(x), mask) with autograd through the winning set elements only (docstring)."""
    lead, (P, F) = x.shape[:-2], x.shape[-2:]
    x, mask = x.reshape(-1, P, F), mask.reshape(-1, P)                            # [S, P, F], [S, P]
    S = x.shape[0]
    with torch.no_grad():
        p_star = torch.cat([first_max(net, x[i:i + WINNER_CHUNK], mask[i:i + WINNER_CHUNK])
                            for i in range(0, S, WINNER_CHUNK)])                  # [S, D]
        winner = torch.zeros_like(mask).scatter_(1, p_star, True).view(-1)        # [S * P]
        rows = winner.nonzero().squeeze(1)                                        # [R] distinct winners
        where = (winner.cumsum(0) - 1).view(S, P).gather(1, p_star)               # [S, D] into rows
    y_rows = net(x.reshape(S * P, F).index_select(0, rows))                       # [R, D] with autograd
    pooled = y_rows.gather(0, where)                                              # [S, D] y[s, p*, d]
    pooled = torch.where(mask.any(-1, keepdim=True), pooled, torch.zeros_like(pooled))  # [S, D]
    return pooled.view(*lead, pooled.shape[-1])                                   # [..., D]


def pooled_embed(net: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_max(net(x), mask): x [..., P, F], mask [..., P] -> [..., D]. Without autograd (rollouts)
    one pass masked in place; with it, `winners_max`."""
    if torch.is_grad_enabled():
        return winners_max(net, x, mask)
    y = net(x)                                                                    # [..., P, D] fresh
    pooled = y.masked_fill_(~mask.unsqueeze(-1), -1e9).amax(-2)                   # [..., D]
    return torch.where(mask.any(-1, keepdim=True), pooled, torch.zeros_like(pooled))


class LateFusionPolicy(nn.Module):
    """pi(a | o) over the K tokens of the agent's type, and V(o)."""

    def __init__(self, K: int, embed: int = 64, hidden: int = 64, type_heads: bool = True):
        super().__init__()
        self.K, self.n_heads = K, N_TYPES if type_heads else 1
        self.ego_net = embed_mlp(EGO_DIM, embed)
        self.partner_net = embed_mlp(PARTNER_DIM, embed)
        self.road_net = embed_mlp(ROAD_DIM, embed)
        self.shared = nn.Sequential(layer_init(nn.Linear(3 * embed, hidden)), nn.Tanh())
        self.actor = layer_init(nn.Linear(hidden, self.n_heads * K), std=0.01)  # near-uniform start
        self.critic = layer_init(nn.Linear(hidden, 1), std=1.0)

    def forward(self, obs: dict, agent_type: torch.Tensor) -> tuple:
        """obs tensors with leading dims [...] (e.g. [B, A]), agent_type [...] ->
        (logits [..., K], value [...])."""
        ego = self.ego_net(obs["ego"])                                            # [..., D]
        partners = pooled_embed(self.partner_net, obs["partners"], obs["partner_mask"])  # [..., D]
        road = pooled_embed(self.road_net, obs["road"], obs["road_mask"])         # [..., D]
        h = self.shared(torch.cat([ego, partners, road], -1))                     # [..., H]
        heads = self.actor(h).unflatten(-1, (self.n_heads, self.K))               # [..., heads, K]
        head = (agent_type.clamp(0, self.n_heads - 1) if self.n_heads > 1
                else torch.zeros_like(agent_type))                                # [...]
        pick = head[..., None, None].expand(*head.shape, 1, self.K)               # [..., 1, K]
        logits = heads.gather(-2, pick).squeeze(-2)                               # [..., K]
        return logits, self.critic(h).squeeze(-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
