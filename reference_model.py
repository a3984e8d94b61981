"""The centralized next-token reference model (SMART-style): behaviour cloning, CAT-K closed-loop
SFT and batched closed-loop rollout.

Model. Every agent i of a scene moves by one motion token a_n^i per token step n (tokenizer.py).
A causal transformer predicts the next token of every agent from the scene context c (the map)
and everything executed so far, factorized across agents (SMART; SPACeR's reference):

    p(a_n | a_<n, c) = prod_i p(a_n^i | a_<n, c)

The input of agent i at step n is the token it executed to reach boundary n (embedded from the
token's motion, the agent's type and size) placed at its pose at boundary n. Each of the L layers
runs three attentions, each pre-LayerNorm with a residual and a feed-forward:
  1. temporal: the agent over its own last `window` steps (causal);
  2. map -> agent: the `map_neighbours` nearest map tokens (5 m pieces of polylines) within radius;
  3. agent <-> agent: the `agent_neighbours` nearest other agents at the same step within radius.
No absolute coordinate enters the network. An edge from a sender pose to a receiver pose is
described in the receiver's frame by r = (distance, bearing, relative heading [, time gap]),
embedded by Fourier features and an MLP, and added to the keys and values (QCNet / SMART):

    attn(x_i) = sum_j softmax_j(q_i . (k_j + r_ij) / sqrt(d)) (v_j + r_ij)

Everything is batched over [B, A, N]: an agent's neighbours are gathered into a fixed number of
candidates C with a mask, so attention is a masked softmax over [..., C].

Behaviour cloning. Next-token cross-entropy on the rolling-matched log tokens, label smoothing
eps = 0.1, over every (agent, step) whose target token is valid:

    L_BC = -mean_{i,n} [ (1 - eps) log p(a*_n^i) + eps / K sum_k log p(k) ]

Query for SPACeR. Because the model is causal, one teacher-forced pass over an executed token
sequence returns log p_ref(. | s_n) for every agent and step at once (`log_p_ref`).

Rollout. Autoregressive and closed-loop from the history (boundary n0 = 10 // spt): every
controlled agent samples its next token from the top-k at a temperature, all agents and R
rollouts per scene at once; agents that are not controlled follow their logged tokens. Each step
only computes the new token step: the temporal keys and values of the last `window - 1` steps are
cached per layer (a KV cache), which gives exactly the teacher-forced distributions.

CAT-K closed-loop SFT (Zhang et al. 2025; smart_r1.md section 3). Roll the model out; at each
step a controlled agent executes, among its top-k tokens, the one that minimises
d(box after the token, logged box at the next boundary) (d: mean corner distance; agents
without a logged next box take the most likely token). The choice is detached. The target at
each rolled-out step is the "recovery" token: over the whole vocabulary, the one whose box from
the *rolled-out* pose lands closest to the logged next box. Cross-entropy (no smoothing) on these
targets through one teacher-forced pass over the rolled-out sequence (the same graph as keeping
the logits of the rollout, because the choices are detached).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scenes import NOW, T, Scenes, apply_local, read_file, save_atomic, wrap_angle
from tokenizer import MotionTokenizer, box_lw, corner_distance, corners_at, log_poses


@dataclass
class ReferenceConfig:
    K: int = 200                  # tokens per agent type (must match the tokenizer)
    steps_per_token: int = 2      # 0.1 s steps per token (must match the tokenizer)
    D: int = 64                   # hidden size
    heads: int = 4                # attention heads (must divide D)
    layers: int = 2               # agent layers, each temporal -> map -> agent attention
    dropout: float = 0.1          # dropout on attention and feed-forward outputs
    window: int = 4               # temporal attention span in token steps (the current one included)
    map_neighbours: int = 10      # nearest map tokens each agent attends to
    map_radius: float = 30.0      # m, map tokens farther than this are masked
    agent_neighbours: int = 6     # nearest other agents each agent attends to at the same step
    agent_radius: float = 40.0    # m, agents farther than this are masked
    map_token_len: float = 5.0    # m, polylines are cut into map tokens of about this length
    harmonics: int = 4            # angle harmonics k = 1..harmonics in the relative pose features


# --------------------------------------------------------------------------------------------
# Geometry: map tokens, relative pose features, nearest neighbours
# --------------------------------------------------------------------------------------------
def map_tokens(scenes: Scenes, length: float) -> dict:
    """Cut every polyline into pieces of about `length` metres of arc (SMART's 5 m map tokens).

    WOMD polylines come as ~0.5 m segments (toy ones as <= 2 m). A segment belongs to piece
    floor(s / length), s the arc length at its start along its polyline; a piece keeps the chord
    from its first segment's start to its last segment's end. Segments of a polyline are contiguous and in
    order (scenes.py), so running arc lengths and piece ids come from cumulative sums, with no loop over
    polylines.
    Returns pose [B, M, 3] (chord midpoint, chord heading), length [B, M], type [B, M], valid [B, M].
    """
    ok = scenes.seg_valid                                                    # [B, S]
    a, b = scenes.seg_start[..., :2], scenes.seg_end[..., :2]                # [B, S, 2]
    B, S = ok.shape
    seg_len = (b - a).norm(dim=-1) * ok                                      # [B, S]
    poly = torch.where(ok, scenes.seg_poly, torch.full_like(scenes.seg_poly, -1))  # [B, S]
    first = ok & (poly != F.pad(poly, (1, 0), value=-2)[:, :-1])            # [B, S] a polyline starts here
    before = seg_len.cumsum(-1) - seg_len                              # [B, S] arc length before each segment
    poly_start = torch.where(first, before, torch.zeros_like(before)).cummax(-1).values  # [B, S]
    piece = ((before - poly_start) / length).floor().long()           # [B, S] piece index within its polyline
    new = ok & (first | (piece != F.pad(piece, (1, 0), value=-1)[:, :-1]))  # [B, S] a map token starts here
    tid = new.long().cumsum(-1) - 1                                          # [B, S]
    M = max(int(tid.max()) + 1 if S else 1, 1)
    tid = torch.where(ok, tid.clamp(min=0), torch.full_like(tid, M))    # [B, S] padding goes to a dump slot M
    idx = torch.arange(S, device=ok.device).expand(B, S)                     # [B, S]
    first_seg = torch.full((B, M + 1), S, device=ok.device).scatter_reduce(1, tid, idx, "amin")[:, :M]
                                                                             # [B, M]
    last_seg = torch.full((B, M + 1), -1, device=ok.device).scatter_reduce(1, tid, idx, "amax")[:, :M]
                                                                             # [B, M]
    valid = last_seg >= 0                                                    # [B, M]
    p0 = a.gather(1, first_seg.clamp(0, max(S - 1, 0))[..., None].expand(B, M, 2))  # [B, M, 2]
    p1 = b.gather(1, last_seg.clamp(0, max(S - 1, 0))[..., None].expand(B, M, 2))   # [B, M, 2]
    chord = p1 - p0                                                          # [B, M, 2]
    pose = torch.cat([0.5 * (p0 + p1), torch.atan2(chord[..., 1], chord[..., 0])[..., None]], -1)  # [B, M, 3]
    kind = scenes.seg_type.gather(1, first_seg.clamp(0, max(S - 1, 0)))      # [B, M]
    return dict(pose=pose * valid[..., None], length=chord.norm(dim=-1) * valid, type=kind * valid,
                valid=valid)


def relative_pose(recv: torch.Tensor, send: torch.Tensor) -> tuple:
    """The sender seen from the receiver: recv, send [..., 3] -> (distance, bearing, heading) [...] each."""
    d = send[..., :2] - recv[..., :2]                                        # [..., 2]
    c, s = torch.cos(recv[..., 2]), torch.sin(recv[..., 2])                  # [...]
    lx, ly = c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]  # [...] in the receiver's frame
    return torch.hypot(lx, ly), torch.atan2(ly, lx), wrap_angle(send[..., 2] - recv[..., 2])


WAVELENGTHS = (1.0, 3.0, 10.0, 30.0, 100.0)   # m, Fourier wavelengths of the distance


def pose_features(recv: torch.Tensor, send: torch.Tensor, harmonics: int) -> torch.Tensor:
    """Fourier features of (distance, bearing, relative heading): [..., 3] x2 -> [..., F].
    Angles by their harmonics cos(k theta), sin(k theta), which are smooth across +-pi."""
    dist, bearing, heading = relative_pose(recv, send)                       # [...] each
    k = torch.arange(1, harmonics + 1, device=recv.device, dtype=recv.dtype)  # [H]
    ang = torch.stack([bearing, heading], -1)[..., None] * k                 # [..., 2, H]
    lam = torch.tensor(WAVELENGTHS, device=recv.device, dtype=recv.dtype)   # [W]
    phase = 2 * math.pi * dist[..., None] / lam                              # [..., W]
    return torch.cat([ang.cos().flatten(-2), ang.sin().flatten(-2), phase.cos(), phase.sin(),
                      torch.log1p(dist)[..., None]], -1)                     # [..., F]


def n_pose_features(harmonics: int) -> int:
    return 4 * harmonics + 2 * len(WAVELENGTHS) + 1


def nearest(query: torch.Tensor, keys: torch.Tensor, key_ok: torch.Tensor, k: int, radius: float) -> tuple:
    """The k nearest valid keys of every query within radius: query [B, Q, 2], keys [B, M, 2],
    key_ok [B, M] -> (idx [B, Q, C], ok [B, Q, C]). Chunked over Q so [B, Q, M] never gets huge."""
    B, Q, M = query.shape[0], query.shape[1], keys.shape[1]
    C = min(k, M)
    step = max(1, (1 << 24) // max(1, B * M))
    idx, ok = [], []
    for q0 in range(0, Q, step):                     # chunks of queries, not a loop over agents
        d = torch.cdist(query[:, q0:q0 + step], keys)                       # [B, Qc, M]
        d = d.masked_fill(~key_ok[:, None], float("inf"))                    # [B, Qc, M]
        dist, i = d.topk(C, dim=-1, largest=False)                           # [B, Qc, C]
        idx.append(i)
        ok.append(dist <= radius)
    return torch.cat(idx, 1), torch.cat(ok, 1)                              # [B, Q, C] each


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class RelEmbed(nn.Module):
    """Relative pose features (+ extras such as the time gap) -> D, shared by all layers."""

    def __init__(self, n_in: int, D: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_in, D), nn.ReLU(), nn.Linear(D, D), nn.LayerNorm(D))

    def forward(self, f):
        return self.mlp(f)


class AttentionBlock(nn.Module):
    """Pre-LN attention of a query over C gathered candidates with relative embeddings added to
    keys and values, then a pre-LN feed-forward; both residual."""
    SDPA_FROM = 9   # candidates from which SDPA beats the plain softmax (one query, CPU, D = 64)

    def __init__(self, D: int, heads: int, dropout: float):
        super().__init__()
        self.h = heads
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.kv, self.out = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.ff = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))
        self.drop = nn.Dropout(dropout)

    def keys_values(self, src):
        """Project senders once, before they are gathered: src [..., D] -> contiguous (k, v) [..., D]."""
        k, v = self.kv(self.norm_kv(src)).chunk(2, dim=-1)
        return k.contiguous(), v.contiguous()

    def forward(self, x, k, v, r, mask):
        """x [..., D] queries; k, v, r [..., C, D]; mask [..., C] -> [..., D]: a batch of one-query
        attentions. For few candidates (temporal, agents) a plain masked softmax is twice as fast on a CPU
        as SDPA's kernel, which wins from SDPA_FROM on (the map); same result (tests/test_reference_speed)."""
        D, C = x.shape[-1], k.shape[-2]
        H, dh = self.h, D // self.h
        q = self.q(self.norm_q(x)).reshape(-1, 1, H, dh)                     # [X, 1, H, dh]
        k, v = (k + r).reshape(-1, C, H, dh), (v + r).reshape(-1, C, H, dh)  # [X, C, H, dh] each
        seen = mask.any(-1, keepdim=True)                                    # [..., 1]
        if C < self.SDPA_FROM:             # a finite floor, not -inf: a row with nothing visible stays finite
            s = (q * k).sum(-1) * dh ** -0.5                                   # [X, C, H]
            s = s.masked_fill(~mask.reshape(-1, C, 1), torch.finfo(s.dtype).min)  # [X, C, H]
            msg = (s.softmax(1)[..., None] * v).sum(1)                         # [X, H, dh]
        else:
            mask = mask | ~seen & (torch.arange(C, device=mask.device) == 0)  # never a row with none visible
            msg = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask.reshape(-1, 1, 1, C))  # [X, H, 1, dh]
        msg = msg.reshape(x.shape) * seen                              # [..., D] zero when nothing is visible
        x = x + self.drop(self.out(msg))
        return x + self.drop(self.ff(self.norm_ff(x)))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class ReferenceModel(nn.Module):
    """Next-token transformer over [B, A, N] agent tokens. `table` [3, K, spt, 3] is the
    tokenizer's vocabulary (local x, y, yaw of every step of every token), used to embed motion."""

    def __init__(self, cfg: ReferenceConfig, table: torch.Tensor):
        super().__init__()
        if tuple(table.shape) != (3, cfg.K, cfg.steps_per_token, 3):
            raise ValueError(f"ReferenceModel: token table shape {tuple(table.shape)} does not match "
                             f"ReferenceConfig K={cfg.K}, steps_per_token={cfg.steps_per_token}")
        if cfg.window < 2:
            raise ValueError(f"ReferenceConfig: window={cfg.window} must be at least 2 "
                             "(the current step and one before)")
        if cfg.D % cfg.heads:
            raise ValueError(f"ReferenceConfig: D={cfg.D} must be a multiple of heads={cfg.heads}")
        self.cfg = cfg
        D, spt = cfg.D, cfg.steps_per_token
        self.register_buffer("table", table.float().clone(), persistent=False)  # [3, K, spt, 3]
        # agent token embedding: motion of the executed token, type, size
        self.motion = nn.Sequential(nn.Linear(4 * spt, D), nn.ReLU(), nn.Linear(D, D))
        self.no_motion = nn.Parameter(torch.zeros(D))        # the previous token is unknown
        self.type_emb = nn.Embedding(3, D)
        self.size_emb = nn.Linear(2, D)
        # map token embedding: length and type, in the token's own frame
        self.map_len = nn.Linear(1, D)
        self.map_type = nn.Embedding(5, D)
        self.map_mlp = nn.Sequential(nn.ReLU(), nn.Linear(D, D))
        # relative pose embeddings, one per edge kind, shared by the layers
        n_f = n_pose_features(cfg.harmonics)
        self.rel_time = RelEmbed(n_f + cfg.window, D)
        self.rel_map = RelEmbed(n_f, D)
        self.rel_agent = RelEmbed(n_f, D)
        self.blocks = nn.ModuleList(nn.ModuleList(AttentionBlock(D, cfg.heads, cfg.dropout) for _ in range(3))
                                    for _ in range(cfg.layers))
        # output: a shared trunk, then one K-way linear layer per agent type
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.ReLU())
        # [3, K, D] as nn.Linear
        self.head_w = nn.Parameter(torch.empty(3, cfg.K, D).uniform_(-D ** -0.5, D ** -0.5))
        self.head_b = nn.Parameter(torch.zeros(3, cfg.K))                      # [3, K]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- inputs --------------------------------------------------------------------------
    def embed_agents(self, scenes: Scenes, prev_ids, prev_valid):
        """The token executed to reach each boundary: prev_ids, prev_valid [B, A, N'] -> [B, A, N', D]."""
        kind = scenes.agent_type[..., None].expand_as(prev_ids)                # [B, A, N']
        local = self.table[kind, prev_ids]                                     # [B, A, N', spt, 3]
        spt = local.shape[-2]
        f = torch.cat([local[..., :2] / spt, local[..., 2:].cos(), local[..., 2:].sin()], -1)
                                                                               # [B, A, N', spt, 4]
        m = torch.where(prev_valid[..., None], self.motion(f.flatten(-2)), self.no_motion)   # [B, A, N', D]
        size = scenes.size[..., :2] / torch.tensor([5.0, 2.0], device=scenes.size.device)    # [B, A, 2]
        return m + (self.type_emb(scenes.agent_type) + self.size_emb(size))[:, :, None]     # [B, A, N', D]

    def context(self, scenes: Scenes) -> dict:
        """Scene context computed once per batch: map tokens and their keys/values for every layer."""
        mt = map_tokens(scenes, self.cfg.map_token_len)
        emb = self.map_mlp(self.map_len(mt["length"][..., None] / self.cfg.map_token_len)
                           + self.map_type(mt["type"]))                          # [B, M, D]
        kv = [blocks[1].keys_values(emb) for blocks in self.blocks]             # L x ([B, M, D], [B, M, D])
        return dict(map_pose=mt["pose"], map_valid=mt["valid"], map_kv=kv)

    def empty_past(self, B: int, A: int, device) -> dict:
        """KV cache with nothing in it: W - 1 invalid steps before the first token step."""
        W1, D = self.cfg.window - 1, self.cfg.D
        z = torch.zeros(B, A, W1, D, device=device)                             # [B, A, W-1, D]
        return dict(pose=torch.zeros(B, A, W1, 3, device=device),              # [B, A, W-1, 3]
                    valid=torch.zeros(B, A, W1, dtype=torch.bool, device=device),  # [B, A, W-1]
                    kv=[(z, z) for _ in range(self.cfg.layers)])

    # ---- the transformer -----------------------------------------------------------------
    def run(self, ctx: dict, x, pose, valid, past: dict) -> tuple:
        """Advance N' new token steps given the cache of the previous W - 1.

        x [B, A, N', D] input embeddings, pose [B, A, N', 3] poses at those boundaries, valid
        [B, A, N']. Returns (hidden [B, A, N', D], new cache)."""
        cfg = self.cfg
        B, A, Nn, _ = x.shape
        W, dev = cfg.window, x.device
        bi = torch.arange(B, device=dev)

        # temporal edges: the last W steps of the same agent (itself included)
        pose_all = torch.cat([past["pose"], pose], 2)                          # [B, A, W-1+N', 3]
        valid_all = torch.cat([past["valid"], valid], 2)                       # [B, A, W-1+N']
        send_t = pose_all.unfold(2, W, 1).transpose(-1, -2)                   # [B, A, N', W, 3]
        ok_t = valid_all.unfold(2, W, 1)                                      # [B, A, N', W]
        gap = torch.eye(W, device=dev).flip(0).expand(B, A, Nn, W, W)      # [B, A, N', W, W] one-hot of W-1-w
        f_t = torch.cat([pose_features(pose[..., None, :], send_t, cfg.harmonics), gap], -1)
                                                                               # [B, A, N', W, F]
        r_t = self.rel_time(f_t)                                               # [B, A, N', W, D]

        # map -> agent edges: nearest map tokens
        idx_m, ok_m = nearest(pose[..., :2].reshape(B, A * Nn, 2), ctx["map_pose"][..., :2], ctx["map_valid"],
                              cfg.map_neighbours, cfg.map_radius)             # [B, A*N', C] each
        idx_m, ok_m = idx_m.view(B, A, Nn, -1), ok_m.view(B, A, Nn, -1) & valid[..., None]  # [B, A, N', C]
        # [B*A*N'*C] rows of [B*M]
        flat_m = (idx_m + (bi * ctx["map_pose"].shape[1]).view(B, 1, 1, 1)).flatten()
        # [B, M, F] -> [B, A, N', C, F]
        gather_m = lambda z: z.flatten(0, 1).index_select(0, flat_m).view(*idx_m.shape, -1)
        send_m = gather_m(ctx["map_pose"])                                     # [B, A, N', C, 3]
        r_m = self.rel_map(pose_features(pose[..., None, :], send_m, cfg.harmonics))  # [B, A, N', C, D]

        # agent <-> agent edges at the same step: nearest other valid agents
        pose_n = pose.transpose(1, 2)                                          # [B, N', A, 3]
        valid_n = valid.transpose(1, 2)                                        # [B, N', A]
        d = torch.cdist(pose_n[..., :2], pose_n[..., :2])                      # [B, N', A, A]
        eye = torch.eye(A, dtype=torch.bool, device=dev)                       # [A, A]
        d = d.masked_fill(eye | ~valid_n[:, :, None, :], float("inf"))
        dist_a, idx_a = d.topk(min(cfg.agent_neighbours, A), dim=-1, largest=False)  # [B, N', A, C]
        ok_a = (dist_a <= cfg.agent_radius) & valid_n[..., None]               # [B, N', A, C]
        # rows of [B*N'*A]
        flat_a = (idx_a + A * torch.arange(B * Nn, device=dev).view(B, Nn, 1, 1)).flatten()
        # [B, N', A, F] -> [B, N', A, C, F]
        gather_a = lambda z: z.flatten(0, 2).index_select(0, flat_a).view(*idx_a.shape, -1)
        send_a = gather_a(pose_n)                                              # [B, N', A, C, 3]
        r_a = self.rel_agent(pose_features(pose_n[..., None, :], send_a, cfg.harmonics))  # [B, N', A, C, D]

        new_kv = []
        window = lambda z: z.unfold(2, W, 1).transpose(-1, -2)         # [B, A, W-1+N', D] -> [B, A, N', W, D]
        for (temporal, to_map, to_agent), (map_k, map_v), (past_k, past_v) in zip(self.blocks, ctx["map_kv"],
                                                                                  past["kv"]):
            k, v = temporal.keys_values(x)                                     # [B, A, N', D] each
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)        # [B, A, W-1+N', D] each
            new_kv.append((k[:, :, -(W - 1):], v[:, :, -(W - 1):]))
            x = temporal(x, window(k), window(v), r_t, ok_t)                   # [B, A, N', D]
            x = to_map(x, gather_m(map_k), gather_m(map_v), r_m, ok_m)         # [B, A, N', D]
            xn = x.transpose(1, 2)                                             # [B, N', A, D]
            k, v = to_agent.keys_values(xn)                                    # [B, N', A, D] each
            xn = to_agent(xn, gather_a(k), gather_a(v), r_a, ok_a)             # [B, N', A, D]
            x = xn.transpose(1, 2)                                             # [B, A, N', D]
        new_past = dict(pose=pose_all[:, :, -(W - 1):], valid=valid_all[:, :, -(W - 1):], kv=new_kv)
        return x, new_past

    def logits(self, h, agent_type):
        """Hidden [B, A, N', D] -> logits over the agent's own type's K tokens [B, A, N', K]
        (each agent uses only its type's output layer, so no logits of other types are computed).
        The agents of each type go through their layer together: gathering a [K, D] weight per
        agent instead ([B, A, K, D], hundreds of MB at 256 worlds) cost 15 % of a rollout step
        (/work/notes/profile_before.md). The loop is over the 3 types, not over agents."""
        x = self.head(h).flatten(0, 1)                                         # [B*A, N', D]
        kind = agent_type.clamp(0, 2).flatten()                                # [B*A]
        out = x.new_empty(x.shape[:2] + (self.cfg.K,))                  # [B*A, N', K] all rows set below
        for c in range(3):
            rows = (kind == c).nonzero().squeeze(1)                            # [n_c]
            out.index_copy_(0, rows, x.index_select(0, rows) @ self.head_w[c].t() + self.head_b[c])
        return out.unflatten(0, h.shape[:2])                                   # [B, A, N', K]

    def step(self, ctx, scenes, prev_ids, prev_valid, pose, valid, past) -> tuple:
        """N' new token steps: logits [B, A, N', K] and the updated cache."""
        x = self.embed_agents(scenes, prev_ids, prev_valid)                    # [B, A, N', D]
        h, past = self.run(ctx, x, pose, valid, past)
        return self.logits(h, scenes.agent_type), past

    def forward(self, scenes: Scenes, tokens: dict):
        """Teacher-forced causal pass. tokens: ids [B, A, N], id_valid [B, A, N], pose
        [B, A, N + 1, 3], pose_valid [B, A, N + 1] (tokenizer.encode's layout). Position n sees
        the token that reached boundary n and predicts token n: logits [B, A, N, K]."""
        ids, id_valid = tokens["ids"], tokens["id_valid"]
        B, A, N = ids.shape
        prev_ids = F.pad(ids[..., :-1], (1, 0))                                # [B, A, N]
        prev_valid = F.pad(id_valid[..., :-1], (1, 0))                         # [B, A, N]
        past = self.empty_past(B, A, ids.device)
        logits, _ = self.step(self.context(scenes), scenes, prev_ids, prev_valid,
                              tokens["pose"][:, :, :N], tokens["pose_valid"][:, :, :N], past)
        return logits


def poses_from_ids(tok: MotionTokenizer, scenes: Scenes, ids, id_valid, enc: dict | None = None) -> tuple:
    """Poses at the token boundaries reached by executing `ids`, exactly as env.py does.

    Each valid token moves its agent from its pose at boundary n to boundary n + 1; where the
    previous token is invalid the agent sits at its log pose (tok.encode's re-anchoring), and at
    n0 every agent starts from its log pose at step 10, as the simulator does. Agents that follow
    their logged tokens therefore get exactly tok.encode's poses. ids, id_valid [B, A, N] ->
    (pose [B, A, N + 1, 3], pose_valid [B, A, N + 1]). enc: tok.encode(scenes), if already known."""
    log = tok.encode(scenes) if enc is None else enc
    pose = log["pose"].clone()                                                 # [B, A, N + 1, 3]
    pose_valid = log["pose_valid"] | F.pad(id_valid, (1, 0))                   # [B, A, N + 1]
    for n in range(ids.shape[-1]):
        nxt = tok.step_pose(pose[:, :, n], ids[..., n], scenes.agent_type)[..., -1, :]  # [B, A, 3]
        keep_log = ~id_valid[..., n] | ((n + 1 == tok.n0) & log["pose_valid"][:, :, n + 1])  # [B, A]
        pose[:, :, n + 1] = torch.where(keep_log[..., None], log["pose"][:, :, n + 1], nxt)
    return pose, pose_valid


def log_p_ref(model: ReferenceModel, tok: MotionTokenizer, scenes: Scenes, ids, id_valid,
              pose=None, pose_valid=None, enc: dict | None = None):
    """SPACeR's query: log p_ref(. | s_n) for every agent and token step in one causal pass.

    ids, id_valid [B, A, N]: the executed tokens (history from the log, then the rollout's).
    Boundary poses default to those the tokens reach (`poses_from_ids`, which re-encodes the log
    unless `enc` = tok.encode(scenes) is given); pass pose [B, A, N + 1, 3] / pose_valid
    [B, A, N + 1] to override. Returns [B, A, N, K] log-probs.
    functools.partial(log_p_ref, model, tok) is the (scenes, ids, id_valid) callable that
    ppo_anchor.py expects."""
    if pose is None:
        pose, pose_valid = poses_from_ids(tok, scenes, ids, id_valid, enc)
    tokens = dict(ids=ids, id_valid=id_valid, pose=pose, pose_valid=pose_valid)
    return model(scenes, tokens).log_softmax(-1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def next_token_loss(logits, target, mask, smoothing: float, mean_over=None) -> tuple:
    """Cross-entropy over masked (agent, step) targets: logits [B, A, N, K], target, mask
    [B, A, N] -> (loss, accuracy) scalars, means over the E targets. mean_over(E) -> the count
    to divide by instead (data parallelism: distributed.token_mean), called even when E = 0."""
    lg, tg = logits[mask], target[mask]                                        # [E, K], [E]
    E = tg.numel()
    scale = 1.0 if mean_over is None else E / max(mean_over(E), 1e-12)      # sum / mean_over(E)
    if E == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    loss = F.cross_entropy(lg, tg, label_smoothing=smoothing)
    acc = (lg.argmax(-1) == tg).float().mean()
    if mean_over is not None:
        loss, acc = loss * scale, acc * scale
    return loss, acc.detach()


def bc_loss(model: ReferenceModel, scenes: Scenes, tokens: dict, smoothing: float = 0.1,
            mean_over=None) -> tuple:
    """Behaviour cloning on encoded logs: every valid target token, label smoothing 0.1.
    `model` may be a DistributedDataParallel wrapper (only its forward is called)."""
    logits = model(scenes, tokens)                                             # [B, A, N, K]
    mask = tokens["id_valid"] & tokens["pose_valid"][..., :-1]                 # [B, A, N]
    return next_token_loss(logits, tokens["ids"], mask, smoothing, mean_over)


# --------------------------------------------------------------------------------------------
# Closed-loop rollout (sampling or CAT-K)
# --------------------------------------------------------------------------------------------
def sample_top_k(logits, top_k: int, temperature: float, generator=None):
    """Sample from the top-k tokens after a temperature: logits [..., K] -> ids [...]."""
    val, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)             # [..., k]
    p = (val / max(temperature, 1e-6)).softmax(-1)                             # [..., k]
    pick = torch.multinomial(p.reshape(-1, p.shape[-1]), 1,
                             generator=generator).view(p.shape[:-1] + (1,))  # [..., 1]
    return idx.gather(-1, pick).squeeze(-1)


def catk_choice(tok: MotionTokenizer, logits, pose, target, target_ok, agent_type, top_k: int):
    """Closest among top-k: of the k most likely tokens, the one whose box after the token lies
    nearest (mean corner distance) the logged box at the next boundary; the most likely token where
    there is no logged box. logits [B, A, K], pose, target [B, A, 3], target_ok [B, A] -> ids [B, A].
    Ranking by logit - distance instead is not the same: a trained model's logits spread over
    several nats, so that choice is nearly greedy and drifts metres away from the log."""
    idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices          # [B, A, k]
    end = tok.table[:, :, -1][agent_type]                                      # [B, A, K, 3]
    cand = apply_local(pose, end.gather(2, idx[..., None].expand(-1, -1, -1, 3)))  # [B, A, k, 3]
    lw = box_lw(agent_type)                                                    # [B, A, 2]
    d = corner_distance(corners_at(cand, lw[:, :, None]), corners_at(target, lw)[:, :, None])  # [B, A, k]
    best = idx.gather(-1, d.argmin(-1, keepdim=True)).squeeze(-1)              # [B, A]
    return torch.where(target_ok, best, idx[..., 0])


@torch.no_grad()
def closed_loop(model: ReferenceModel, tok: MotionTokenizer, scenes: Scenes, top_k: int = 5,
                temperature: float = 1.0, generator=None, catk: bool = False, return_logits: bool = False,
                enc: dict | None = None, repeats: int = 1) -> dict:
    """Roll every controlled agent of `scenes` out from boundary n0 to the end, all at once.

    Agents not controlled follow their logged tokens. Returns flat tensors over the batch:
    tokens (ids, id_valid [B, A, N], pose [B, A, N + 1, 3], pose_valid [B, A, N + 1]) of the
    executed sequence, traj [B, A, 80, 3] (10 Hz future x, y, yaw), controlled [B, A] and, with
    return_logits, the logits [B, A, N, K] computed during the rollout (zero before n0).
    With catk, the choice is CAT-K's closest-among-top-k and `targets` [B, A, N] and
    `target_valid` [B, A, N] hold the recovery tokens. `enc`: tok.encode(scenes), if already known.
    repeats: as scenes.repeat(repeats) (B counts worlds); the map and history pass run once per scene."""
    N, n0, spt = tok.N, tok.n0, tok.steps_per_token
    enc = tok.encode(scenes) if enc is None else enc
    ctx = model.context(scenes)
    prev = [F.pad(enc[k][..., :n0 - 1], (1, 0)) for k in ("ids", "id_valid")]  # [B, A, n0] each
    hist_logits, past = model.step(ctx, scenes, *prev, enc["pose"][:, :, :n0], enc["pose_valid"][:, :, :n0],
                                   model.empty_past(scenes.B, prev[0].shape[1], scenes.device))  # [B,A,n0,K]
    if repeats > 1:                  # every tensor over scenes becomes one over worlds, scene-major
        rep = lambda t: t.repeat_interleave(repeats, 0)  # [B, ...] -> [B * repeats, ...]
        scenes, hist_logits = scenes.repeat(repeats), rep(hist_logits)
        enc = {k: rep(v) for k, v in enc.items()}
        ctx, past = ({k: [(rep(a), rep(b)) for a, b in v] if k.endswith("kv") else rep(v)
                      for k, v in d.items()} for d in (ctx, past))
    ids, id_valid = enc["ids"].clone(), enc["id_valid"].clone()               # [B, A, N]
    pose, pose_valid = enc["pose"].clone(), enc["pose_valid"].clone()        # [B, A, N + 1, 3], [B, A, N + 1]
    kind = scenes.agent_type                                                   # [B, A]
    ctrl = scenes.controlled & pose_valid[:, :, n0]                            # [B, A]
    id_valid[:, :, n0:] |= ctrl[..., None]          # controlled agents live to the end, as in env.py
    pose_valid[:, :, n0:] |= ctrl[..., None]
    if catk:
        log = log_poses(scenes)[:, :, ::spt]                                   # [B, A, N + 1, 3]
        log_ok = scenes.valid[:, :, ::spt]                                     # [B, A, N + 1]
        targets = torch.zeros_like(ids)                                        # [B, A, N]
        target_valid = torch.zeros_like(id_valid)                              # [B, A, N]
    all_logits = F.pad(hist_logits, (0, 0, 0, N - n0)) if return_logits else None  # [B, A, N, K]
    steps = []
    for n in range(n0, N):
        logits, past = model.step(ctx, scenes, ids[:, :, n - 1:n], id_valid[:, :, n - 1:n],
                                  pose[:, :, n:n + 1], pose_valid[:, :, n:n + 1], past)
        logits = logits[:, :, 0]                                               # [B, A, K]
        if return_logits:
            all_logits[:, :, n] = logits
        if catk:
            k = catk_choice(tok, logits, pose[:, :, n], log[:, :, n + 1], log_ok[:, :, n + 1], kind, top_k)
            targets[:, :, n] = tok.match(pose[:, :, n], log[:, :, n + 1], kind)
            target_valid[:, :, n] = ctrl & log_ok[:, :, n + 1]
        else:
            k = sample_top_k(logits, top_k, temperature, generator)            # [B, A]
        ids[:, :, n] = torch.where(ctrl, k, ids[:, :, n])
        step = tok.step_pose(pose[:, :, n], ids[:, :, n], kind)                # [B, A, spt, 3]
        pose[:, :, n + 1] = torch.where(ctrl[..., None], step[:, :, -1], pose[:, :, n + 1])
        steps.append(step)
    traj = torch.cat(steps, 2)                                                 # [B, A, 80, 3]
    logged = torch.cat([scenes.pos, scenes.yaw[..., None]], -1)[:, :, NOW + 1:]  # [B, A, 80, 3]
    traj = torch.where(ctrl[:, :, None, None], traj, logged)   # others replay the log, as in env.py
    out = dict(tokens=dict(ids=ids, id_valid=id_valid, pose=pose, pose_valid=pose_valid), traj=traj,
               controlled=ctrl)
    if catk:
        out.update(targets=targets, target_valid=target_valid)
    if return_logits:
        out["logits"] = all_logits
    return out


@torch.no_grad()
def rollout(model: ReferenceModel, tok: MotionTokenizer, scenes: Scenes, R: int = 32, top_k: int = 5,
            temperature: float = 1.0, generator=None, batch_worlds: int = 512) -> dict:
    """R closed-loop rollouts of every scene, batched together (scenes.repeat(R)), in chunks of at
    most `batch_worlds` worlds. Returns traj [B, R, A, 80, 3] (x, y, yaw at steps 11..90),
    z [B, R, A, 80] (each agent's z at step 10) and ids [B, R, A, N] executed tokens: ready for
    wosac_metrics.score_rollouts(scenes, traj[..., :2], z, traj[..., 2])."""
    was_training = model.training
    model.eval()
    per = max(1, batch_worlds // R)                                            # scenes per chunk
    trajs, ids = [], []
    for b0 in range(0, scenes.B, per):                 # chunks of scenes, to bound memory
        s = scenes.select(slice(b0, b0 + per))
        out = closed_loop(model, tok, s, top_k, temperature, generator, repeats=R)  # encoded once, not R x
        trajs.append(out["traj"].unflatten(0, (-1, R)))                        # [b, R, A, 80, 3]
        ids.append(out["tokens"]["ids"].unflatten(0, (-1, R)))                 # [b, R, A, N]
    model.train(was_training)
    traj = torch.cat(trajs)                                                    # [B, R, A, 80, 3]
    z = scenes.z[:, None, :, NOW:NOW + 1].expand(-1, R, -1, T - NOW - 1)       # [B, R, A, 80]
    return dict(traj=traj, z=z, ids=torch.cat(ids))


def catk_loss(model: ReferenceModel, tok: MotionTokenizer, scenes: Scenes, top_k: int = 32,
              enc: dict | None = None, forward=None, mean_over=None) -> tuple:
    """One CAT-K step's loss: roll out (no gradient, eval mode), then cross-entropy of the
    teacher-forced logits of the rolled-out sequence against the recovery tokens.
    enc: tok.encode(scenes), if already known. forward: what computes the teacher-forced logits
    (a DistributedDataParallel wrapper of `model`; default the model); mean_over: next_token_loss."""
    was_training = model.training
    model.eval()
    out = closed_loop(model, tok, scenes, top_k=top_k, catk=True, enc=enc)
    model.train(was_training)
    logits = (forward or model)(scenes, out["tokens"])                         # [B, A, N, K]
    return next_token_loss(logits, out["targets"], out["target_valid"], 0.0, mean_over)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_checkpoint(path, model: ReferenceModel, tok: MotionTokenizer, **extra) -> None:
    """Model, its config and tokenizer, plus `extra` (optimizer, epoch, ...), saved atomically."""
    save_atomic(dict(model=model.state_dict(), model_cfg=asdict(model.cfg), tokenizer=tok.state_dict(),
                     **extra), path)


def load_reference(path, device="cpu") -> tuple:
    """(model in eval mode, tokenizer, ReferenceConfig) from a checkpoint written by train.py."""
    fix = "run `python train.py --stage reference` (--overwrite to replace a corrupt run)"
    d = read_file(path, "a reference checkpoint", fix, keys=("model", "model_cfg", "tokenizer"))
    try:
        cfg = ReferenceConfig(**d["model_cfg"])
        tok = MotionTokenizer.from_state_dict(d["tokenizer"], K=cfg.K, steps_per_token=cfg.steps_per_token)
        model = ReferenceModel(cfg, tok.table)
        model.load_state_dict(d["model"])
    except (TypeError, KeyError, RuntimeError, ValueError) as e:  # a config or weights of another shape
        raise ValueError(f"{path}: not a reference checkpoint of this code ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); {fix}") from None
    return model.to(device).eval(), tok.to(device), cfg
