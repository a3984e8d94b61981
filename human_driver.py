"""Stochastic closed-loop human driver: the "true" behaviour of the toy scenes' agents.

The toy logs are written by this driver, and the same driver runs inside `env.py` as a policy
(continuous bicycle actions, one call per 0.1 s). Re-running it from the first 11 logged steps with
new seeds samples the *true* behaviour distribution, which is the realism ceiling no learned model
can beat. That only holds if the driver is Markov: each call sees the physical state (position,
heading, speed of every agent) plus the latents stored in the scene (`route`: the agent's lane
sequence, `style`: desired speed v0, time headway T, standstill gap s0, comfortable braking b),
and all randomness comes from the torch.Generator it is given. Nothing is remembered between calls:
the lane, the lateral offset and a lane change in progress are re-inferred from the pose each step.

Per agent and step (everything batched over B scenes x A agents, on the inputs' device):
1. Route frame. Project the box centre onto the route: arc length s, lateral offset e (left +),
   heading error theta = wrap(yaw + beta - psi_route) with the bicycle's slip beta = atan(kappa L / 2).
   The K nearest agents are projected onto a window of my route too: (ds_j, e_j, heading_j).
2. Longitudinal: the Intelligent Driver Model (IDM, Treiber, Hennecke & Helbing 2000)
       a = a_max [1 - (v / v0)^4 - (s*(v, dv) / g)^2],   s* = s0 + max(0, v T + v dv / (2 sqrt(a_max b)))
   with the most constraining leader among: agents whose box overlaps my lane band ahead now or
   in 1 s (g is bumper to bumper); a virtual stopped leader at a stop line (rolling stop) or at the
   waiting point before a conflict zone I must yield at; and the desired speed capped by the curve
   ahead, v0 <= sqrt(a_lat / |kappa| + 2 b d) (braking in time for a curve d metres away).
3. Gap acceptance at junctions, merges and crosswalks. Conflict zones are precomputed per pair of
   routes that cross (> 20 degrees, within 3 m) or merge (within 2 m); routes that share a lane are
   car following instead, and pedestrians simply pass each other. Each zone has a waiting point,
   the last point where my box, turned as it is there, still clears the other path. Priority, in
   order: whoever cannot stop comfortably before the zone; pedestrians; a route without a stop line
   before the zone; the route that turns less (left turns and merging ramps yield); the earlier
   arrival. The other's priority makes me wait only when we would share the zone in time: it
   arrives before t_clear(me) + T + critical_gap + noise and does not clear it before I arrive. An
   agent inside a zone is always waited for. The yielding agent waits before its first zone ahead.
4. Lateral: curvature feedforward plus a critically damped feedback on the offset to the target
   lane e*:  kappa = kappa_route - (e - e*) / l^2 - 2 zeta sin(theta) / l,  l = max(l_min, v * preview),
   turned into the bicycle's steering angle by inverting kappa = cos(beta) tan(delta) / L.
5. Lane changes (vehicles, where the route has a same-direction neighbour lane for 40 m). e* is
   re-inferred each step: the nearest lane, unless the agent leans towards a neighbour lane (heading
   error above half of what one step of a lane change produces, so lane keeping never qualifies)
   - then that lane. New changes start at a Poisson rate, higher when the other lane lets the
   driver go faster (a MOBIL-like incentive), and only if the new leader and follower stay safe.
6. White noise on acceleration, curvature and the accepted gap. Limits: accel in [a_min, 3] m/s^2
   (a_min = -6 emergency braking for vehicles), |steer| <= 0.6 rad for vehicles.
"""
from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass

import torch

from geometry import cross2, gather_rows
from scenes import DT, LANE, OTHER, Scenes, wrap_angle

STOP_SIGN_CODE = 17   # WOMD map_element_id of a stop sign; the toy maps draw it as a stop line
VEH, PED, CYC = 0, 1, 2


@dataclass
class DriverConfig:
    accel_noise: tuple = (0.3, 0.15, 0.25)      # m/s^2, std of white accel noise per type (veh, ped, cyc)
    curv_noise: tuple = (0.002, 0.03, 0.006)    # 1/m, std of white curvature noise per type
    a_max: tuple = (2.0, 1.0, 1.5)              # m/s^2, IDM maximum acceleration per type
    a_min: tuple = (-6.0, -3.0, -4.0)           # m/s^2, hardest (emergency) braking per type
    steer_max: tuple = (0.6, 1.0, 0.7)          # rad, steering limit per type
    preview_min: tuple = (5.0, 1.2, 3.0)        # m, shortest lateral-control preview length per type
    preview_time: float = 1.2                   # s, preview length l = max(preview_min, v * preview_time)
    damping: float = 0.9                        # zeta of the lateral feedback
    lat_accel: tuple = (2.0, 10.0, 1.5)         # m/s^2, comfortable lateral acceleration in curves per type
    lane_change_rate: float = 0.02              # 1/s, spontaneous lane changes when the other lane is safe
    lane_change_gain: float = 0.4               # 1/s, extra rate when the other lane is faster
    lane_change_incentive: float = 0.3          # m/s^2, acceleration gain that counts as "faster"
    return_rate: float = 0.03                   # 1/s, extra rate of changing back to the route's own lane
    safe_decel: float = 2.0                     # m/s^2, most braking a lane change may impose on anyone
    lane_width: float = 3.6                     # m, nominal lane width used to look for neighbouring lanes
    critical_gap: float = 1.0                   # s, added to the driver's headway T: the accepted time gap
    gap_noise: float = 0.7                      # s, std of the accepted time gap, drawn anew every step
    yield_margin: float = 0.5                   # m, a yielder's centre stops this far before its wait point
    stop_gap: float = 0.5                       # m, standstill gap to virtual leaders (stop lines, yielding)
    horizon: float = 60.0                       # m, conflicts and stop lines further ahead are ignored
    decision_time: float = 4.0                  # s, zones count once this close (or braking needs it)
    conflict_radius: float = 3.0                # m, routes closer than this (not head-on) share a zone
    conflict_step: float = 4.0                  # m, route sampling for conflicts (< 2 * radius / sqrt 2)
    conflict_length: float = 160.0              # m, conflicts are searched on the first part of each route
    neighbours: int = 12                        # nearest agents projected onto my route each step
    window: tuple = (-12, 60, 4)                # route-window points (from, to, step) in route points (~m)


def _along(x, idx):
    """x [B, A, P] or [B, A, P, D] read along the route points P at idx [B, A, *I]
    -> [B, A, *I] or [B, A, *I, D]."""
    flat = idx.flatten(2)                                                 # [B, A, I]
    if x.dim() == 3:
        return x.gather(2, flat).view(idx.shape)
    D = x.shape[-1]
    return x.gather(2, flat.unsqueeze(-1).expand(*flat.shape, D)).view(*idx.shape, D)


def _first_true(m):
    """Index of the first True along the last dim (0 where none) and whether there is one."""
    any_ = m.any(-1)
    return torch.where(any_, m.float().argmax(-1), torch.zeros_like(any_, dtype=torch.long)), any_


def idm_term(v, v_lead, gap, s0, T, a_max, b):
    """(s* / g)^2 of IDM, the braking share of one leader: s* = s0 + max(0, v T + v dv / (2 sqrt(a b)))."""
    s_star = s0 + (v * T + v * (v - v_lead) / (2.0 * torch.sqrt(a_max * b))).clamp(min=0.0)
    return (s_star / gap.clamp(min=0.05)) ** 2


# --------------------------------------------------------------------------------------------
# Static route geometry (once per batch)
# --------------------------------------------------------------------------------------------
def _scene_conflicts(rp, rs, tang, n_pts, L, W, cfg: DriverConfig):
    """Conflict zones between the routes of one scene: rp [A, P, 2], rs [A, P], tang [A, P, 2],
    n_pts [A] valid route points, L, W [A] box sizes. Pair (i, j) conflicts when i's route comes
    within conflict_radius of j's (not head-on), unless one route starts on the other in the same
    direction (then they share a lane: that is car following, not a conflict).

    Returns, seen from i (all [A, A]): conf; sc, the arc length where i's centre must wait: the
    last route point before the zone where i's box, turned as it is there, clears j's path
    (distance >= 0.5 L_i |sin| + 0.5 W_i |cos| + 0.5 W_j + margin); so, where i leaves the zone; and
    turn, the heading change of i's route around the zone (turning and merging routes yield)."""
    A, P = rp.shape[:2]
    dev = rp.device
    conf = torch.zeros(A, A, dtype=torch.bool, device=dev)
    sc, so, turn = (torch.zeros(A, A, device=dev) for _ in range(3))
    real = (n_pts >= 2).nonzero().squeeze(1)                              # [n]
    n = real.numel()
    if n < 2:
        return conf, sc, so, turn
    ds = float((rs[real, 1] - rs[real, 0]).clamp(min=0.1).min())
    stride = max(1, round(cfg.conflict_step / ds))
    ci = torch.arange(0, min(P, int(cfg.conflict_length / ds) + 1), stride, device=dev)  # [C]
    C = ci.numel()
    X, U, S = rp[real][:, ci], tang[real][:, ci], rs[real][:, ci]         # [n, C, 2], [n, C, 2], [n, C]
    V = ci.unsqueeze(0) < n_pts[real].unsqueeze(1)                        # [n, C]
    nv = V.sum(1)                                                         # [n]
    D = torch.cdist(X.reshape(-1, 2), X.reshape(-1, 2)).view(n, C, n, C)  # [n, C, n, C]
    D = torch.where(V.view(1, 1, n, C), D, torch.full_like(D, math.inf))
    dmin, q = D.min(3)                                                    # [n(i), C, n(j)] nearest on j
    q_ij = q.transpose(1, 2).unsqueeze(-1).expand(n, n, C, 2)             # [n(i), n(j), C, 2]
    Uq = U.unsqueeze(0).expand(n, n, C, 2).gather(2, q_ij)                # [n(i), n(j), C, 2]
    Uq = Uq.transpose(1, 2)                                               # [n(i), C, n(j), 2] j's heading
    cos = (U.unsqueeze(2) * Uq).sum(-1)                                   # [n, C, n]
    sin = cross2(U.unsqueeze(2), Uq).abs()                                # [n, C, n]
    # crossing (> 20 degrees) within conflict_radius, or nearly parallel but closer than 2 m (merging);
    # parallel paths further apart (lanes, sidewalks) are neighbours, not conflicts
    near = ((dmin < cfg.conflict_radius) & (sin > 0.34) | (dmin < 2.0)) & (cos > -0.87) & V.unsqueeze(-1)
    near = near.transpose(1, 2)                                           # [n(i), n(j), C]
    # how far i's box must stay from j's route (+ the error of measuring it between 4 m samples)
    Li, Wi, Wj = L[real].view(n, 1, 1), W[real].view(n, 1, 1), W[real].view(1, 1, n)
    need = 0.5 * Li * sin + 0.5 * Wi * cos.abs() + 0.5 * Wj + 0.3 + 0.7  # [n, C, n]
    clear = (dmin >= need).transpose(1, 2)                                # [n(i), n(j), C]
    # does i's route start on j's lane? distance of i's first point to j's polyline, same heading
    a, ab = X[:, :-1], X[:, 1:] - X[:, :-1]                               # [n, C-1, 2]
    qa = X[:, 0].view(n, 1, 1, 2) - a.unsqueeze(0)                        # [n(i), n(j), C-1, 2]
    t = ((qa * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-6)).clamp(0.0, 1.0)  # [n, n, C-1]
    d0 = (qa - t.unsqueeze(-1) * ab).norm(dim=-1)                         # [n, n, C-1]
    d0 = torch.where(V[:, 1:].unsqueeze(0), d0, torch.full_like(d0, math.inf))
    dst, k0 = d0.min(-1)                                                  # [n, n]
    k0_ij = k0.view(n, n, 1, 1).expand(n, n, 1, 2)                        # [n, n, 1, 2]
    Uk = U.unsqueeze(0).expand(n, n, C, 2).gather(2, k0_ij).squeeze(2)    # [n, n, 2]
    same = (U[:, 0].unsqueeze(1) * Uk).sum(-1)                            # [n, n] cos of the headings there
    start_on = (dst < 1.0) & (same > 0.7)                                 # [n, n]
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    first, has = _first_true(near)                                        # [n, n]
    c = has & ~start_on & ~start_on.T & ~eye                              # [n, n]
    k = torch.arange(C, device=dev)                                       # [C]
    none = torch.full_like(clear, -1, dtype=torch.long)                   # [n, n, C]
    wait = torch.where(clear & (k < first.unsqueeze(-1)), k, none).amax(-1)  # [n, n]
    gone, more = _first_true(~near & (k > first.unsqueeze(-1)))           # [n, n]
    last = torch.where(more, gone - 1, (nv - 1).unsqueeze(1).expand(n, n))  # [n, n]
    Sx = S.unsqueeze(1).expand(n, n, C)                                   # [n, n, C]
    s_first = Sx.gather(2, first.unsqueeze(-1)).squeeze(-1)               # [n, n]
    s_wait = torch.where(wait >= 0, Sx.gather(2, wait.clamp(min=0).unsqueeze(-1)).squeeze(-1),
                         S[:, :1] - 1.0)                                  # [n, n]
    s_out = torch.minimum(Sx.gather(2, last.clamp(min=0).unsqueeze(-1)).squeeze(-1), s_first + 8.0)
    h = max(1, round(15.0 / (stride * ds)))                               # coarse points in 15 m
    psi = torch.atan2(U[..., 1], U[..., 0]).unsqueeze(1).expand(n, n, C)  # [n, n, C]
    hi = torch.minimum(first + h, (nv - 1).unsqueeze(1))                  # [n, n]
    lo = (first - h).clamp(min=0)
    tr = wrap_angle(psi.gather(2, hi.unsqueeze(-1))
                    - psi.gather(2, lo.unsqueeze(-1))).squeeze(-1).abs()  # [n, n]
    ij = (real.view(-1, 1), real.view(1, -1))
    conf[ij], sc[ij], so[ij], turn[ij] = c, s_wait, s_out, tr
    return conf, sc, so, turn


def _scene_stop_lines(rp, rs, n_pts, a, b):
    """Arc length where each route of one scene first crosses a stop line (segment a -> b, [M, 2]),
    inf if none: rp [A, P, 2], rs [A, P], n_pts [A] -> [A]."""
    out = torch.full(rp.shape[:1], math.inf, device=rp.device)           # [A]
    if a.shape[0] == 0:
        return out
    p0, p1 = rp[:, :-1, None], rp[:, 1:, None]                            # [A, P-1, 1, 2]
    o1 = cross2(p1 - p0, a - p0) * cross2(p1 - p0, b - p0)                # [A, P-1, M] a, b on both sides
    o2 = cross2(b - a, p0 - a) * cross2(b - a, p1 - a)                    # [A, P-1, M] p0, p1 on both sides
    k = torch.arange(rp.shape[1] - 1, device=rp.device)                   # [P-1]
    hit = ((o1 < 0) & (o2 < 0)).any(-1) & (k < (n_pts - 1).unsqueeze(1))  # [A, P-1]
    idx, any_hit = _first_true(hit)                                       # [A]
    return torch.where(any_hit, rs.gather(1, idx.unsqueeze(1)).squeeze(1), out)


def _scene_adjacency(rp, tang, n_pts, lane_mid, lane_dir, cfg: DriverConfig, step: int):
    """Offsets of the neighbouring same-direction lanes along each route of one scene, every
    `step` route points: [A, P // step, 2] (left offset > 0, right offset < 0, 0 = no lane). A
    neighbour counts only if it goes on for the next 40 m (or to the route's end)."""
    A, P = rp.shape[:2]
    ci = torch.arange(0, P, step, device=rp.device)                       # [C]
    out = torch.zeros(A, ci.numel(), 2, device=rp.device)                 # [A, C, 2]
    if lane_mid.shape[0] == 0:
        return out
    X, U = rp[:, ci], tang[:, ci]                                         # [A, C, 2]
    N = torch.stack([-U[..., 1], U[..., 0]], -1)                          # [A, C, 2] left normal
    V = ci.unsqueeze(0) < n_pts.unsqueeze(1)                              # [A, C]
    lam = 3.0   # heading weight: a lane pointing 20 degrees away counts as 1 m further
    lanes = torch.cat([lane_mid, lam * lane_dir], -1)                     # [S, 4]
    ahead = max(1, int(40.0 / step))
    for side, col in ((1.0, 0), (-1.0, 1)):
        q = torch.cat([X + side * cfg.lane_width * N, lam * U], -1)       # [A, C, 4]
        d = torch.cdist(q.reshape(-1, 4), lanes)                          # [A*C, S]
        dmin, best = d.min(-1)                                            # [A*C]
        off = ((lane_mid[best] - X.reshape(-1, 2)) * N.reshape(-1, 2)).sum(-1)  # [A*C]
        ok = (dmin < 1.2) & (side * off > 2.5) & (side * off < 5.0)
        ok = ok.view(A, -1) & V                                           # [A, C]
        bad = (~ok & V).float()                                           # [A, C]
        cs = torch.cat([torch.zeros(A, 1, device=rp.device), bad.cumsum(1)], 1)  # [A, C+1]
        j = torch.arange(ci.numel(), device=rp.device)                    # [C]
        bad_ahead = cs[:, (j + ahead + 1).clamp(max=ci.numel())] - cs[:, j]  # [A, C]
        out[..., col] = torch.where(ok & (bad_ahead == 0), off.view(A, -1), torch.zeros_like(bad))
    return out


# My K nearest agents seen from my route (step 1), all [B, A, K]: along-route distance ds, lateral
# offset e (and e_soon, in 1 s), half extents along (hl) and across (hw) my route, the bumper-to-bumper
# gap, the IDM braking term each imposes as my leader, oncoming, ok (present, inside my route window),
# and their own v, s0, T, a_max, b (for them as my follower).
_Neighbours = namedtuple("_Neighbours", "ds e hl hw e_soon gap term oncoming ok v s0 T a_max b")


class HumanDriver:
    """The stochastic closed-loop driver of a batch of scenes (maybe [B*R] repeated scenes).

    act(pos [B, A, 2], yaw [B, A], speed [B, A], active [B, A] bool, t) -> (accel [B, A], steer [B, A])
    Agents without a route (e.g. WOMD scenes) and inactive agents get zero actions."""

    EXTEND = 60   # route points appended straight past each route's end: agents keep going off the map

    def __init__(self, scenes: Scenes, cfg: DriverConfig = DriverConfig(),
                 generator: torch.Generator | None = None):
        self.cfg, self.gen = cfg, generator
        dev = scenes.device
        self.B, self.A = scenes.B, scenes.A
        typ = scenes.agent_type.clamp(0, 2)
        per_type = lambda v: torch.tensor(v, device=dev, dtype=torch.float32)[typ]  # [B, A]
        self.is_ped, self.is_veh = typ == PED, typ == VEH
        self.L, self.W = scenes.size[..., 0].clamp(min=0.3), scenes.size[..., 1].clamp(min=0.3)  # [B, A]
        st = scenes.style
        self.v0, self.T = st[..., 0].clamp(min=0.01), st[..., 1].clamp(min=0.3)  # [B, A]
        self.s0, self.b = st[..., 2].clamp(min=0.2), st[..., 3].clamp(min=0.5)  # [B, A]
        self.a_max, self.a_min = per_type(cfg.a_max), per_type(cfg.a_min)
        self.steer_max, self.l_min = per_type(cfg.steer_max), per_type(cfg.preview_min)
        self.lat_acc = per_type(cfg.lat_accel)
        self.sig_a, self.sig_k = per_type(cfg.accel_noise), per_type(cfg.curv_noise)
        self.half = 0.5 * self.W + torch.where(self.is_ped, 0.1, 0.3)      # [B, A] half lane band (+ margin)

        # ---- routes, extended straight past their end --------------------------------------
        rv = scenes.route_valid
        n_pts = rv.sum(-1)                                                 # [B, A]
        self.has_route = n_pts >= 2
        last = (n_pts - 1).clamp(min=1)                                    # [B, A]
        r = scenes.route.float()                                           # [B, A, P0, 2]
        r = torch.cat([r, r[:, :, -1:].expand(-1, -1, self.EXTEND, -1)], 2)  # [B, A, P, 2]
        P = r.shape[2]
        k = torch.arange(P, device=dev).view(1, 1, P)                      # [1, 1, P]
        p_last = _along(r, last.unsqueeze(-1)).squeeze(2)                   # [B, A, 2]
        d_last = p_last - _along(r, (last - 1).unsqueeze(-1)).squeeze(2)    # [B, A, 2] last step, repeated
        past = (k - last.unsqueeze(-1)).clamp(min=0).unsqueeze(-1)         # [B, A, P, 1] steps past the end
        ext = p_last.unsqueeze(2) + past * d_last.unsqueeze(2)             # [B, A, P, 2]
        self.rp = torch.where((k <= last.unsqueeze(-1)).unsqueeze(-1), r, ext)  # [B, A, P, 2]
        seg = self.rp[:, :, 1:] - self.rp[:, :, :-1]                       # [B, A, P-1, 2]
        seg_len = seg.norm(dim=-1).clamp(min=1e-3)                         # [B, A, P-1]
        tang = seg / seg_len.unsqueeze(-1)                                 # [B, A, P-1, 2]
        self.tang = torch.cat([tang, tang[:, :, -1:]], 2)                  # [B, A, P, 2] segment k -> k+1
        self.seg_len = torch.cat([seg_len, seg_len[:, :, -1:]], 2)         # [B, A, P]
        self.rs = torch.cat([torch.zeros_like(seg_len[:, :, :1]), seg_len.cumsum(2)], 2)  # [B, A, P] arc len
        self.psi = torch.atan2(self.tang[..., 1], self.tang[..., 0])       # [B, A, P]
        dpsi = wrap_angle(self.psi[:, :, 1:] - self.psi[:, :, :-1]) / self.seg_len[:, :, 1:]  # [B, A, P-1]
        kap = torch.cat([torch.zeros_like(dpsi[:, :, :1]), dpsi], 2)       # [B, A, P] curvature at point k
        kernel = torch.full((1, 1, 5), 0.2, device=dev)
        kap = torch.nn.functional.conv1d(kap.reshape(-1, 1, P), kernel, padding=2)  # [B*A, 1, P]
        self.kap = kap.view(self.B, self.A, P)                             # [B, A, P]
        self.n_pts = torch.where(self.has_route, n_pts, torch.zeros_like(n_pts))

        # ---- per scene: stop lines on each route, conflict zones, neighbouring lanes ----------
        self.s_stop = torch.full((self.B, self.A), math.inf, device=dev)   # [B, A] arc length of my stop line
        stop = (scenes.seg_code == STOP_SIGN_CODE) & (scenes.seg_type == OTHER) & scenes.seg_valid  # [B, S]
        self.conf = torch.zeros(self.B, self.A, self.A, dtype=torch.bool, device=dev)  # [B, A, A]
        self.sc, self.so, self.turn = (torch.zeros(self.B, self.A, self.A, device=dev) for _ in range(3))
        self.adj_step = 8
        C = (P + self.adj_step - 1) // self.adj_step
        self.adj = torch.zeros(self.B, self.A, C, 2, device=dev)           # [B, A, C, 2]
        is_lane = (scenes.seg_type == LANE) & scenes.seg_valid             # [B, S]
        mid = 0.5 * (scenes.seg_start[..., :2] + scenes.seg_end[..., :2])  # [B, S, 2]
        sdir = scenes.seg_end[..., :2] - scenes.seg_start[..., :2]         # [B, S, 2]
        sdir = sdir / sdir.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        ids = list(scenes.scene_id) if len(scenes.scene_id) == self.B else [None] * self.B
        done = {}
        for b in range(self.B):   # once per distinct scene: repeated rollouts share the work
            key = ids[b]
            if key is not None and key in done and torch.equal(scenes.route[b], scenes.route[done[key]]):
                src = done[key]
                for x in (self.s_stop, self.conf, self.sc, self.so, self.turn, self.adj):
                    x[b] = x[src]
                continue
            done[key if key is not None else ("#", b)] = b
            if not bool(self.has_route[b].any()):
                continue
            n_b = self.n_pts[b]
            self.s_stop[b] = _scene_stop_lines(self.rp[b], self.rs[b], n_b, scenes.seg_start[b, stop[b], :2],
                                               scenes.seg_end[b, stop[b], :2])
            self.conf[b], self.sc[b], self.so[b], self.turn[b] = _scene_conflicts(
                self.rp[b], self.rs[b], self.tang[b], n_b, self.L[b], self.W[b], cfg)
            veh = (self.is_veh[b] & self.has_route[b]).nonzero().squeeze(1)  # lane changes: vehicles only
            lane = is_lane[b]
            if veh.numel():
                self.adj[b, veh] = _scene_adjacency(self.rp[b, veh], self.tang[b, veh], n_b[veh],
                                                    mid[b][lane], sdir[b][lane], cfg, self.adj_step)
        # pedestrians pass each other on their own (the IDM band keeps them apart): no zones between them
        self.conf &= ~(self.is_ped.unsqueeze(2) & self.is_ped.unsqueeze(1))
        # static parts of the priority rule: pedestrians first, then routes without a stop line before
        # the zone, then the route that turns less; and the length my body needs to clear a zone
        stop_to_zone = self.sc - self.s_stop.unsqueeze(2)                  # [B, A, A]
        minor = (self.s_stop.unsqueeze(2) <= self.sc + 2.0) & (stop_to_zone < 40.0)  # [B, A, A]
        rank = torch.where(self.is_ped.unsqueeze(2), 0, 1 + minor.long())  # [B, A, A]
        self.rank = 100.0 * rank + 10.0 * (self.turn > self.turn.transpose(1, 2) + 0.15).float()  # [B, A, A]
        # my centre's way from the waiting point until my rear is clear
        self.body = (self.so - self.sc).clamp(min=0.0) + 0.5 * self.L.unsqueeze(2)  # [B, A, A]
        self.so_other = self.so.transpose(1, 2) + 0.5                      # [B, A, A] the other cleared past

        lo, hi, step = cfg.window
        self.win = torch.arange(lo, hi + 1, step, device=dev)              # [W]
        self.coarse = 8
        self.rp_coarse = self.rp[:, :, ::self.coarse].contiguous()         # [B, A, P/8, 2]

    # ---- helpers -------------------------------------------------------------------------------
    def _randn(self, shape, device):
        g = self.gen
        return torch.randn(shape, generator=g, device=g.device if g is not None else device).to(device)

    def _rand(self, shape, device):
        g = self.gen
        return torch.rand(shape, generator=g, device=g.device if g is not None else device).to(device)

    def _project(self, pos):
        """Arc length s, lateral offset e (left +), route heading and curvature at my projection,
        and the index j of the route segment I am on. pos [B, A, 2] -> [B, A] each. The nearest
        route point is found coarse (every 8th point) then fine around it."""
        P, c = self.rp.shape[2], self.coarse
        sq = lambda d: d[..., 0] ** 2 + d[..., 1] ** 2
        kc = sq(self.rp_coarse - pos.unsqueeze(2)).argmin(-1, keepdim=True) * c  # [B, A, 1]
        idx = (kc + torch.arange(-c, c + 1, device=pos.device)).clamp(0, P - 1)  # [B, A, 2c+1]
        k = idx.gather(2, sq(_along(self.rp, idx) - pos.unsqueeze(2)).argmin(-1, keepdim=True))  # [B, A, 1]
        behind = ((pos.unsqueeze(2) - _along(self.rp, k)) * _along(self.tang, k)).sum(-1) < 0  # [B, A, 1]
        j = (k - behind.long()).clamp(min=0)                               # [B, A, 1]
        a, u = _along(self.rp, j).squeeze(2), _along(self.tang, j).squeeze(2)  # [B, A, 2]
        ln = _along(self.seg_len, j).squeeze(-1)                            # [B, A]
        rel = pos - a                                                      # [B, A, 2]
        t = (rel * u).sum(-1)                                              # [B, A]
        # extrapolate before the route's start, clamp to the segment elsewhere
        t = torch.where(j.squeeze(-1) == 0, torch.minimum(t, ln),
                        torch.minimum(t.clamp(min=0.0), ln))               # [B, A]
        s = _along(self.rs, j).squeeze(-1) + t                              # [B, A]
        f = (t / ln).clamp(0.0, 1.0)
        kap_next = _along(self.kap, (j + 1).clamp(max=P - 1)).squeeze(-1)  # [B, A]
        kap = (1 - f) * _along(self.kap, j).squeeze(-1) + f * kap_next     # [B, A]
        return s, cross2(u, rel), _along(self.psi, j).squeeze(-1), kap, j.squeeze(-1)

    def _in_route_frame(self, q, yaw_q, j, s):
        """Points q [B, A, K, 2] (my neighbours, heading yaw_q [B, A, K]) seen in my route frame
        through a window of my route points: along-route distance ds, lateral offset e, heading
        relative to my route there, and whether the projection fell inside the window -> [B, A, K]."""
        B, A, K = q.shape[:3]
        P, W = self.rp.shape[2], self.win.numel()
        widx = (j.unsqueeze(-1) + self.win).clamp(0, P - 1)               # [B, A, W]
        wp, ws = _along(self.rp, widx), _along(self.rs, widx)                # [B, A, W, 2], [B, A, W]
        wu = torch.cat([wp[:, :, 1:] - wp[:, :, :-1], wp[:, :, -1:] - wp[:, :, -2:-1]], 2)  # [B, A, W, 2]
        wl = wu.norm(dim=-1).clamp(min=1e-3)                               # [B, A, W]
        wu = wu / wl.unsqueeze(-1)
        # the nearest window point
        m = torch.cdist(q.flatten(0, 1), wp.flatten(0, 1)).argmin(-1).view(B, A, K)  # [B, A, K]
        behind = ((q - _along(wp, m)) * _along(wu, m)).sum(-1) < 0           # [B, A, K]
        m = (m - behind.long()).clamp(0, W - 1)                            # [B, A, K]
        a, u, ln = _along(wp, m), _along(wu, m), _along(wl, m)             # [B, A, K, 2], [.., 2], [B, A, K]
        rel = q - a                                                        # [B, A, K, 2]
        t_raw = (rel * u).sum(-1)                                          # [B, A, K]
        inside = ((m > 0) | (t_raw >= 0)) & ((m < W - 2) | (t_raw <= ln))
        ds = _along(ws, m) + t_raw.clamp(min=0.0) - s.unsqueeze(-1)         # [B, A, K]
        dpsi = wrap_angle(yaw_q - torch.atan2(u[..., 1], u[..., 0]))       # [B, A, K]
        return ds, cross2(u, rel), dpsi, inside

    # ---- one decision, step by step (the numbers are the module docstring's) ----------------------
    def _neighbours(self, pos, yaw, v, pair_ok, j, s) -> _Neighbours:
        """Step 1: my K nearest agents projected onto a window of my route, their extents, gaps and
        the IDM braking term each would impose as my leader."""
        cfg, A = self.cfg, pos.shape[1]
        inf = torch.full_like(pair_ok, math.inf, dtype=pos.dtype)          # [B, A, A]
        dist = torch.where(pair_ok, torch.cdist(pos, pos), inf)             # [B, A, A]
        dk, nb = dist.topk(max(1, min(cfg.neighbours, A - 1)), dim=-1, largest=False)  # [B, A, K]
        feats = torch.stack([pos[..., 0], pos[..., 1], yaw, self.L, self.W, v,
                             self.s0, self.T, self.a_max, self.b], -1)      # [B, A, 10]
        xj, yj, yawj, Lj, Wj, vj, s0j, Tj, amaxj, bj = gather_rows(feats, nb).unbind(-1)  # [B, A, K] each
        ds, ej, dpsi, inside = self._in_route_frame(torch.stack([xj, yj], -1), yawj, j, s)  # [B, A, K]
        cos_d, sin_d = dpsi.cos(), dpsi.sin()
        hl = 0.5 * Lj * cos_d.abs() + 0.5 * Wj * sin_d.abs()              # [B, A, K] half extent along
        hw = 0.5 * Lj * sin_d.abs() + 0.5 * Wj * cos_d.abs()              # [B, A, K] half extent across
        gap = ds - 0.5 * self.L.unsqueeze(-1) - hl                         # [B, A, K] bumper to bumper
        term = idm_term(v.unsqueeze(-1), (vj * cos_d).clamp(min=0.0), gap, self.s0.unsqueeze(-1),
                        self.T.unsqueeze(-1), self.a_max.unsqueeze(-1), self.b.unsqueeze(-1))  # [B, A, K]
        e_soon = ej + vj * sin_d * 1.0                                     # [B, A, K] lateral position in 1 s
        return _Neighbours(ds, ej, hl, hw, e_soon, gap, term, cos_d < -0.5, torch.isfinite(dk) & inside,
                           vj, s0j, Tj, amaxj, bj)

    def _band(self, nb: _Neighbours, lo, hi):
        """Neighbours overlapping the lateral band [lo, hi] of my route now [B, A, K], the
        strongest IDM braking term from those ahead (now or in 1 s) [B, A], and whether one is
        alongside [B, A]. Oncoming agents count only if they really overlap (people pass)."""
        lo, hi = lo.unsqueeze(-1), hi.unsqueeze(-1)                        # [B, A, 1]
        now = nb.ok & (nb.e + nb.hw > lo) & (nb.e - nb.hw < hi)            # [B, A, K]
        now &= ~nb.oncoming | ((nb.e - 0.5 * (lo + hi)).abs() < nb.hw + 0.5 * (hi - lo) - 0.3)
        soon = nb.ok & (nb.e_soon + nb.hw > lo) & (nb.e_soon - nb.hw < hi) & (nb.gap < 30.0) & ~nb.oncoming
        ahead = (nb.ds > 0) & (now | soon)                                 # [B, A, K]
        term = torch.where(ahead, nb.term, torch.zeros_like(nb.term)).amax(-1)  # [B, A]
        side = (now & (nb.ds.abs() < 0.5 * self.L.unsqueeze(-1) + nb.hl + 1.0)).any(-1)  # [B, A]
        return now, term, side

    def _current_lane(self, e, theta, v, j, ell):
        """Step 5, from the pose: my lane's offset c_off [B, A], the lanes left and right of it (NaN
        where none), the target e*: mine unless I lean towards a neighbour (a change in progress),
        and whether I may start a new change."""
        cfg = self.cfg
        adj = _along(self.adj, (j // self.adj_step).unsqueeze(-1)).squeeze(2)  # [B, A, 2]
        off_l, off_r = adj[..., 0], adj[..., 1]                            # [B, A]
        has_l, has_r = off_l > 0.5, off_r < -0.5
        inf, nan, zero = torch.full_like(e, math.inf), torch.full_like(e, math.nan), torch.zeros_like(e)
        lanes = torch.stack([zero, torch.where(has_l, off_l, inf),
                             torch.where(has_r, off_r, inf)], -1)          # [B, A, 3]
        cur = (lanes - e.unsqueeze(-1)).abs().argmin(-1)                   # [B, A] 0 route, 1 left, 2 right
        c_off = lanes.gather(-1, cur.unsqueeze(-1)).squeeze(-1)            # [B, A]
        left_of = torch.where(cur == 0, torch.where(has_l, off_l, nan), torch.where(cur == 2, zero, nan))
        right_of = torch.where(cur == 0, torch.where(has_r, off_r, nan), torch.where(cur == 1, zero, nan))
        # half the lean that one step of a lane change produces
        lean = 0.5 * cfg.lane_width * (v.clamp(min=1.0) * DT) / ell ** 2   # [B, A]
        can = self.is_veh & self.has_route & (v > 3.0)
        lean_l = can & (theta.sin() > lean) & (e - c_off > -0.1) & ~left_of.isnan()
        lean_r = can & (theta.sin() < -lean) & (e - c_off < 0.1) & ~right_of.isnan()
        target = torch.where(lean_l, left_of, torch.where(lean_r, right_of, c_off))  # [B, A]
        return target, c_off, left_of, right_of, can & ~lean_l & ~lean_r

    def _lane_change(self, nb: _Neighbours, e, v, target, c_off, left_of, right_of, free, u_lc, u_side):
        """Step 5, new changes: towards a random side with a lane, at a Poisson rate raised by a
        MOBIL-like incentive (that lane is faster), if no new leader or follower must brake harder
        than safe_decel. A change in progress gives up if someone is alongside. -> e* [B, A]."""
        cfg, half = self.cfg, self.half
        _, term_cur, _ = self._band(nb, torch.minimum(e, target) - half, torch.maximum(e, target) + half)
        go_left = u_side < 0.5
        cand = torch.where(go_left, left_of, right_of)                     # [B, A]
        cand = torch.where(cand.isnan(), torch.where(go_left, right_of, left_of), cand)  # [B, A]
        maybe = free & ~cand.isnan()
        cand = torch.where(cand.isnan(), c_off, cand)
        now_new, term_new, side_new = self._band(nb, cand - half, cand + half)
        g_f = -nb.ds - 0.5 * self.L.unsqueeze(-1) - nb.hl                  # [B, A, K] gap to a new follower
        f_term = idm_term(nb.v, v.unsqueeze(-1), g_f, nb.s0, nb.T, nb.a_max, nb.b)  # [B, A, K]
        f_ok = (~(now_new & (nb.ds < 0)) | (nb.a_max * (1 - f_term) > -cfg.safe_decel)).all(-1)  # [B, A]
        safe = ~side_new & f_ok & (self.a_max * (1 - term_new) > -cfg.safe_decel)
        gain = self.a_max * (term_cur - term_new) > cfg.lane_change_incentive
        rate = (cfg.lane_change_rate + cfg.lane_change_gain * gain.float()
                + cfg.return_rate * (cand == 0).float())                   # [B, A]
        start = maybe & safe & (u_lc < 1 - torch.exp(-rate * DT))
        target = torch.where(start, cand, target)
        _, _, side_tgt = self._band(nb, target - half, target + half)
        return torch.where((target != c_off) & side_tgt & ~start, c_off, target)

    def _curve_speed(self, s, j):
        """Step 2, the desired speed capped by the curves ahead: v0 <= sqrt(a_lat / |kappa| + 2 b d)
        over the route window ahead (braking in time for a curve d metres away) -> [B, A]."""
        P = self.rp.shape[2]
        widx = (j.unsqueeze(-1) + self.win[self.win >= 0]).clamp(0, P - 1)  # [B, A, W']
        w_ds = (_along(self.rs, widx) - s.unsqueeze(-1)).clamp(min=0.0)    # [B, A, W']
        v_curve = torch.sqrt(self.lat_acc.unsqueeze(-1) / _along(self.kap, widx).abs().clamp(min=1e-4)
                             + 2 * self.b.unsqueeze(-1) * w_ds)            # [B, A, W']
        return torch.minimum(self.v0, v_curve.amin(-1))                    # [B, A]

    def _virtual_leader(self, v, gap):
        """Step 2, the IDM braking term of a stopped virtual leader `gap` metres ahead [B, A]."""
        stop_gap = torch.full_like(v, self.cfg.stop_gap)                   # [B, A]
        return idm_term(v, torch.zeros_like(v), gap, stop_gap, self.T, self.a_max, self.b)

    def _stop_line(self, s):
        """Step 2, rolling stop: is my stop line holding me (until my front is within 1 m), its gap."""
        d_stop = self.s_stop - s - 0.5 * self.L                            # [B, A]
        return torch.isfinite(d_stop) & (d_stop > 1.0) & (d_stop < self.cfg.horizon), d_stop

    def _gap_acceptance(self, s, v, pair_ok, noise_g):
        """Step 3 over all pairs (i = me = dim 1, o = other = dim 2): whether I must yield [B, A]
        and the gap to the waiting point before my first conflict zone ahead [B, A]."""
        cfg, A = self.cfg, s.shape[1]
        front = self.sc - s.unsqueeze(2)                                   # [B, A, A] me to my wait point
        front_o = front.transpose(1, 2)                                    # [B, A, A] the other's to its own
        cleared_o = (s - 0.5 * self.L).unsqueeze(1) > self.so_other        # its rear is past its exit
        inside_o = (front_o < 0) & ~cleared_o
        committed = front < 0.5
        vi, vo = v.unsqueeze(2), v.unsqueeze(1)                            # [B, A, 1], [B, 1, A]
        can_stop = vi ** 2 <= 3.0 * self.b.unsqueeze(2) * (front - cfg.yield_margin).clamp(min=0.05)
        t_arr = front.clamp(min=0.0) / vi.clamp(min=0.5)                   # [B, A, A]
        score = 1000.0 * can_stop.float() + self.rank + t_arr.clamp(max=9.9)  # lower goes first
        score_o = score.transpose(1, 2)
        idx = torch.arange(A, device=s.device)
        first_o = (score_o < score) | ((score_o == score) & (idx.view(1, 1, A) < idx.view(1, A, 1)))
        D = front.clamp(min=0.0) + self.body                               # [B, A, A] my way through the zone
        t_clear = D / torch.maximum(vi, torch.sqrt(0.5 * self.a_max.unsqueeze(2) * D)).clamp(min=0.5)
        t_o = torch.where(inside_o, torch.zeros_like(front_o), front_o.clamp(min=0.0) / vo.clamp(min=0.5))
        # the zone is shared in time unless the other arrives after I clear it (plus my accepted
        # gap g_crit, in s) or clears it before I arrive
        g_crit = (self.T + cfg.critical_gap + cfg.gap_noise * noise_g).clamp(min=0.5)[..., None]  # [B, A, 1]
        gap_ok = (t_o > t_clear + g_crit) | (t_clear.transpose(1, 2) + 1.0 < t_arr)
        # a zone matters once within decision_time at my speed, or my comfortable stopping distance
        reach = torch.maximum(vi * cfg.decision_time,
                              vi ** 2 / self.b.unsqueeze(2) + 10.0).clamp(max=cfg.horizon)  # [B, A, 1]
        live = self.conf & pair_ok & ~cleared_o & ~committed & (front < reach) & (front_o < cfg.horizon)
        must_yield = (live & (inside_o | (first_o & ~gap_ok))).any(-1)     # [B, A]
        ahead = self.conf & pair_ok & ~committed                           # [B, A, A]
        first_zone = torch.where(ahead, front, torch.full_like(front, math.inf)).amin(-1)  # [B, A]
        g_yield = first_zone - cfg.yield_margin                            # stop before my first zone ahead
        return must_yield & torch.isfinite(g_yield), g_yield

    def _idm_accel(self, v, v0, term, noise_a):
        """Steps 2 and 6: the IDM acceleration from the free-road part and the strongest braking
        term, plus white noise, within [a_min, 3] m/s^2 -> [B, A]."""
        free = self.a_max * (1 - (v / v0) ** 4)                            # [B, A]
        # no overshoot of v0 within a step (a parked agent stays parked), no harsh braking above it
        free = torch.where(v < v0, torch.minimum(free, (v0 - v) / DT),
                           torch.maximum(free, torch.maximum(-self.b, (v0 - v) / DT)))
        accel = free - self.a_max * term + self.sig_a * noise_a * v.clamp(max=1.0)  # [B, A]
        return torch.maximum(torch.minimum(accel, torch.full_like(accel, 3.0)), self.a_min)

    def _steer(self, e, target, theta, kap_r, ell, v, noise_k):
        """Steps 4 and 6: curvature feedforward + critically damped feedback to the target lane,
        plus white noise, inverted to the bicycle's steering angle within +-steer_max -> [B, A]."""
        cfg = self.cfg
        de = (e - target).clamp(-cfg.lane_width, cfg.lane_width)           # [B, A]
        noise = self.sig_k * noise_k * (v > 0.3).float()                   # [B, A]
        kappa = kap_r - de / ell ** 2 - 2 * cfg.damping * theta.sin() / ell + noise  # [B, A]
        x = (kappa * self.L).clamp(-1.9, 1.9)                              # [B, A]
        steer = torch.atan(x / torch.sqrt(1 - x ** 2 / 4))  # [B, A] inverts kappa = cos(beta) tan(delta) / L
        return torch.maximum(torch.minimum(steer, self.steer_max), -self.steer_max)

    def act(self, pos, yaw, speed, active, t: int = 0):
        """One 0.1 s decision for every agent from the physical state: pos [B, A, 2], yaw, speed
        [B, A], active [B, A] (agents present: obstacles and actors). t is the step index, unused:
        the driver is Markov. -> accel, steer [B, A], zero for inactive agents and agents without a
        route, for env.bicycle_step.

        The module docstring's steps, in order: my route frame and my neighbours in it (1); which
        lane: keep it, go on with a change, or start one (5); car following in my lane band and the
        curve speed (2); the stop line (2); gap acceptance at conflict zones (3); the IDM
        acceleration (2, 6); the steering (4, 6)."""
        B, A = pos.shape[:2]
        if (B, A) != (self.B, self.A):
            raise ValueError(f"HumanDriver.act: pos is [{B}, {A}, 2] but the driver was built for "
                             f"B={self.B}, A={self.A}")
        dev = pos.device
        v = speed.clamp(min=0.0)                                            # [B, A]
        # all the step's randomness, drawn first and in this order: a seed fixes every decision
        noise_a, noise_k, noise_g = self._randn((3, B, A), dev).unbind(0)  # [B, A] each
        u_lc, u_side = self._rand((B, A), dev), self._rand((B, A), dev)    # [B, A] each

        s, e, psi_r, kap_r, j = self._project(pos)                         # [B, A]
        theta = wrap_angle(yaw + torch.atan(0.5 * kap_r * self.L) - psi_r)  # [B, A] heading error (with slip)
        eye = torch.eye(A, dtype=torch.bool, device=dev)                   # [A, A]
        pair_ok = active.unsqueeze(1) & active.unsqueeze(2) & ~eye         # [B, A, A]
        nb = self._neighbours(pos, yaw, v, pair_ok, j, s)

        ell = torch.maximum(self.l_min, v * self.cfg.preview_time)         # [B, A] lateral preview length
        target, c_off, left_of, right_of, free = self._current_lane(e, theta, v, j, ell)
        target = self._lane_change(nb, e, v, target, c_off, left_of, right_of, free, u_lc, u_side)

        _, term, _ = self._band(nb, torch.minimum(e, target) - self.half,
                                torch.maximum(e, target) + self.half)      # [B, A]
        v0 = self._curve_speed(s, j)                                        # [B, A]
        at_stop, d_stop = self._stop_line(s)
        term = torch.where(at_stop, torch.maximum(term, self._virtual_leader(v, d_stop)), term)
        wait, g_yield = self._gap_acceptance(s, v, pair_ok, noise_g)
        term = torch.where(wait, torch.maximum(term, self._virtual_leader(v, g_yield)), term)

        accel = self._idm_accel(v, v0, term, noise_a)                       # [B, A]
        steer = self._steer(e, target, theta, kap_r, ell, v, noise_k)       # [B, A]
        go = active & self.has_route
        zero = torch.zeros_like(accel)
        return torch.where(go, accel, zero), torch.where(go, steer, zero)
