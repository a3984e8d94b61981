"""Motion tokens: a k-disks vocabulary of short motions, rolling-match encoding, decoding.

Both the centralized reference model (SMART-style next-token prediction) and the small SPACeR
policy act in the same discrete vocabulary, so that `log p_ref(a_t | s_t)` and the exact
KL(pi || p_ref) over K tokens are defined (SPACeR Eq. 1-5). A token is a short motion segment
of `spt` = steps_per_token poses, written in the agent's frame at the segment's start:

    token k of type c:  table[c, k] = [(x_j, y_j, yaw_j)  for j = 1..spt]        (local frame)

Applying a token to a pose (x0, y0, yaw0) is a rigid-body composition (`apply_local`):

    (x, y)_j = (x0, y0) + R(yaw0) (x_j, y_j),     yaw_j = wrap(yaw0 + yaw_j)

Time grid. Token boundaries sit at steps n * spt, n = 0..N with N = 90 // spt; token n moves an
agent from its pose at step n * spt through steps n * spt + 1 .. (n + 1) * spt. With spt = 2
(0.2 s, SPACeR's 5 Hz) there are N = 45 tokens, 5 of history and 40 of future; with spt = 5
(0.5 s, SMART's 2 Hz) N = 18, 2 of history and 16 of future. The simulator starts at NOW = 10,
the boundary n0 = NOW // spt.

Vocabulary by k-disks (SMART / CAT-K). Every motion segment of the logs is represented by the
four corners of a fixed per-type box (vehicle 4.8 x 2.0 m, pedestrian 1.0 x 1.0 m, cyclist
2.0 x 1.0 m) placed at the segment's *last* pose, in the frame of its first pose. The distance
between two segments is the mean corner distance

    d(a, b) = 1/4 sum_i || corner_i(a) - corner_i(b) ||.

Repeat: pick a random remaining segment (the first pick is the zero motion), take every
remaining segment within `tol` of it, keep their mean as a token, remove them. The zero token
is kept exactly zero and is id 0 of every type. Four choices go beyond SMART's recipe, each
measured on the real and toy scenes (see `main`):
- tol is found per type by bisection so that the K disks just cover the data (SMART fixes
  0.05 m for 2048 tokens; for K = 50..400 no single value fits);
- the clustered motions include a copy of every segment seen from a start pose perturbed by a
  few cm / hundredths of a radian: rolling matching (below) starts each token a little off the
  log, and without the small motions that lead back, smooth logs drift by metres;
- `envelope` tokens come from plausible constant-speed arcs beyond the logs' reach (a faster
  car than any in the training logs otherwise falls behind without bound);
- a few Lloyd (k-means) steps in the same corner space move each token to the mean of the
  segments nearest to it, which is what matching will assign to it (20-30 % lower error).
If the data run out before K tokens, farthest-point sampling fills the rest, first from the
logged segments, then from the arcs, so every type has exactly K distinct tokens.

Encoding by rolling matching. From the logged pose at an agent's first valid boundary, every
next token is the one whose end box, placed at the *previously matched* pose (never the logged
one), lies closest (mean corner distance) to the logged box at the next boundary; the next
matched pose is that token applied exactly (no re-fitting of the pose from corners). The error
therefore stays at the vocabulary's resolution instead of accumulating. Heading flips of the
tracker (jumps over 1.5 rad in 0.1 s) are removed first. Agents appearing late start at their
first valid boundary; after a gap an agent is re-anchored at its logged pose.
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from geometry import box_corners
from scenes import AGENT_TYPES, DT, NOW, T, Scenes, apply_local, to_local, wrap_angle
from toy_scenes import make_toy_scenes
from womd import find_womd_examples, load_womd_dir, missing_womd_examples

VALID_SPT = (1, 2, 5, 10)           # must divide both NOW = 10 and T - 1 = 90
BOX_LW = ((4.8, 2.0), (1.0, 1.0), (2.0, 1.0))  # fixed (length, width) per type for corner distances
FLIP_RAD = 1.5                      # a heading change above this in one 0.1 s step is a tracker flip
# Plausible constant-speed arcs per type, for the envelope tokens and for filling scarce types:
# (max speed m/s, max yaw rate rad/s, max lateral acceleration m/s^2).
ARC_RANGE = ((30.0, 1.0, 6.0), (3.0, 3.0, 3.0), (12.0, 1.5, 4.0))


@dataclass
class TokenizerConfig:
    K: int = 200                                  # tokens per agent type (id 0 is standing still)
    steps_per_token: int = 2                      # 0.1 s steps per token: 2 (SPACeR, 5 Hz) or 5 (SMART, 2 Hz)
    # k-disks corner tolerance (m) per type (vehicle, ped, cyclist); None: auto_tol
    tol: tuple | None = None
    max_segments: int = 50_000                    # logged segments sampled per type for fitting
    # std (m, rad), per step of token length, of the start-pose perturbation of the fitting copies
    jitter: tuple = (0.015, 0.01)
    envelope: int = 8                             # tokens per type from plausible arcs beyond the logs
    refine_iters: int = 5                         # Lloyd (k-means) steps after k-disks; 0 = k-disks alone
    seed: int = 0                                 # seeds segment sampling and the k-disks picks


# --------------------------------------------------------------------------------------------
# Box geometry (pose algebra: scenes.apply_local / to_local)
# --------------------------------------------------------------------------------------------
_CORNER_ORDER = (0, 3, 2, 1)   # geometry.box_corners' counter-clockwise order -> the vocabulary's


def corners_at(pose: torch.Tensor, lw: torch.Tensor) -> torch.Tensor:
    """Corners of boxes at poses: pose [..., 3], lw [..., 2] (length, width) broadcastable -> [..., 4, 2],
    in the order front-left, front-right, rear-right, rear-left. The order is the one the
    vocabularies were fitted with: corner_distance sums in it, and another order rounds differently."""
    corners = box_corners(pose[..., :2], pose[..., 2], lw[..., 0], lw[..., 1])  # [..., 4, 2]
    return corners[..., _CORNER_ORDER, :]                                # [..., 4, 2]


def corner_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean corner distance between boxes given by corners a, b [..., 4, 2] -> [...]."""
    return (a - b).norm(dim=-1).mean(-1)


def box_lw(agent_type: torch.Tensor) -> torch.Tensor:
    """The fixed (length, width) of each agent's type: agent_type [...] -> [..., 2]."""
    return torch.tensor(BOX_LW, device=agent_type.device)[agent_type.clamp(0, 2)]


def remove_heading_flips(yaw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace any heading that jumps by more than FLIP_RAD from the last kept heading by that
    heading (a tracker flip, not a motion): yaw, valid [B, A, T] -> [B, A, T]."""
    out = yaw.clone()                                                        # [B, A, T]
    last = yaw[..., 0].clone()                                               # [B, A]
    seen = valid[..., 0].clone()                                             # [B, A]
    for t in range(1, yaw.shape[-1]):
        flip = seen & valid[..., t] & (wrap_angle(yaw[..., t] - last).abs() > FLIP_RAD)  # [B, A]
        out[..., t] = torch.where(flip, last, yaw[..., t])
        last = torch.where(valid[..., t], out[..., t], last)
        seen = seen | valid[..., t]
    return out


def log_poses(scenes: Scenes) -> torch.Tensor:
    """Logged (x, y, yaw) with heading flips removed: [B, A, T, 3]."""
    yaw = remove_heading_flips(scenes.yaw, scenes.valid)                     # [B, A, T]
    return torch.cat([scenes.pos, yaw[..., None]], -1)                       # [B, A, T, 3]


def check_spt(spt: int) -> None:
    if spt not in VALID_SPT:
        raise ValueError(f"steps_per_token={spt} is not supported: it must divide NOW=10 and 90, "
                         f"i.e. be one of {VALID_SPT}")


# --------------------------------------------------------------------------------------------
# Fitting the vocabulary: segments, k-disks, deterministic fill
# --------------------------------------------------------------------------------------------
def log_windows(scenes: Scenes, spt: int) -> tuple:
    """Every window of spt + 1 consecutive valid logged poses: (poses [M, spt + 1, 3], type [M])."""
    poses = log_poses(scenes)                                                # [B, A, T, 3]
    win = poses.unfold(2, spt + 1, 1).permute(0, 1, 2, 4, 3)                 # [B, A, T - spt, spt + 1, 3]
    ok = scenes.valid.unfold(2, spt + 1, 1).all(-1)                          # [B, A, T - spt]
    kind = scenes.agent_type[:, :, None].expand_as(ok)[ok]                   # [M]
    return win[ok], kind                                                     # [M, spt + 1, 3], [M]


def fit_segments(win: torch.Tensor, jitter: tuple, gen: torch.Generator) -> torch.Tensor:
    """The motions to cluster: each window in the frame of its first pose, plus a copy seen from
    a start pose perturbed by N(0, jitter) (m, m, rad): rolling matching starts every token from a
    matched pose a little off the log, and the motions that lead back from there must be tokens
    too, or smooth logs (no tracker noise to supply them) drift. win [M, spt + 1, 3] -> [2M, spt, 3]."""
    sigma = torch.tensor([jitter[0], jitter[0], jitter[1]])                  # [3]
    start = win[:, 0] + torch.randn(win[:, 0].shape, generator=gen) * sigma  # [M, 3]
    return torch.cat([to_local(win[:, 0], win[:, 1:]), to_local(start, win[:, 1:])])  # [2M, spt, 3]


def arc_segments(spt: int, v_max: float, w_max: float, a_lat: float) -> torch.Tensor:
    """Constant-speed, constant-yaw-rate motions on a (speed x yaw rate) grid, kept where the
    lateral acceleration |v w| stays plausible: [P, spt, 3]."""
    v, w = torch.meshgrid(torch.linspace(0.0, v_max, 60), torch.linspace(-w_max, w_max, 41), indexing="ij")
    keep = (v * w).abs() <= a_lat                                            # [60, 41]
    v, w = v[keep][:, None], w[keep][:, None]                                # [P, 1]
    t = DT * torch.arange(1, spt + 1, dtype=torch.float32)                   # [spt]
    yaw = w * t                                                              # [P, spt]
    # exact arc: x = v sin(w t) / w, y = v (1 - cos(w t)) / w, the straight line as w -> 0
    small = w.abs() < 1e-6                                                   # [P, 1]
    w_safe = torch.where(small, torch.ones_like(w), w)                       # [P, 1]
    x = torch.where(small, v * t, v * torch.sin(yaw) / w_safe)               # [P, spt]
    y = torch.where(small, torch.zeros_like(yaw), v * (1 - torch.cos(yaw)) / w_safe)  # [P, spt]
    return torch.stack([x, y, yaw], -1)                                      # [P, spt, 3]


def end_corners(segments: torch.Tensor, lw: torch.Tensor) -> torch.Tensor:
    """Corners of the box at each segment's last pose: [M, spt, 3] -> [M, 4, 2]."""
    return corners_at(segments[:, -1], lw)


def k_disks(segments: torch.Tensor, K: int, tol: float, lw: torch.Tensor, seed: int) -> torch.Tensor:
    """k-disks: up to K tokens [K', spt, 3] from segments [M, spt, 3]; token 0 is exactly zero.
    The segments are shuffled once, so "a random remaining segment" is simply the first one left."""
    order = torch.randperm(len(segments), generator=torch.Generator().manual_seed(seed))  # [M]
    segments = segments[order]                                               # [M, spt, 3]
    corners = end_corners(segments, lw)                                      # [M, 4, 2]
    zero = torch.zeros(segments.shape[1:])                                   # [spt, 3]
    keep = corner_distance(corners, end_corners(zero[None], lw)) > tol       # [M]
    segments, corners = segments[keep], corners[keep]                        # [M', ...] what is left
    tokens = [zero]
    while len(tokens) < K and len(segments):
        members = corner_distance(corners, corners[0]) <= tol               # [M']
        seg = segments[members]                                              # [C, spt, 3]
        yaw = torch.atan2(seg[..., 2].sin().mean(0), seg[..., 2].cos().mean(0))  # [spt] circular mean
        tokens.append(torch.cat([seg[..., :2].mean(0), yaw[:, None]], -1))   # [spt, 3]
        segments, corners = segments[~members], corners[~members]
    return torch.stack(tokens)                                               # [K', spt, 3]


def auto_tol(segments: torch.Tensor, K: int, lw: torch.Tensor, seed: int, iters: int = 9) -> float:
    """The smallest tolerance (bisection on a log scale, to about 2 %) whose k-disks cover all
    segments with at most K disks: the K tokens are then spent on the whole data, rare motions
    included. (SMART fixes tol = 0.05 m for 2048 tokens; with K = 50..400 no one value fits.)"""
    lo, hi = 0.005, 5.0
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if len(k_disks(segments, K + 1, mid, lw, seed)) > K:
            lo = mid
        else:
            hi = mid
    return hi


def farthest_fill(tokens: torch.Tensor, pool: torch.Tensor, n: int, lw: torch.Tensor) -> torch.Tensor:
    """Add up to n segments of pool [P, spt, 3], each the one farthest from all tokens so far
    (greedy k-center); stops early when the pool holds nothing new. Returns [K', spt, 3]."""
    if n <= 0:
        return tokens
    pool_c = end_corners(pool, lw)                                           # [P, 4, 2]
    tok_c = end_corners(tokens, lw)                                          # [K', 4, 2]
    nearest = torch.cat([corner_distance(chunk[:, None], tok_c[None]).min(1).values
                         for chunk in pool_c.split(4096)])                   # [P]
    added = []
    for _ in range(n):
        j = int(nearest.argmax())
        if nearest[j] <= 1e-6:
            break
        added.append(pool[j])
        nearest = torch.minimum(nearest, corner_distance(pool_c, pool_c[j]))  # [P]
    return torch.cat([tokens, torch.stack(added)]) if added else tokens


def lloyd_refine(tokens: torch.Tensor, segments: torch.Tensor, lw: torch.Tensor, iters: int,
                 fixed_tail: int) -> torch.Tensor:
    """A few k-means (Lloyd) steps on the end corners (8 numbers per segment, squared Euclidean,
    which ranks tokens almost as the mean corner distance does): each token becomes the mean of
    the segments nearest to it, i.e. of what rolling matching will assign to it. Token 0 stays
    exactly zero and the last `fixed_tail` (envelope) tokens stay put. [K, spt, 3] -> [K, spt, 3]."""
    K = len(tokens)
    seg_c = end_corners(segments, lw)                                        # [M, 4, 2]
    movable = torch.ones(K, dtype=torch.bool)                                # [K]
    movable[0] = False
    movable[K - fixed_tail:] = False
    for _ in range(iters):
        tok_c = end_corners(tokens, lw)                                      # [K, 4, 2]
        near = torch.cat([torch.cdist(chunk, tok_c.flatten(1)).argmin(1)
                          for chunk in seg_c.flatten(1).split(16384)])       # [M] nearest in R^8
        count = torch.bincount(near, minlength=K).float()                    # [K]
        xy = torch.zeros(K, *segments.shape[1:-1], 2).index_add_(0, near, segments[..., :2])  # [K, spt, 2]
        sin = torch.zeros(K, segments.shape[1]).index_add_(0, near, segments[..., 2].sin())  # [K, spt]
        cos = torch.zeros(K, segments.shape[1]).index_add_(0, near, segments[..., 2].cos())  # [K, spt]
        mean = torch.cat([xy / count.clamp(min=1)[:, None, None],
                          torch.atan2(sin, cos)[..., None]], -1)           # [K, spt, 3]
        tokens = torch.where((movable & (count > 0))[:, None, None], mean, tokens)
    return tokens


def fit_type(win: torch.Tensor, c: int, cfg: TokenizerConfig) -> tuple:
    """Exactly K tokens for agent type c from its logged windows win [M, spt + 1, 3]:
    K - envelope by k-disks (topped up by farthest-point sampling if the data run out) and Lloyd
    refinement, the rest from plausible arcs. Returns (tokens [K, spt, 3], tol used)."""
    K, spt = cfg.K, cfg.steps_per_token
    gen = torch.Generator().manual_seed(cfg.seed * 3 + c)                    # one stream per type
    if len(win) > cfg.max_segments:
        win = win[torch.randperm(len(win), generator=gen)[: cfg.max_segments]]  # [max_segments, spt + 1, 3]
    segments = fit_segments(win, (cfg.jitter[0] * spt, cfg.jitter[1] * spt), gen)  # [M', spt, 3]
    lw = torch.tensor(BOX_LW[c])                                             # [2]
    seed = int(torch.randint(2**31, (1,), generator=gen))
    tol = auto_tol(segments, K - cfg.envelope, lw, seed) if cfg.tol is None else float(cfg.tol[c])
    tokens = k_disks(segments, K - cfg.envelope, tol, lw, seed)              # [K', spt, 3]
    if len(tokens) < K - cfg.envelope and len(segments):
        tokens = farthest_fill(tokens, segments, K - cfg.envelope - len(tokens), lw)  # [K', spt, 3]
    tokens = farthest_fill(tokens, arc_segments(spt, *ARC_RANGE[c]), K - len(tokens), lw)  # [K, spt, 3]
    if len(tokens) < K:
        raise ValueError(f"could only build {len(tokens)} distinct {AGENT_TYPES[c]} tokens, fewer than K={K}")
    if len(segments):
        tokens = lloyd_refine(tokens, segments, lw, cfg.refine_iters, cfg.envelope)  # [K, spt, 3]
    return tokens, tol


@contextmanager
def one_thread():
    """Fitting is a loop of thousands of small tensor ops, for which extra threads cost more than
    they save (20x slower on a busy 2-core machine); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------
class MotionTokenizer:
    """A per-type vocabulary table [3, K, spt, 3] plus encode / decode on the shared time grid."""

    def __init__(self, table: torch.Tensor, cfg: TokenizerConfig, tol_used: tuple | None = None):
        check_spt(cfg.steps_per_token)
        if tuple(table.shape) != (3, cfg.K, cfg.steps_per_token, 3):
            raise ValueError(f"token table has shape {tuple(table.shape)}, expected "
                             f"(3, K={cfg.K}, steps_per_token={cfg.steps_per_token}, 3)")
        self.table = table                                                   # [3, K, spt, 3]
        self.cfg = cfg
        self.tol_used = tol_used if tol_used is not None else cfg.tol  # tolerances k-disks ran with
        self.K = cfg.K
        self.steps_per_token = cfg.steps_per_token
        self.N = (T - 1) // cfg.steps_per_token        # token steps per scene
        self.n0 = NOW // cfg.steps_per_token           # boundary where the simulator starts

    @property
    def motion_table(self) -> torch.Tensor:
        return self.table

    @property
    def device(self):
        return self.table.device

    def to(self, device) -> "MotionTokenizer":
        self.table = self.table.to(device)
        return self

    # ---- fitting ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, scenes: Scenes, cfg: TokenizerConfig = TokenizerConfig()) -> "MotionTokenizer":
        """One vocabulary per type from the logged segments of `scenes`; deterministic given cfg.seed."""
        check_spt(cfg.steps_per_token)
        if not 0 <= cfg.envelope < cfg.K:
            raise ValueError(f"TokenizerConfig.envelope={cfg.envelope} must be in [0, K={cfg.K})")
        if cfg.tol is not None and len(cfg.tol) != 3:
            raise ValueError(f"TokenizerConfig.tol must give 3 tolerances (vehicle, pedestrian, cyclist) "
                             f"or None, got {cfg.tol}")
        win, kind = log_windows(scenes.to("cpu"), cfg.steps_per_token)      # [M, spt + 1, 3], [M]
        with one_thread():
            fitted = [fit_type(win[kind == c], c, cfg) for c in range(3)]   # ([K, spt, 3], tol) per type
        table = torch.stack([tokens for tokens, _ in fitted])               # [3, K, spt, 3]
        return cls(table.to(scenes.device), cfg, tuple(tol for _, tol in fitted))

    # ---- applying tokens --------------------------------------------------------------------
    def step_pose(self, pose: torch.Tensor, ids: torch.Tensor, agent_type: torch.Tensor) -> torch.Tensor:
        """One token applied: pose [..., 3], ids [...], agent_type [...] -> [..., spt, 3]."""
        local = self.table[agent_type.clamp(0, 2), ids]                     # [..., spt, 3]
        return apply_local(pose, local)

    def decode(self, start_pose: torch.Tensor, ids: torch.Tensor, agent_type: torch.Tensor) -> torch.Tensor:
        """Chain tokens: start_pose [B, A, 3], ids [B, A, N] -> poses at 10 Hz [B, A, N * spt, 3]."""
        out, pose = [], start_pose
        for n in range(ids.shape[-1]):
            step = self.step_pose(pose, ids[..., n], agent_type)            # [B, A, spt, 3]
            out.append(step)
            pose = step[..., -1, :]                                         # [B, A, 3]
        return torch.cat(out, -2)                                           # [B, A, N * spt, 3]

    def match(self, pose: torch.Tensor, target: torch.Tensor, agent_type: torch.Tensor) -> torch.Tensor:
        """Token whose end box from `pose` is nearest the `target` box: pose, target [..., 3],
        agent_type [...] -> ids [...] long."""
        end = self.table[:, :, -1][agent_type.clamp(0, 2)]                  # [..., K, 3]
        cand = apply_local(pose, end)                                       # [..., K, 3] K plays P
        lw = box_lw(agent_type)                                             # [..., 2]
        d = corner_distance(corners_at(cand, lw[..., None, :]),
                            corners_at(target, lw)[..., None, :, :])       # [..., K]
        return d.argmin(-1)

    @torch.no_grad()
    def encode(self, scenes: Scenes, anchor_now: bool = True) -> dict:
        """Rolling matching of the logs on the token grid.

        Returns ids [B, A, N] long, id_valid [B, A, N], pose [B, A, N + 1, 3] (pose at each
        boundary: the matched one, or the logged one where the agent (re)appears), pose_valid
        [B, A, N + 1]. A token is valid when the log is valid at both its boundaries; agents
        appearing late start at their first valid boundary, vanishing agents stop, and an agent
        that reappears after a gap is re-anchored at the logged pose. With anchor_now, the pose
        at n0 = NOW // spt is also the logged one, as in the simulator, so the future ids are
        exactly those that, executed from the logged step-10 pose, best follow the log.
        """
        spt = self.steps_per_token
        poses = log_poses(scenes)[:, :, ::spt]                              # [B, A, N + 1, 3]
        valid = scenes.valid[:, :, ::spt]                                   # [B, A, N + 1]
        kind = scenes.agent_type                                            # [B, A]
        ids = torch.zeros(valid.shape[:2] + (self.N,), dtype=torch.long, device=valid.device)  # [B, A, N]
        id_valid = valid[..., :-1] & valid[..., 1:]                         # [B, A, N]
        pose = poses.clone()                                                # [B, A, N + 1, 3]
        for n in range(self.N):
            k = self.match(pose[:, :, n], poses[:, :, n + 1], kind)         # [B, A]
            ids[..., n] = torch.where(id_valid[..., n], k, torch.zeros_like(k))
            nxt = self.step_pose(pose[:, :, n], ids[..., n], kind)[..., -1, :]  # [B, A, 3]
            keep_log = ~id_valid[..., n] | (anchor_now and n + 1 == self.n0)
            pose[:, :, n + 1] = torch.where(keep_log[..., None], poses[:, :, n + 1], nxt)
        pose = torch.where(valid[..., None], pose, torch.zeros_like(pose))  # [B, A, N + 1, 3]
        return dict(ids=ids, id_valid=id_valid, pose=pose, pose_valid=valid)

    # ---- checkpointing ----------------------------------------------------------------------
    @torch.no_grad()
    def encode_split(self, data: Scenes, chunk: int = 64) -> dict:
        """encode over a whole dataset in chunks of scenes, on the tokenizer's device, kept on CPU."""
        parts = [self.encode(data.select(slice(i, i + chunk)).to(self.device))
                 for i in range(0, data.B, chunk)]
        return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}   # [B, A, ...] each

    def state_dict(self) -> dict:
        return {"table": self.table.detach().cpu(), "cfg": asdict(self.cfg), "tol_used": self.tol_used}

    @classmethod
    def from_state_dict(cls, d: dict, K: int | None = None,
                        steps_per_token: int | None = None) -> "MotionTokenizer":
        if "table" not in d or "cfg" not in d:
            raise ValueError(f"tokenizer state_dict needs keys 'table' and 'cfg', got {sorted(d)}")
        tol = d["cfg"].get("tol")
        try:
            cfg = TokenizerConfig(**{**d["cfg"], "tol": None if tol is None else tuple(tol)})
        except TypeError as e:
            raise ValueError(f"tokenizer state_dict 'cfg' does not fit TokenizerConfig: {e}") from None
        if K is not None and K != cfg.K:
            raise ValueError(f"saved tokenizer has K={cfg.K} tokens per type but K={K} was requested; "
                             f"refit the tokenizer or load a checkpoint built with K={K}")
        if steps_per_token is not None and steps_per_token != cfg.steps_per_token:
            raise ValueError(f"saved tokenizer has steps_per_token={cfg.steps_per_token} but "
                             f"steps_per_token={steps_per_token} was requested; refit the tokenizer or "
                             f"load a checkpoint built with that cadence")
        return cls(d["table"].float(), cfg, d.get("tol_used"))


# --------------------------------------------------------------------------------------------
# How faithful are the tokens? encode -> decode against the log
# --------------------------------------------------------------------------------------------
def reconstruct(tok: MotionTokenizer, enc: dict, agent_type: torch.Tensor) -> tuple:
    """Poses at steps 1..90 from each token's own start pose (so re-anchoring is honoured):
    returns (poses [B, A, T - 1, 3], covered [B, A, T - 1] bool)."""
    steps = tok.step_pose(enc["pose"][:, :, :-1], enc["ids"], agent_type[..., None])  # [B, A, N, spt, 3]
    B, A, N, spt, _ = steps.shape
    covered = enc["id_valid"][..., None].expand(B, A, N, spt)              # [B, A, N, spt]
    return steps.reshape(B, A, N * spt, 3), covered.reshape(B, A, N * spt)


@torch.no_grad()
def reconstruction_error(tok: MotionTokenizer, scenes: Scenes) -> dict:
    """encode -> decode against the log, per agent type, over every valid step that a valid token
    covers (boundaries and the steps between them): mean and p95 position error (m), mean yaw
    error (rad); the mean error at each agent's first and last valid future step and over the
    first and last 2 s of the future (similar values: the rolling matching does not drift); and
    the fraction of valid logged steps that tokens cover (steps before an agent's first boundary
    are not). Yaw is compared with the log after removing heading flips."""
    enc = tok.encode(scenes)
    rec, covered = reconstruct(tok, enc, scenes.agent_type)                 # [B, A, T - 1, 3], [B, A, T - 1]
    log = log_poses(scenes)[:, :, 1:]                                       # [B, A, T - 1, 3]
    valid = scenes.valid[:, :, 1:]                                          # [B, A, T - 1]
    ok = valid & covered                                                    # [B, A, T - 1]
    pos_err = (rec[..., :2] - log[..., :2]).norm(dim=-1)                    # [B, A, T - 1]
    yaw_err = wrap_angle(rec[..., 2] - log[..., 2]).abs()                   # [B, A, T - 1]
    step = torch.arange(1, T, device=ok.device).expand_as(ok)               # [B, A, T - 1]
    future = ok & (step > NOW)                                              # [B, A, T - 1]
    early, late = future & (step <= NOW + 20), future & (step > T - 21)     # [B, A, T - 1]
    has = future.any(-1)                                                    # [B, A]
    first = torch.where(future, step, T).min(-1).values.clamp(max=T - 1) - 1  # [B, A] index into T - 1
    last = torch.where(future, step, 1).max(-1).values - 1                  # [B, A]
    e_first = pos_err.gather(-1, first[..., None])[..., 0]                  # [B, A]
    e_last = pos_err.gather(-1, last[..., None])[..., 0]                    # [B, A]
    mean = lambda x, m: x[m].mean().item() if bool(m.any()) else float("nan")
    out = {}
    for c, name in enumerate(AGENT_TYPES):
        is_c = (scenes.agent_type == c)[..., None]                          # [B, A, 1]
        m = ok & is_c                                                       # [B, A, T - 1]
        if not bool(m.any()):
            continue
        a = has & is_c[..., 0]                                              # [B, A]
        out[name] = dict(
            pos_mean=mean(pos_err, m), pos_p95=torch.quantile(pos_err[m], 0.95).item(),
            yaw_mean=mean(yaw_err, m),
            first_future=mean(e_first, a), last_future=mean(e_last, a),
            early_future=mean(pos_err, early & is_c), late_future=mean(pos_err, late & is_c),
            coverage=m.sum().item() / (valid & is_c).sum().item(), steps=int(m.sum()))
    return out


# --------------------------------------------------------------------------------------------
# Report: python tokenizer.py --source womd --K 50 200 400 --spt 2 5
# --------------------------------------------------------------------------------------------
def load_source(source: str, n: int) -> tuple:
    """(scenes to fit on, scenes to evaluate on): the 8 WOMD examples for both (there are no
    more), or n toy scenes to fit on and n // 4 other toy scenes to evaluate on."""
    if source == "womd":
        root = find_womd_examples()
        if root is None:
            raise SystemExit(f"no WOMD example scenes: {missing_womd_examples()}")
        womd = load_womd_dir(root)
        return womd, womd
    if source == "toy":
        return make_toy_scenes(n, seed=0), make_toy_scenes(max(1, n // 4), seed=1)
    raise SystemExit(f"--source must be womd or toy, got {source!r}")


def main():
    p = argparse.ArgumentParser(description="Fit tokenizers and report their encode -> decode error")
    p.add_argument("--source", default="womd", help="womd (the 8 example scenes) or toy")
    p.add_argument("--n", type=int, default=32, help="toy scenes to fit on (and n // 4 held out)")
    p.add_argument("--K", type=int, nargs="+", default=[50, 200, 400])
    p.add_argument("--spt", type=int, nargs="+", default=[2, 5])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    fit_on, evaluate_on = load_source(args.source, args.n)
    same = "the same scenes" if fit_on is evaluate_on else f"{evaluate_on.B} held-out scenes"
    print(f"{args.source}: fitted on {fit_on.B} scenes, evaluated on {same}; "
          f"errors over every valid covered step\n")
    print("| K | spt | type | pos mean (m) | pos p95 (m) | yaw mean (rad) "
          "| future first 2 s / last 2 s (m) | tol (m) | fit (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spt in args.spt:
        for K in args.K:
            t0 = time.perf_counter()
            tok = MotionTokenizer.fit(fit_on, TokenizerConfig(K=K, steps_per_token=spt, seed=args.seed))
            fit_s = time.perf_counter() - t0
            for name, r in reconstruction_error(tok, evaluate_on).items():
                tol = tok.tol_used[AGENT_TYPES.index(name)]
                print(f"| {K} | {spt} | {name} | {r['pos_mean']:.4f} | {r['pos_p95']:.4f} "
                      f"| {r['yaw_mean']:.4f} | {r['early_future']:.4f} / {r['late_future']:.4f} "
                      f"| {tol:.3f} | {fit_s:.1f} |")


if __name__ == "__main__":
    main()
