"""Realism metrics of the Waymo Open Sim Agents Challenge (WOSAC), in batched float32 torch.

Spec: ../shared/research/wosac.md (section numbers below refer to it). The idea: a simulator is
realistic if the *logged* future is likely under the distribution of its rollouts. For a scene with
evaluated objects i, future steps t and R rollouts:

  features (3.1-3.5)   f[i, t] for the log and f_r[i, t] for every rollout r
  histogram (4)        p_i(k) = (#{(r, t): bin(f_r[i, t]) = k} + 0.1) / (R * 80 + K * 0.1)
                       (one histogram per object pooling all R x 80 values: independent_timesteps)
  Bernoulli (4)        p_i(x) = (#{r: x_r[i] = x} + 0.001) / (R + 0.002),   x = any_t flag[i, t]
  likelihood (5)       L_f = exp( mean over valid (i, t) of log p_i(bin(f[i, t])) )
  realism meta metric  M = sum_f w_f L_f                  (weights of section 6, 2025 by default)

Features are computed on 91-step trajectories (log history 0..10 + the 80 simulated steps) and
scored on the 80 future steps for the evaluated objects; interactions see every sim agent (all
agents valid at step 10). The quirks of section 8 are part of the definition and are kept: NaN
kinematics at the ends go into the top bin, simulated values are never masked, ADE includes the
history, the TTC yaw difference is not wrapped, the traffic-light lane search uses `+` where a
distance needs `-`, the road-edge segment is picked in z-stretched 3D but its distance is 2D.

The geometry (rounded boxes of 3.2, signed distance to oriented road edges of 3.4, the pruned
nearest-segment searches) lives in geometry.py, shared with env.py; scoring's road-edge search
is road_edge_search.py (the same numbers, less work).

Deliberate deviations: the traffic-light lane search ignores the official "phantom" segment from
a lane's last point into its zero padding (it points at WOMD's global origin, which centred scenes
no longer have; see _red_light_violation). Float-level only: nearest segments are compared by
squared distance (rel_t via a reciprocal when scoring), and the TTC |cos|, |sin| of the heading
difference come from products of per-agent cos / sin; these can only reorder exact-rounding ties.
Invalid log steps hold whatever the Scenes hold (the loader writes 0), as the official code reads
whatever the proto holds; they only reach unmasked sim values through the history.

Speed: the road-edge search is pruned per row, box and corner (road_edge_search.py), the lane
search per row (geometry.nearest_segments); the interaction features only measure the pairs that
can be nearest and, for TTC, the (pair, step)s in the corridor ahead; padding slots cost nothing.
All exact (tested against the plain formulations in tests/test_speed_equivalence.py). Memory is
bounded by geometry.CHUNK elements per pairwise tensor.
"""
from __future__ import annotations

import math
import time

import torch

from geometry import (BIG, CHUNK, compact, div_no_nan, dot2, gather_rows, nearest_segments, relative_pose_cs,
                      road_edge_table, rounded_box_distance, take)
from road_edge_search import road_edge_distance
from scenes import DT, LANE, NOW, SURFACE_STREET_LANE, T, T_FUTURE, wrap_angle

# ---- constants of the official code (section numbers of wosac.md) ----------------------------
MAX_HEADING_DIFF = math.radians(75.0)          # TTC: other box roughly aligned (3.3)
MAX_HEADING_DIFF_SMALL_OVERLAP = math.radians(10.0)
SMALL_OVERLAP = 0.5               # m, lateral overlap below which the tighter heading rule applies
MAX_TTC = 5.0                     # s, MAXIMUM_TIME_TO_COLLISION
TL_STOP_STATES = (1, 4)           # ARROW_STOP, STOP (FLASHING_STOP = 7 does not count) (3.5)
VEHICLE = 0                       # agent_type of vehicles (scenes.AGENT_TYPES)
TRACK = 20                        # consecutive steps of one agent sharing one candidate search

# Section 6: (estimator, min, max, bins) per feature, and the meta-metric weights of each version.
FEATURES = ("linear_speed", "linear_acceleration", "angular_speed", "angular_acceleration",
            "distance_to_nearest_object", "collision_indication", "time_to_collision",
            "distance_to_road_edge", "offroad_indication", "traffic_light_violation")
BUCKETS = {"kinematic": FEATURES[0:4], "interactive": FEATURES[4:7], "map_based": FEATURES[7:10]}
_BINS_2024 = {"linear_speed": (0.0, 25.0, 10), "linear_acceleration": (-12.0, 12.0, 11),
              "angular_speed": (-0.628, 0.628, 11), "angular_acceleration": (-3.14, 3.14, 11),
              "distance_to_nearest_object": (-5.0, 40.0, 10), "time_to_collision": (0.0, 5.0, 10),
              "distance_to_road_edge": (-20.0, 40.0, 10)}
_BINS_2023 = {**_BINS_2024, "linear_speed": (0.0, 35.0, 10), "linear_acceleration": (-15.0, 15.0, 10),
              "angular_speed": (-31.5, 31.5, 10), "angular_acceleration": (-31.5, 31.5, 10)}
_W = lambda *w: dict(zip(FEATURES, w))
CONFIGS = {  # version -> (histogram bins, weights); the 2023 weights sum to 0.99, as officially
    "2025": (_BINS_2024, _W(0.05, 0.05, 0.05, 0.05, 0.10, 0.25, 0.10, 0.05, 0.25, 0.05)),
    "2024": (_BINS_2024, _W(0.05, 0.05, 0.05, 0.05, 0.10, 0.25, 0.10, 0.10, 0.25, 0.00)),
    "2023": (_BINS_2023, _W(0.09, 0.09, 0.09, 0.09, 0.09, 0.18, 0.09, 0.09, 0.18, 0.00)),
}
HIST_PSEUDOCOUNT = 0.1
BERNOULLI_PSEUDOCOUNT = 0.001



# ==============================================================================================
# Small helpers
# ==============================================================================================
def _finite(x: torch.Tensor) -> torch.Tensor:
    """Garbage (NaN/inf) in ignored entries must not poison min/argmin reductions."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)



# ==============================================================================================
# 3.1 Kinematic features
# ==============================================================================================
def central_diff(x: torch.Tensor) -> torch.Tensor:
    """cd(f)[t] = (f[t+1] - f[t-1]) / 2 along the last dim, NaN at both ends."""
    nan = torch.full_like(x[..., :1], math.nan)                           # [..., 1]
    return torch.cat([nan, (x[..., 2:] - x[..., :-2]) / 2, nan], dim=-1)  # [..., T]


def kinematic_features(x, y, z, yaw, dt: float = DT):
    """Linear speed (3D) and signed acceleration, angular speed and acceleration; all [..., T].
    The heading difference is wrapped over two steps: dh = wrap(h[t+1] - h[t-1]) / 2."""
    speed = torch.sqrt(central_diff(x) ** 2 + central_diff(y) ** 2 + central_diff(z) ** 2) / dt  # [..., T]
    accel = central_diff(speed) / dt                                      # [..., T]
    dh = wrap_angle(central_diff(yaw) * 2) / 2                            # [..., T] per step
    d2h = wrap_angle(central_diff(dh) * 2) / 2                            # [..., T]
    return speed, accel, dh / dt, d2h / dt ** 2


def kinematic_validity(valid: torch.Tensor):
    """Scoring masks of speeds and accelerations from valid [..., T] (compute_kinematic_validity):
    a central difference is valid when both neighbours are; False at both ends."""
    def central_and(v):
        no = torch.zeros_like(v[..., :1])                                 # [..., 1]
        return torch.cat([no, v[..., 2:] & v[..., :-2], no], dim=-1)      # [..., T]
    speed_valid = central_and(valid)
    return speed_valid, central_and(speed_valid)


# ==============================================================================================
# 3.2 / 3.3 Distance to the nearest object, collision, time to collision
# ==============================================================================================
def _interaction_features(pos, yaw, valid, size, speed, slots, slot_ok=None):
    """Distance to the nearest object and TTC of the slot agents against every agent.

    pos [B, R, A, T, 2], yaw/valid/speed [B, R, A, T] (valid already False for non-sim agents;
    speed: 2D central-difference speed), size [B, A, 3], slots [B, M] -> two [B, R, M, T].
    slot_ok [B, M] (optional): padding slots, which nobody reads, get BIG and 5 s without any work.

    Only the pairs that can matter are listed: (scene, slot, agent) with the agent valid somewhere
    in the scene (a sim agent) and not the slot's own agent. A WOMD batch pads A to its largest
    scene while most scenes hold far fewer sim agents, so this list is several times shorter than
    [B, M, A]. Every (rollout, step) is independent: they are the columns N = R T of [pairs, N]
    tensors, processed in chunks, reduced per (scene, slot) row with scatter_reduce."""
    B, R, A, Tn = yaw.shape
    M, N, dev = slots.shape[1], R * Tn, pos.device
    obstacle = valid.any(dim=3).any(dim=1)                                # [B, A] ever valid
    pair = obstacle.unsqueeze(1) & (slots.unsqueeze(-1) != torch.arange(A, device=dev))  # [B, M, A]
    if slot_ok is not None:
        pair = pair & slot_ok.unsqueeze(-1)                               # [B, M, A]
    pb, pm, pj = pair.nonzero(as_tuple=True)                              # [Np] each
    row = pb * M + pm                                                     # [Np] output row (scene, slot)
    gi = pb * A + slots[pb, pm]                                           # [Np] flat slot agent
    gj = pb * A + pj                                                      # [Np] flat other agent
    gs = (torch.arange(B, device=dev).unsqueeze(1) * A + slots).flatten()  # [B M] flat slot agents
    flat = lambda x: x.permute(0, 2, 1, 3).reshape(B * A, N)              # [B A, R T] agent-major
    X, Y, H, V, S = flat(pos[..., 0]), flat(pos[..., 1]), flat(yaw), flat(valid), flat(speed)
    C, Sn = torch.cos(H), torch.sin(H)                                    # [B A, N]
    L, W = size[..., 0].flatten(), size[..., 1].flatten()                 # [B A]
    # [Np, 1]
    Li, Wi, Lj, Wj = (v.index_select(0, g).unsqueeze(1) for v, g in ((L, gi), (W, gi), (L, gj), (W, gj)))
    Ri, Rj = 0.5 * torch.sqrt(Li ** 2 + Wi ** 2), 0.5 * torch.sqrt(Lj ** 2 + Wj ** 2)  # half diagonals
    ri, rj = 0.5 * torch.minimum(Li, Wi), 0.5 * torch.minimum(Lj, Wj)    # inscribed radii
    dist_out = pos.new_full((B * M, N), BIG)                              # [B M, N]
    ttc_out = pos.new_full((B * M, N), MAX_TTC)                           # [B M, N]
    step = max(1, CHUNK // max(1, pj.numel()))
    for n0 in range(0, N, step):
        c_ = slice(n0, min(N, n0 + step))
        Nc = c_.stop - n0
        pick = lambda Z, g: Z[:, c_].index_select(0, g)                   # [Np, Nc]
        rows = row.unsqueeze(1).expand(-1, Nc)                            # [Np, Nc]
        x, y, cos_d, sin_d = relative_pose_cs(pick(X, gi), pick(Y, gi), pick(C, gi), pick(Sn, gi),
                                              pick(X, gj), pick(Y, gj), pick(C, gj), pick(Sn, gj))  # [Np, Nc]
        Vj = pick(V, gj)                                                  # [Np, Nc]

        # 3.2: rounded-box distance, BIG for invalid boxes, min over the others. Exact d_ij is
        # only needed for the pairs that can be the minimum: a rounded box lies between the discs
        # of radius min(L, W)/2 and its half diagonal around its centre, so with centre distance
        # c: c - Ri - Rj <= d_ij <= c - ri - rj.
        ok = pick(V, gi) & Vj                                             # [Np, Nc]
        c = torch.sqrt(x * x + y * y)                                     # [Np, Nc]
        lb = torch.where(ok, c - Ri - Rj, math.inf)                       # [Np, Nc]
        ub = torch.where(ok, c - ri - rj, math.inf)                       # [Np, Nc]
        # [B M, Nc]
        bound = torch.full((B * M, Nc), math.inf, device=dev).scatter_reduce_(0, rows, ub, "amin")
        bound = bound.index_select(0, row)                                # [Np, Nc]
        p_, n_ = (ok & (lb <= bound + 1e-3 * (1.0 + bound.abs()))).nonzero(as_tuple=True)  # float32 margin
        d = rounded_box_distance(x[p_, n_], y[p_, n_], cos_d[p_, n_], sin_d[p_, n_], Li[p_, 0], Wi[p_, 0],
                                 Lj[p_, 0], Wj[p_, 0])                    # [Nm]
        dist = torch.full((B * M * Nc,), BIG, device=dev).scatter_reduce_(0, row[p_] * Nc + n_, d, "amin")
        dist_out[:, c_] = dist.view(B * M, Nc)

        # 3.3: the box ahead. Only pairs in the corridor ahead can be: lon > 0 needs x > L_i / 2 and
        # lat < 0 needs |y| < W_i / 2 + lat_off <= W_i / 2 + R_j (lat_off is at most the half
        # diagonal); the rest is never "ahead", so only the corridor's (pair, column)s are measured.
        reach = 0.5 * Wi + Rj                                             # [Np, 1]
        corridor = Vj & (x > 0.5 * Li - 1e-3) & (y.abs() < reach + 1e-3 * (1.0 + reach))  # [Np, Nc]
        p_, n_ = corridor.nonzero(as_tuple=True)                          # [Nt]
        x_, y_, Li_, Wi_, Lj_, Wj_ = x[p_, n_], y[p_, n_], Li[p_, 0], Wi[p_, 0], Lj[p_, 0], Wj[p_, 0]  # [Nt]
        Hc = H[:, c_].reshape(-1)                                         # [B A Nc]
        # yaw_diff is NOT wrapped (+179 deg vs -179 deg gives 358 deg: rejected); |cos|, |sin| of it
        # equal those of h_j - h_i, already at hand.
        yaw_diff = (Hc.index_select(0, gj[p_] * Nc + n_) - Hc.index_select(0, gi[p_] * Nc + n_)).abs()  # [Nt]
        ac, as_ = cos_d[p_, n_].abs(), sin_d[p_, n_].abs()                # [Nt]
        long_off = 0.5 * Lj_ * ac + 0.5 * Wj_ * as_                      # [Nt] other's nearest corner
        lat_off = 0.5 * Lj_ * as_ + 0.5 * Wj_ * ac                       # [Nt]
        lon = x_ - 0.5 * Li_ - long_off                                   # [Nt] ahead of ego's front
        lat = y_.abs() - 0.5 * Wi_ - lat_off                              # [Nt] < 0: overlap
        # ego validity unused
        ahead = ((lon > 0) & (yaw_diff <= MAX_HEADING_DIFF) & (lat < 0)  # [Nt]
                 & ((lat < -SMALL_OVERLAP) | (yaw_diff <= MAX_HEADING_DIFF_SMALL_OVERLAP)))
        key = (row[p_] * Nc + n_)[ahead]                                  # [Na] (scene slot, column)
        lon = lon[ahead]                                                  # [Na]
        gap = torch.full((B * M * Nc,), math.inf, device=dev).scatter_reduce_(0, key, lon, "amin")  # [B M Nc]
        # the nearest box ahead, the first agent on ties (as argmin over agents)
        j = torch.where(lon == gap.index_select(0, key), pj[p_][ahead], A)  # [Na]
        j = torch.full((B * M * Nc,), A, device=dev).scatter_reduce_(0, key, j, "amin").view(B * M, Nc)
        gap = gap.view(B * M, Nc)                                         # [B M, Nc]
        scene = (torch.arange(B * M, device=dev) // M).unsqueeze(1)       # [B M, 1]
        v_ahead = S[:, c_].gather(0, scene * A + j.clamp(max=A - 1))       # [B M, Nc]
        rel = S[:, c_].index_select(0, gs) - v_ahead                      # speed magnitudes, NaN -> 5
        # [B M, Nc]
        ttc = torch.where(rel > 0, torch.clamp(gap / rel, max=MAX_TTC), torch.full_like(rel, MAX_TTC))
        ttc_out[:, c_] = torch.where(j < A, ttc, MAX_TTC)                 # nothing ahead: 5 s
    unflat = lambda x: x.view(B, M, R, Tn).transpose(1, 2)                # [B, R, M, T]
    return unflat(dist_out), unflat(ttc_out)


# ==============================================================================================
# 3.5 Traffic-light violation
# ==============================================================================================
def _buggy_lane_distance(p, a, b):
    """The official lane-search 'distance' ||(p - a) + clip(rel_t)(b - a)|| (the `+` is the bug,
    copied for fidelity; a true distance has `-`). p, a, b [..., 2] broadcasting -> [...]."""
    pa, ab = p - a, b - a                                                 # [..., 2]
    rel_t = div_no_nan(dot2(pa, ab), dot2(ab, ab)).clamp(0.0, 1.0)    # [...]
    return (pa + ab * rel_t.unsqueeze(-1)).norm(dim=-1)


def _red_light_violation(scenes, pos, valid):
    """Per-step red-light violation (3.5) of agents with 91-step positions pos [B, R, M, T, 2] and
    validity valid [B, R, M, T] -> [B, R, M, 80] bool (future steps).

    Deviation: the official search also treats the segment from a lane's last point into its zero
    padding as a lane segment (validity is read from the start point only); it points at WOMD's
    global origin, which our centred scenes do not keep, so it is left out."""
    B, R, M = pos.shape[:3]
    out = torch.zeros(B, R, M, T_FUTURE, dtype=torch.bool, device=pos.device)  # [B, R, M, 80]
    if scenes.tl_lane.shape[1] == 0:
        return out                                                        # toy scenes: no lights
    has_tl = (scenes.tl_lane >= 0).any(1)                                 # [B]
    if not bool(has_tl.any()):
        return out                                                        # toy scenes: no lights
    bi = has_tl.nonzero()[:, 0]                                           # [B'] scenes with lights
    # [B', S]
    is_lane = ((scenes.seg_type == LANE) & (scenes.seg_code == SURFACE_STREET_LANE) & scenes.seg_valid)[bi]
    idx, ok = compact(is_lane)                                           # [B', Sl]
    if idx.shape[1] == 0:
        return out                                                        # no lanes -> all False
    la = gather_rows(scenes.seg_start[bi][..., :2], idx)                        # [B', Sl, 2]
    lb = gather_rows(scenes.seg_end[bi][..., :2], idx)                          # [B', Sl, 2]
    poly = torch.where(ok, scenes.seg_poly[bi].gather(1, idx), torch.full_like(idx, -2))  # [B', Sl]
    Bp, Sl = idx.shape

    # current lane of each object at steps NOW..90 (NOW is needed for the crossing at step 11);
    # each agent's 81 steps are searched as 9 rows of 9 points
    p = pos[bi][..., NOW:, :]                                             # [B', R, M, 81, 2]
    p3 = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1).reshape(Bp, -1, 9, 3)  # [B', R M 9, 9, 3]
    flat3 = lambda x: torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)  # [B', Sl, 3]
    seg = nearest_segments(p3, flat3(la), flat3(lb), ok, buggy=True)     # [B', R M 9, 9]
    lane = poly.gather(1, seg.reshape(Bp, -1)).view(Bp, R, M, T - NOW)    # [B', R, M, 81]

    # the stop point's segment in the signal's lane, per step (same buggy search)
    tl_lane = scenes.tl_lane[bi]                                          # [B', L]
    stop = scenes.tl_stop[bi][:, :, NOW:]                                 # [B', L, 81, 2]
    in_lane = (poly[:, None, :] == tl_lane[:, :, None]) & (tl_lane[:, :, None] >= 0)  # [B', L, Sl]
    L = in_lane.shape[1]
    own, own_ok = compact(in_lane.flatten(0, 1))                         # [B' L, P] the lane's segments
    own = own.view(Bp, L, -1)                                             # [B', L, P]
    own_a, own_b = gather_rows(la, own), gather_rows(lb, own)                         # [B', L, P, 2]
    d = _buggy_lane_distance(stop.unsqueeze(-2), own_a.unsqueeze(2), own_b.unsqueeze(2))  # [B', L, 81, P]
    d = torch.where(own_ok.view(Bp, L, 1, -1), d, torch.full_like(d, BIG))  # [B', L, 81, P]
    seg = own.unsqueeze(2).expand_as(d).gather(-1, d.argmin(-1, keepdim=True)).squeeze(-1)  # [B', L, 81]
    sa = gather_rows(la, seg)                                                   # [B', L, 81, 2]
    sb = gather_rows(lb, seg)                                                   # [B', L, 81, 2]
    ab = sb - sa                                                          # [B', L, 81, 2]
    len2 = dot2(ab, ab)                                                  # [B', L, 81]
    stop_t = div_no_nan(dot2(stop - sa, ab), len2).transpose(1, 2)      # [B', 81, L]
    P = pos[bi][..., NOW:, :].unsqueeze(-2)                               # [B', R, M, 81, 1, 2]
    sa_, ab_, len2_ = (x.transpose(1, 2)[:, None, None] for x in (sa, ab, len2))  # [B', 1, 1, 81, L, (2)]
    obj_t = div_no_nan(dot2(P - sa_, ab_), len2_)                       # [B', R, M, 81, L]
    behind = obj_t < stop_t[:, None, None]                                # [B', R, M, 81, L] strict: landing
    ahead = obj_t > stop_t[:, None, None]                                 # [B', R, M, 81, L]
    crossed = behind[..., :-1, :] & ahead[..., 1:, :]                     # [B', R, M, 80, L]
    state = scenes.tl_state[bi][:, :, NOW + 1:].transpose(1, 2)           # [B', 80, L]
    is_stop = (state == TL_STOP_STATES[0]) | (state == TL_STOP_STATES[1])  # [B', 80, L]
    lane_ok = in_lane.any(-1)                                             # [B', L]
    match = lane[..., 1:].unsqueeze(-1) == tl_lane[:, None, None, None]   # [B', R, M, 80, L]
    v = valid[bi][..., NOW + 1:].unsqueeze(-1)                            # [B', R, M, 80, 1]
    # [B', R, M, 80]
    out[bi] = (v & match & is_stop[:, None, None] & lane_ok[:, None, None, None] & crossed).any(-1)
    return out


# ==============================================================================================
# 2. Per-step features of 91-step trajectories
# ==============================================================================================
def _features(scenes, pos, z, yaw, valid, slots, table, slot_ok=None) -> dict:
    """Features of the slot agents slots [B, M] on the 80 future steps, from 91-step trajectories
    pos [B, R, A, T, 2], z/yaw/valid [B, R, A, T] (valid: False for agents that are not sim agents,
    so they are no obstacles). Returns a dict of [B, R, M, 80]. Padding slots (slot_ok [B, M] False)
    are only read through masks that exclude them: their interaction and road-edge values are
    placeholders (BIG, 5 s, -BIG) that cost nothing."""
    size = scenes.size                                                    # [B, A, 3]
    fut = slice(NOW + 1, T)
    e_pos, e_z, e_yaw, e_valid = (take(x, slots, 2) for x in (pos, z, yaw, valid))  # [B, R, M, T, (2)]
    # [B, R, M, T]
    speed, accel, ang_speed, ang_accel = kinematic_features(e_pos[..., 0], e_pos[..., 1], e_z, e_yaw)

    # TTC speeds are 2D (z = 0) central differences over the 91 steps: NaN at the last step -> 5 s
    speed2d = torch.sqrt(central_diff(pos[..., 0]) ** 2 + central_diff(pos[..., 1]) ** 2) / DT  # [B, R, A, T]
    dist, ttc = _interaction_features(pos[..., fut, :], yaw[..., fut], valid[..., fut], size,  # [B, R, M, 80]
                                      speed2d[..., fut], slots, slot_ok)

    # road edges of valid boxes only; invalid ones are queried on the scene's first road edge (a
    # place near the road keeps the pruning tight) and masked to -BIG afterwards
    B, R, M = e_z.shape[:3]
    fv = e_valid[..., fut]                                                # [B, R, M, 80]
    if slot_ok is not None:
        fv = fv & slot_ok[:, None, :, None]                               # [B, R, M, 80] padding: no search
    e_size = take(size, slots, 1)[:, None, :, None].expand(B, R, M, T_FUTURE, 3)  # [B, R, M, 80, 3]
    anchor = table["a"][:, 0] if table["a"].shape[1] else pos.new_zeros(B, 3)  # [B, 3]
    # [B, R, M, 80, 2]
    q_pos = torch.where(fv.unsqueeze(-1), e_pos[..., fut, :], anchor[:, None, None, None, :2])
    # [B, R, M, 80]
    q_z = torch.where(fv, e_z[..., fut], anchor[:, None, None, None, 2] + 0.5 * e_size[..., 2])
    q_yaw = torch.where(fv, e_yaw[..., fut], torch.zeros_like(q_z))      # [B, R, M, 80]
    road = road_edge_distance(q_pos.reshape(B, -1, 2), q_z.reshape(B, -1), q_yaw.reshape(B, -1),
                              e_size.reshape(B, -1, 3), table, track=TRACK)  # [B, R M 80]
    road = road.view(B, R, M, T_FUTURE)                                   # [B, R, M, 80]
    road = torch.where(fv, road, torch.full_like(road, -BIG))             # [B, R, M, 80]
    # padding slots stand still for the lane search: one point per row is a cheap search
    tl_pos = e_pos if slot_ok is None else torch.where(slot_ok[:, None, :, None, None], e_pos,
                                                       e_pos[..., NOW:NOW + 1, :])  # [B, R, M, T, 2]
    return {
        "linear_speed": speed[..., fut], "linear_acceleration": accel[..., fut],
        "angular_speed": ang_speed[..., fut], "angular_acceleration": ang_accel[..., fut],
        "distance_to_nearest_object": dist, "collision_per_step": dist < 0.0,
        "time_to_collision": ttc,
        "distance_to_road_edge": road, "offroad_per_step": road > 0.0,
        "traffic_light_violation_per_step": _red_light_violation(scenes, tl_pos, e_valid),
        "valid": e_valid[..., fut] if slot_ok is None else e_valid[..., fut] & slot_ok[:, None, :, None],
    }


def _sim_agent_trajectories(scenes, pos, z, yaw, valid):
    """Clean inputs: non-sim agents (invalid at NOW) are absent (invalid, zeros), garbage -> 0."""
    sim = scenes.valid[:, None, :, NOW, None]                             # [B, 1, A, 1]
    zero = lambda x, m: torch.where(m, _finite(x), torch.zeros_like(x))
    return (zero(pos, sim.unsqueeze(-1)), zero(z, sim), zero(yaw, sim), valid & sim)


def trajectory_features(scenes, pos, z, yaw, valid) -> dict:
    """Per-step WOSAC features of every agent from 91-step trajectories (section 2).

    pos [B, R, A, T, 2], z/yaw/valid [B, R, A, T] (R may be 1 for the log) -> dict of [B, R, A, 80]
    tensors for the future steps (index k is step 11 + k): linear_speed, linear_acceleration,
    angular_speed, angular_acceleration, distance_to_nearest_object, collision_per_step,
    time_to_collision, distance_to_road_edge, offroad_per_step, traffic_light_violation_per_step,
    and `valid`. Only sim agents (valid at step 10) are obstacles; other agents' rows are garbage."""
    _check_traj(pos, z, yaw, valid, scenes, T, "trajectory_features")
    pos, z, yaw, valid = _sim_agent_trajectories(scenes, pos.float(), z.float(), yaw.float(), valid.bool())
    slots = torch.arange(scenes.A, device=pos.device).expand(scenes.B, scenes.A)  # [B, A]
    return _features(scenes, pos, z, yaw, valid, slots, road_edge_table(scenes))


def _check_traj(pos, z, yaw, valid, scenes, steps, who):
    B, A = scenes.B, scenes.A
    if pos.dim() != 5 or pos.shape[0] != B or pos.shape[2] != A or pos.shape[3] != steps or pos.shape[4] != 2:
        raise ValueError(f"{who}: pos must be [B={B}, R, A={A}, {steps}, 2], got {tuple(pos.shape)}")
    for name, x in (("z", z), ("yaw", yaw)) + ((("valid", valid),) if valid is not None else ()):
        if tuple(x.shape) != tuple(pos.shape[:4]):
            raise ValueError(f"{who}: {name} must be {tuple(pos.shape[:4])}, got {tuple(x.shape)}")


# ==============================================================================================
# 4. Estimators
# ==============================================================================================
def _bin_index(x, lo: float, hi: float, K: int):
    """Histogram bin of each value: float32 linspace edges, clip to [lo, hi], searchsorted right - 1,
    clipped to [0, K-1]: an interior edge goes up, hi goes to the last bin, NaN to the last bin."""
    lo32, hi32 = (torch.tensor(v, dtype=torch.float32, device=x.device) for v in (lo, hi))
    delta = (hi32 - lo32) / K                                             # float32, as tf.linspace
    edges = lo32 + delta * torch.arange(K + 1, dtype=torch.float32, device=x.device)  # [K+1]
    edges[0], edges[-1] = lo32, hi32
    xc = x.clamp(lo, hi)                                                  # [...] NaN stays NaN
    idx = (torch.searchsorted(edges, xc.contiguous(), right=True) - 1).clamp(0, K - 1)  # [...]
    return torch.where(torch.isnan(xc), torch.full_like(idx, K - 1), idx)


def histogram_log_likelihood(log_values, sim_values, lo: float, hi: float, K: int,
                             pseudocount: float = HIST_PSEUDOCOUNT):
    """log p of each log value under one histogram per object pooling all R x T sim values
    (independent_timesteps, no masking, NaN -> top bin). log [B, M, T], sim [B, R, M, T] -> [B, M, T]."""
    B, R, M, Tn = sim_values.shape
    sim_bins = _bin_index(sim_values, lo, hi, K).transpose(1, 2).reshape(B, M, R * Tn)  # [B, M, R*T]
    counts = torch.zeros(B, M, K, device=sim_values.device).scatter_add_(
        -1, sim_bins, torch.ones_like(sim_bins, dtype=torch.float32))     # [B, M, K]
    log_p = torch.log((counts + pseudocount) / (R * Tn + K * pseudocount))  # [B, M, K]
    return log_p.gather(-1, _bin_index(log_values, lo, hi, K))            # [B, M, T]


def bernoulli_log_likelihood(log_flags, sim_flags, pseudocount: float = BERNOULLI_PSEUDOCOUNT):
    """log p of the log's flag under a 2-bin histogram of the R sim flags.
    log [B, M], sim [B, R, M] -> [B, M]."""
    R = sim_flags.shape[1]
    ones = sim_flags.float().sum(1)                                       # [B, M]
    p1 = (ones + pseudocount) / (R + 2 * pseudocount)                     # [B, M]
    p0 = (R - ones + pseudocount) / (R + 2 * pseudocount)                 # [B, M]
    return torch.log(torch.where(log_flags, p1, p0))


def _masked_mean(x, mask):
    """Mean over the valid entries of each scene (all but dim 0); 0/0 = NaN, as officially."""
    total = torch.where(mask, x, torch.zeros_like(x)).flatten(1).sum(1)  # [B]
    return total / mask.flatten(1).sum(1).to(x.dtype)


# ==============================================================================================
# 5. Scoring
# ==============================================================================================
def log_as_rollouts(scenes, R: int = 1):
    """The logged future as R identical rollouts: sim_pos [B, R, A, 80, 2], sim_z, sim_yaw [B, R, A, 80].
    Where the log is invalid, the agent holds its last valid pose (a rollout has no gaps)."""
    steps = torch.arange(T, device=scenes.pos.device)                     # [T]
    last = torch.where(scenes.valid, steps, torch.zeros_like(steps)).cummax(dim=-1).values  # [B, A, T]
    last = last[..., NOW + 1:]                                            # [B, A, 80]
    hold = lambda x: x.gather(2, last.view(*last.shape, *([1] * (x.dim() - 3)))
                              .expand(*last.shape, *x.shape[3:]))
    rep = lambda x: hold(x)[:, None].expand(-1, R, *([-1] * (x.dim() - 1))).clone()  # [B, R, A, 80, ...]
    return rep(scenes.pos), rep(scenes.z), rep(scenes.yaw)


def score_rollouts(scenes, sim_pos, sim_z, sim_yaw, version: str = "2025") -> dict:
    """WOSAC scores of R rollouts per scene: sim_pos [B, R, A, 80, 2], sim_z/sim_yaw [B, R, A, 80]
    (the scenes' A axis; only sim agents, valid at step 10, are read). Returns per-scene [B]
    tensors: realism_meta, kinematic, interactive, map_based, the 10 feature likelihoods,
    min_ade, ade, collision_rate, offroad_rate, traffic_light_rate. A scene without scored agents
    gets NaN, as a 0/0 does officially."""
    if version not in CONFIGS:
        raise ValueError(f"score_rollouts: version must be one of {list(CONFIGS)}, got {version!r}")
    _check_traj(sim_pos, sim_z, sim_yaw, None, scenes, T_FUTURE, "score_rollouts")
    table = road_edge_table(scenes)
    no_edges = ~table["valid"].any(1) if table["valid"].shape[1] else torch.ones(scenes.B, dtype=torch.bool)
    if bool(no_edges.any()):
        ids = [scenes.scene_id[i] if i < len(scenes.scene_id) else str(i)
               for i in no_edges.nonzero()[:, 0].tolist()]
        raise ValueError(f"score_rollouts: scene(s) {ids} have no road edges (the official metric raises "
                         "'Missing road edges.')")
    bins, weights = CONFIGS[version]
    B, R = sim_pos.shape[:2]
    sim_agent = scenes.valid[:, :, NOW]                                   # [B, A]
    slots, slot_ok = compact(scenes.eval_mask & sim_agent, at_least=1)   # [B, M] scored agents

    # 2. the log (one sample, log validity) and the rollouts (log history + 80 steps, then valid)
    hist = lambda x: x[:, None, :, :NOW + 1].expand(-1, R, *([-1] * (x.dim() - 1)))  # [B, R, A, 11, ...]
    log = _sim_agent_trajectories(scenes, scenes.pos[:, None], scenes.z[:, None], scenes.yaw[:, None],
                                  scenes.valid[:, None])                  # [B, 1, A, T, ...]
    future_valid = torch.ones_like(scenes.valid[:, None, :, NOW + 1:]).expand(-1, R, -1, -1)  # [B, R, A, 80]
    sim = _sim_agent_trajectories(
        scenes, torch.cat([hist(scenes.pos), sim_pos.float()], dim=3),   # [B, R, A, T, 2]
        torch.cat([hist(scenes.z), sim_z.float()], dim=3),                # [B, R, A, T]
        torch.cat([hist(scenes.yaw), sim_yaw.float()], dim=3),            # [B, R, A, T]
        torch.cat([hist(scenes.valid), future_valid], dim=3))             # [B, R, A, T]
    f_log = _features(scenes, *log, slots, table, slot_ok)                # [B, 1, M, 80]
    f_sim = _features(scenes, *sim, slots, table, slot_ok)                # [B, R, M, 80]

    # masks: the log's future validity of scored objects masks everything, simulated values included
    valid = f_log["valid"][:, 0] & slot_ok[..., None]                     # [B, M, 80]
    speed_valid, accel_valid = kinematic_validity(valid)                  # [B, M, 80]
    vehicle = (take(scenes.agent_type, slots, 1) == VEHICLE) & slot_ok   # [B, M]
    masks = {"linear_speed": speed_valid, "angular_speed": speed_valid,
             "linear_acceleration": accel_valid, "angular_acceleration": accel_valid,
             "distance_to_nearest_object": valid, "distance_to_road_edge": valid,
             "time_to_collision": valid & vehicle[..., None]}
    out = {}
    for name, mask in masks.items():                                      # time series: L = exp(mean ll)
        lo, hi, K = bins[name]
        ll = histogram_log_likelihood(f_log[name][:, 0], f_sim[name], lo, hi, K)  # [B, M, 80]
        out[name] = torch.exp(_masked_mean(ll, mask))                     # [B]
    indications = {"collision_indication": ("collision_per_step", valid),
                   "offroad_indication": ("offroad_per_step", valid),
                   "traffic_light_violation": ("traffic_light_violation_per_step",
                                               valid & vehicle[..., None])}
    sim_any = {}
    for name, (flag, mask) in indications.items():                        # any over time, Bernoulli
        log_any = (f_log[flag][:, 0] & mask).any(-1)                      # [B, M]
        sim_any[name] = (f_sim[flag] & mask[:, None]).any(-1)             # [B, R, M]
        ll = bernoulli_log_likelihood(log_any, sim_any[name])             # [B, M]
        out[name] = torch.exp(_masked_mean(ll, slot_ok))                  # [B] no object mask beyond scored

    out["realism_meta"] = sum(weights[f] * out[f] for f in FEATURES)
    for bucket, names in BUCKETS.items():
        w = sum(weights[f] for f in names)
        nan = torch.full_like(out["realism_meta"], math.nan)              # [B]
        out[bucket] = sum(weights[f] * out[f] for f in names) / w if w > 0 else nan

    # rates over (rollout, scored object) pairs; the TL rate is masked by validity only
    pairs = slot_ok[:, None].expand(B, R, -1)                             # [B, R, M]
    out["collision_rate"] = _masked_mean(sim_any["collision_indication"].float(), pairs)
    out["offroad_rate"] = _masked_mean(sim_any["offroad_indication"].float(), pairs)
    tl_any = (f_sim["traffic_light_violation_per_step"] & valid[:, None]).any(-1)  # [B, R, M]
    out["traffic_light_rate"] = _masked_mean(tl_any.float(), pairs)

    # ADE over all 91 steps, history included (3D, masked by the log's validity)
    ref = torch.cat([log[0], log[1].unsqueeze(-1)], dim=-1)               # [B, 1, A, T, 3]
    traj = torch.cat([sim[0], sim[1].unsqueeze(-1)], dim=-1)              # [B, R, A, T, 3]
    err = (take(traj, slots, 2) - take(ref, slots, 2)).norm(dim=-1)     # [B, R, M, T]
    lv = take(log[3], slots, 2)                                          # [B, 1, M, T]
    ade = (err * lv).sum(-1) / lv.sum(-1).clamp(min=1)                    # [B, R, M]
    per_rollout = (ade * slot_ok[:, None]).sum(-1) / slot_ok.sum(-1, keepdim=True)  # [B, R] mean over objects
    out["min_ade"] = per_rollout.amin(dim=1)                              # [B]
    out["ade"] = per_rollout.mean(dim=1)                                  # [B]
    return out


def dataset_means(per_scene: dict) -> dict:
    """Mean over scenes of every per-scene metric (aggregate_scenario_metrics), leaving out the
    scenes where it is NaN (a scene with no scored agent), so that one such scene does not make the
    whole suite NaN; `n_scenes_nan` counts the scenes whose realism meta was left out."""
    out = {k: float(v.float().nanmean()) for k, v in per_scene.items()}
    if "realism_meta" in per_scene:
        out["n_scenes_nan"] = int(per_scene["realism_meta"].isnan().sum())
    return out


def benchmark_scoring(scenes, R: int = 32, repeats: int = 3, noise: float = 0.3, seed: int = 0) -> float:
    """Scenes per second of score_rollouts on R noisy copies of the log (random-walk xy noise of
    `noise` m per sqrt(step)); the best of `repeats` timed runs after one warm-up."""
    g = torch.Generator().manual_seed(seed)
    pos, z, yaw = log_as_rollouts(scenes, R)
    walk = torch.randn(pos.shape, generator=g).cumsum(dim=3).to(pos.device) * noise  # [B, R, A, 80, 2]
    pos = pos + walk
    score_rollouts(scenes, pos, z, yaw)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        score_rollouts(scenes, pos, z, yaw)
        if scenes.pos.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return scenes.B / best
