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

Geometry shared with env.py (collision and off-road events use exactly what the metric counts):
- rounded boxes (3.2): core = box shrunk by s = 0.7 * min(L, W) / 2 on every side;
  d_ij = sd(origin, core_i (+) -core_j) - s_i - s_j, the signed distance between the cores minus
  both radii. We evaluate it without building the 8-gon: when the cores overlap it is the largest
  separating-axis gap (<= 0, minus the penetration depth); otherwise it is the distance between
  two disjoint convex polygons, which is always reached at a corner of one of them.
- signed distance to oriented road edges (3.4): the road lies on the left of each edge; positive
  is off-road.

Deliberate deviations: the traffic-light lane search ignores the official "phantom" segment from
a lane's last point into its zero padding (it points at WOMD's global origin, which centred scenes
no longer have; see _red_light_violation). Float-level only: nearest segments are compared by
squared distance (rel_t via a reciprocal when scoring), and the TTC |cos|, |sin| of the heading
difference come from products of per-agent cos / sin; these can only reorder exact-rounding ties.
Invalid log steps hold whatever the Scenes hold (the loader writes 0), as the official code reads
whatever the proto holds; they only reach unmasked sim values through the history.

Speed: scoring never tests every (box corner, road-edge segment) or (agent, agent) pair exactly;
cheap bounds pick the candidates that can be nearest and only those are evaluated (exact, tested
against brute force). Memory is bounded by CHUNK elements per pairwise tensor.
"""
from __future__ import annotations

import math
import time

import torch

from scenes import DT, LANE, NOW, ROAD_EDGE, SURFACE_STREET_LANE, T, T_FUTURE, wrap_angle

# ---- constants of the official code (section numbers of wosac.md) ----------------------------
BIG = 1e10                        # EXTREMELY_LARGE_DISTANCE: invalid pairs / segments (3.2, 3.4)
CORNER_ROUNDING = 0.7             # CORNER_ROUNDING_FACTOR (3.2)
Z_STRETCH = 3.0                   # _Z_STRETCH_FACTOR: z weight when picking a road-edge segment (3.4)
MAX_HEADING_DIFF = math.radians(75.0)          # TTC: other box roughly aligned (3.3)
MAX_HEADING_DIFF_SMALL_OVERLAP = math.radians(10.0)
SMALL_OVERLAP = 0.5               # m, lateral overlap below which the tighter heading rule applies
MAX_TTC = 5.0                     # s, MAXIMUM_TIME_TO_COLLISION
TL_STOP_STATES = (1, 4)           # ARROW_STOP, STOP (FLASHING_STOP = 7 does not count) (3.5)
VEHICLE = 0                       # agent_type of vehicles (scenes.AGENT_TYPES)
CHUNK = 1 << 22                   # elements per pairwise tensor chunk: the memory knob (~16 MB each)
EDGE_GROUP = 4                    # chained segments per bounding sphere in the nearest-segment search
TRACK = 8                         # consecutive steps of one agent sharing one candidate search

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
def _take(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """x gathered along `dim` with a per-scene index idx [B, M] (dims between 0 and dim broadcast)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    full = list(x.shape)
    full[dim] = idx.shape[1]
    return x.gather(dim, idx.view(shape).expand(full))


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, E, *F] gathered at idx [B, *I] -> [B, *I, *F]."""
    B, feat = x.shape[0], x.shape[2:]
    flat = idx.reshape(B, -1)                                             # [B, N]
    out = x.gather(1, flat.view(B, -1, *([1] * len(feat))).expand(B, flat.shape[1], *feat))  # [B, N, *F]
    return out.view(*idx.shape, *feat)


def _compact(mask: torch.Tensor, at_least: int = 0):
    """Indices of the True entries of mask [B, S], in order, padded per row: (idx [B, M], ok [B, M])."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # [B, S] True first
    M = max(int(mask.sum(1).max()) if mask.numel() else 0, at_least)
    M = min(M, mask.shape[1]) if mask.shape[1] else 0
    idx = order[:, :M]                                                    # [B, M]
    return idx, mask.gather(1, idx)


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for x [E, *F] and any-shaped idx, via index_select (much faster than x[idx] on CPU)."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """2D cross product u.x v.y - u.y v.x over the last dim (first two components)."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _dot2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 0] + u[..., 1] * v[..., 1]


def _div_no_nan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tf.math.divide_no_nan: 0 where the denominator is 0."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Garbage (NaN/inf) in ignored entries must not poison min/argmin reductions."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


# ==============================================================================================
# 3.2 Rounded boxes: corners and signed distance
# ==============================================================================================
def box_corners(pos, yaw, length, width):
    """pos [..., 2], yaw/length/width [...] -> [..., 4, 2], counter-clockwise from the front-left
    corner (front-left, rear-left, rear-right, front-right, as box_utils orders them)."""
    c, s = torch.cos(yaw).unsqueeze(-1), torch.sin(yaw).unsqueeze(-1)     # [..., 1]
    sx = pos.new_tensor([1.0, -1.0, -1.0, 1.0])                           # [4]
    sy = pos.new_tensor([1.0, 1.0, -1.0, -1.0])                           # [4]
    lx = 0.5 * length.unsqueeze(-1) * sx                                  # [..., 4]
    ly = 0.5 * width.unsqueeze(-1) * sy                                   # [..., 4]
    x = pos[..., 0:1] + c * lx - s * ly                                   # [..., 4]
    y = pos[..., 1:2] + s * lx + c * ly                                   # [..., 4]
    return torch.stack([x, y], dim=-1)                                    # [..., 4, 2]


def _point_to_rect(px, py, half_l, half_w):
    """Distance from a point to a filled axis-aligned rectangle centred at 0 (0 inside)."""
    dx = (px.abs() - half_l).clamp(min=0.0)                              # [...]
    dy = (py.abs() - half_w).clamp(min=0.0)                              # [...]
    return torch.sqrt(dx * dx + dy * dy)


def _rounded_box_distance(x, y, cos_d, sin_d, len_i, wid_i, len_j, wid_j):
    """Signed distance d_ij between rounded boxes i and j (3.2), given box j's centre (x, y) and
    heading offset (cos_d, sin_d) = (cos, sin)(h_j - h_i) in box i's frame. All args broadcast.

    sd(origin, core_i (+) -core_j) equals, for overlapping cores, the largest separating-axis gap
    over the four edge normals (<= 0, minus the penetration depth), and for disjoint cores the
    distance between the two rectangles, reached at a corner of one of them."""
    r_i = 0.5 * CORNER_ROUNDING * torch.minimum(len_i, wid_i)             # [...] rounding radius s_i
    r_j = 0.5 * CORNER_ROUNDING * torch.minimum(len_j, wid_j)             # [...] rounding radius s_j
    li, wi = 0.5 * len_i - r_i, 0.5 * wid_i - r_i                         # [...] core half extents
    lj, wj = 0.5 * len_j - r_j, 0.5 * wid_j - r_j                         # [...]
    ac, as_ = cos_d.abs(), sin_d.abs()                                    # [...]
    xj = x * cos_d + y * sin_d                                            # [...] offset in box j's frame
    yj = -x * sin_d + y * cos_d                                           # [...]
    gap = torch.maximum(                                                  # [...] largest axis gap
        torch.maximum(x.abs() - li - (lj * ac + wj * as_), y.abs() - wi - (lj * as_ + wj * ac)),
        torch.maximum(xj.abs() - lj - (li * ac + wi * as_), yj.abs() - wj - (li * as_ + wi * ac)))
    vertex = None
    for s1, s2 in ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)):
        # a corner of core j in i's frame, and a corner of core i in j's frame
        dj = _point_to_rect(x + s1 * lj * cos_d - s2 * wj * sin_d, y + s1 * lj * sin_d + s2 * wj * cos_d, li, wi)  # [...]
        di = _point_to_rect(xj + s1 * li * cos_d + s2 * wi * sin_d, yj - s1 * li * sin_d + s2 * wi * cos_d, lj, wj)  # [...]
        d = torch.minimum(dj, di)                                         # [...]
        vertex = d if vertex is None else torch.minimum(vertex, d)        # [...]
    return torch.where(gap > 0, vertex, gap) - r_i - r_j


def _relative_pose(pos_i, yaw_i, pos_j, yaw_j):
    """Box j seen from box i: centre (x, y) in i's frame and (cos, sin) of h_j - h_i. Broadcasts."""
    ci, si = torch.cos(yaw_i), torch.sin(yaw_i)                           # [...] per box i
    cj, sj = torch.cos(yaw_j), torch.sin(yaw_j)                           # [...] per box j
    dx, dy = pos_j[..., 0] - pos_i[..., 0], pos_j[..., 1] - pos_i[..., 1]  # [...] per pair
    x, y = dx * ci + dy * si, -dx * si + dy * ci                          # rotation by -h_i
    return x, y, cj * ci + sj * si, sj * ci - cj * si


def object_distance_matrix(pos, yaw, length, width, valid):
    """Signed rounded-box distances d_ij (3.2): pos [..., A, 2], yaw/length/width/valid [..., A]
    -> [..., A, A]; BIG (1e10) on the diagonal and where box i or box j is invalid.
    Collision of i is `d.min(-1) < 0`."""
    x, y, cd, sd = _relative_pose(pos.unsqueeze(-2), yaw.unsqueeze(-1), pos.unsqueeze(-3), yaw.unsqueeze(-2))  # [..., A, A]
    d = _rounded_box_distance(x, y, cd, sd, length.unsqueeze(-1), width.unsqueeze(-1),
                              length.unsqueeze(-2), width.unsqueeze(-2))  # [..., A, A]
    A = pos.shape[-2]
    eye = torch.eye(A, dtype=torch.bool, device=pos.device)               # [A, A]
    ok = valid.unsqueeze(-1) & valid.unsqueeze(-2) & ~eye                 # [..., A, A]
    return torch.where(ok, d, torch.full_like(d, BIG))


# ==============================================================================================
# 3.4 Signed distance to oriented road edges
# ==============================================================================================
EDGE_FIELDS = ("a", "b", "valid", "prev_a", "prev_b", "prev_ok", "next_a", "next_b", "next_ok")


def road_edge_table(scenes) -> dict:
    """The ROAD_EDGE segments of each scene, compacted to [B, E, ...] in map order: segment a -> b
    (x, y, z) with the road on its left, `valid`, and the previous / next segment used by the sign
    rule with `prev_ok` / `next_ok` (scenes.seg_prev / seg_next already encode the official
    neighbour and cyclic-wrap rule). Every field is per segment, so a caller may gather any subset
    of edges (e.g. [B, A, C, ...] candidates) and pass it to signed_distance_to_edges."""
    is_edge = (scenes.seg_type == ROAD_EDGE) & scenes.seg_valid            # [B, S]
    idx, ok = _compact(is_edge)                                           # [B, E]
    out = {"a": _rows(scenes.seg_start, idx), "b": _rows(scenes.seg_end, idx), "valid": ok}  # [B, E, 3]
    for name, nb in (("prev", scenes.seg_prev), ("next", scenes.seg_next)):
        j = nb.gather(1, idx)                                             # [B, E] index into S (-1 none)
        jc = j.clamp(min=0)                                               # [B, E]
        out[name + "_a"] = _rows(scenes.seg_start, jc)                    # [B, E, 3]
        out[name + "_b"] = _rows(scenes.seg_end, jc)                      # [B, E, 3]
        out[name + "_ok"] = ok & (j >= 0) & scenes.seg_valid.gather(1, jc)  # [B, E]
    return out


def _selection_sq_distance(q, a, b):
    """Squared z-stretched 3D distance from q to segment a-b (3.4), with rel_t taken in 2D.
    All [..., 3], broadcasting -> [...]."""
    qa, ab = q - a, b - a                                                 # [..., 3]
    rel_t = _div_no_nan(_dot2(qa, ab), _dot2(ab, ab))                     # [...]
    v = qa - ab * rel_t.clamp(0.0, 1.0).unsqueeze(-1)                     # [..., 3] segment -> point
    return v[..., 0] ** 2 + v[..., 1] ** 2 + (Z_STRETCH * v[..., 2]) ** 2


def _signed_value(q, f: dict):
    """Signed 2D distance from q [..., 3] to the segment whose fields f[...] were selected (3.4).

    n = sign(cross(q - a, b - a)) (+1 right of a->b = off-road). Before the start (rel_t < 0) with a
    valid previous segment, the sign is max(n, n_prev) at a convex vertex (cross(d_prev, d) > 0)
    and min(n, n_prev) otherwise; after the end (rel_t > 1) the same with the next segment."""
    a, b = f["a"], f["b"]
    qa, ab = q - a, b - a                                                 # [..., 3]
    rel_t = _div_no_nan(_dot2(qa, ab), _dot2(ab, ab))                     # [...]
    n = torch.sign(_cross(qa, ab))                                        # [...]
    v = qa - ab * rel_t.clamp(0.0, 1.0).unsqueeze(-1)                     # [..., 3]
    dist2d = torch.sqrt(v[..., 0] ** 2 + v[..., 1] ** 2)                  # [...]
    d_prev, d_next = f["prev_b"] - f["prev_a"], f["next_b"] - f["next_a"]  # [..., 3]
    n_prev = torch.sign(_cross(q - f["prev_a"], d_prev))                  # [...]
    n_next = torch.sign(_cross(q - f["next_a"], d_next))                  # [...]
    before = torch.where(_cross(d_prev, ab) > 0, torch.maximum(n, n_prev), torch.minimum(n, n_prev))  # [...]
    after = torch.where(_cross(ab, d_next) > 0, torch.maximum(n, n_next), torch.minimum(n, n_next))  # [...]
    sign = torch.where((rel_t < 0) & f["prev_ok"], before, torch.where((rel_t > 1) & f["next_ok"], after, n))  # [...]
    return sign * dist2d


def signed_distance_to_edges(points, edges: dict):
    """Signed corner distance (3.4) of points [..., Q, 3] to edges with fields [..., E, ...];
    the leading dims broadcast (torch rules). Returns [..., Q]: the segment is the argmin of the
    z-stretched 3D distance (first on ties), the value its signed 2D distance (positive =
    off-road). With no valid edge the value is -BIG (-1e10); the official code would raise instead,
    which score_rollouts does, naming the scene."""
    a, b, ok = edges["a"], edges["b"], edges["valid"]
    d = _selection_sq_distance(points.unsqueeze(-2), a.unsqueeze(-3), b.unsqueeze(-3))  # [..., Q, E]
    d = torch.where(ok.unsqueeze(-2), d, torch.full_like(d, math.inf))    # [..., Q, E]
    if d.shape[-1] == 0:
        return torch.full(d.shape[:-1], -BIG, dtype=points.dtype, device=points.device)
    best = d.argmin(dim=-1)                                               # [..., Q]
    lead = best.shape[:-1]
    f = {}
    for k in EDGE_FIELDS:
        v = edges[k]
        if v.dim() == ok.dim():                                           # flags [..., E]
            f[k] = v.expand(*lead, v.shape[-1]).gather(-1, best)          # [..., Q]
        else:                                                             # points [..., E, 3]
            f[k] = v.expand(*lead, *v.shape[-2:]).gather(-2, best.unsqueeze(-1).expand(*best.shape, 3))  # [..., Q, 3]
    val = _signed_value(points, f)                                        # [..., Q]
    return torch.where(ok.any(-1, keepdim=True).expand_as(val), val, torch.full_like(val, -BIG))


def _box_bottom_corners(pos, z, yaw, size):
    """The 4 bottom corners (x, y, z - h/2) of boxes: pos [..., 2], z/yaw [...], size [..., 3] -> [..., 4, 3]."""
    xy = box_corners(pos, yaw, size[..., 0], size[..., 1])                # [..., 4, 2]
    zb = (z - 0.5 * size[..., 2]).unsqueeze(-1).unsqueeze(-1).expand(*xy.shape[:-1], 1)  # [..., 4, 1]
    return torch.cat([xy, zb], dim=-1)                                    # [..., 4, 3]


def box_road_edge_distance(pos, z, yaw, size, edges: dict):
    """Signed distance of boxes to road edges (3.4): the max over the 4 bottom corners (most
    off-road) of signed_distance_to_edges. pos [..., 2], z/yaw [...], size [..., 3] -> [...].

    Broadcasting rule: the edges' leading dims are aligned from the LEFT with pos's leading dims,
    singleton dims being inserted just before E when edges have fewer. So both work:
    pos [B, A, 2] with per-agent candidates [B, A, C, ...], and pos [B, Q, 2] (or [B, R, A, 2])
    with a whole table [B, E, ...] (seen as [B, 1, E, ...] / [B, 1, 1, E, ...])."""
    lead = pos.dim() - 1
    at = edges["valid"].dim() - 1                                         # position of the E axis
    if at > lead:
        raise ValueError(f"box_road_edge_distance: edges have more leading dims {tuple(edges['valid'].shape[:-1])} "
                         f"than pos {tuple(pos.shape[:-1])}")
    e = {k: v.reshape(*v.shape[:at], *([1] * (lead - at)), *v.shape[at:]) for k, v in edges.items()}  # [..., E, ...]
    corners = _box_bottom_corners(pos, z, yaw, size)                      # [..., 4, 3]
    return signed_distance_to_edges(corners, e).max(dim=-1).values       # [...]


# ==============================================================================================
# 3.4 (and 3.5) when scoring: an exact nearest-segment search with pruning
# ==============================================================================================
def _segment_spheres(hull_a, hull_b, ok, chained, G: int):
    """Bounding spheres of runs of at most G chained segments (a run never spans two polylines),
    each sphere holding the points hull_a, hull_b of its segments. Returns centre [B, Gn, 3],
    radius [B, Gn], first segment [B, Gn] and segment count [B, Gn] (0 = padding)."""
    B, E = ok.shape
    k = torch.arange(E, device=ok.device).expand(B, E)                    # [B, E]
    run_start = torch.where(chained, torch.zeros_like(k), k).cummax(dim=1).values  # [B, E]
    new_group = ok & (~chained | ((k - run_start) % G == 0))              # [B, E]
    gid = new_group.long().cumsum(dim=1) - 1                              # [B, E]
    Gn = int(gid.max()) + 2                                               # + a dump group for padding
    gid = torch.where(ok, gid, torch.full_like(gid, Gn - 1))              # [B, E]
    ends = torch.cat([hull_a, hull_b], dim=1)                             # [B, 2E, 3]
    gid2 = torch.cat([gid, gid], dim=1)                                   # [B, 2E]
    count = torch.zeros(B, Gn, device=ok.device).scatter_add_(1, gid2, torch.ones_like(gid2, dtype=ends.dtype))  # [B, Gn]
    centre = torch.zeros(B, Gn, 3, device=ok.device)                      # [B, Gn, 3]
    centre.scatter_add_(1, gid2.unsqueeze(-1).expand(-1, -1, 3), ends)
    centre = centre / count.clamp(min=1.0).unsqueeze(-1)                  # [B, Gn, 3]
    spread = (ends - _rows(centre, gid2)).norm(dim=-1)                    # [B, 2E]
    radius = torch.zeros(B, Gn, device=ok.device).scatter_reduce_(1, gid2, spread, "amax")  # [B, Gn]
    first = torch.full((B, Gn), E, device=ok.device).scatter_reduce_(1, gid, k, "amin")    # [B, Gn]
    n_seg = (count / 2).long()                                            # [B, Gn]
    n_seg[:, -1] = 0                                                      # the dump group
    return centre, radius, first, n_seg


def _nearest_segments(q, a, b, ok, buggy: bool = False, G: int = EDGE_GROUP):
    """The nearest segment of every query point, exact (first on ties) but without testing every
    point against every segment.

    q [B, N, P, 3]: N rows of P points, one candidate search per row; a, b [B, E, 3]; ok [B, E]
    -> idx [B, N, P] into E (0 where a scene has no valid segment). With t = clip(rel_t, 0, 1) of
    the 2D projection, the distance is |q - a - t (b - a)| (3D: callers stretch z beforehand for
    the road-edge selection distance, 3.4) or, if buggy, |q - a + t (b - a)| (the lane search of
    3.5, z = 0). Either is the distance from q to a point of a segment H: a-b, or its mirror
    (2a - b)-a when buggy.

    Pruning: runs of G chained segments get a sphere (c, r) around their H. All points of a row lie
    within rho of the row mean m, so with lb = |m - c| - r and ub = |m - c| + r every point's nearest
    segment lies in a group with lb <= min(ub) + 2 rho. Each point then repeats the test (rho = 0)
    on its row's groups, and only the segments of the groups it keeps are measured. Rows are
    processed sorted by how many groups they need, so that a few far-away points (a rollout
    leaving the map) only slow down their own batch."""
    B, N, P, _ = q.shape
    E = ok.shape[1]
    idx_out = torch.zeros(B * N, P, dtype=torch.long, device=q.device)    # [B N, P]
    if E == 0 or N == 0:
        return idx_out.view(B, N, P)
    chained = torch.zeros_like(ok)                                        # [B, E]
    chained[:, 1:] = (a[:, 1:] == b[:, :-1]).all(-1) & ok[:, 1:] & ok[:, :-1]
    hull_a, hull_b = (2 * a - b, a) if buggy else (a, b)                  # [B, E, 3] the segments H
    centre, radius, first, n_seg = _segment_spheres(hull_a, hull_b, ok, chained, G)  # [B, Gn, ...]
    Gn, sign = centre.shape[1], (1.0 if buggy else -1.0)
    g_ok = n_seg > 0                                                      # [B, Gn]
    ab = (b - a).flatten(0, 1)                                            # [B E, 3] flat over scenes, so
    len2 = ab[:, 0] ** 2 + ab[:, 1] ** 2                                  # [B E]   rows of any scene batch
    inv_len2 = _div_no_nan(torch.ones_like(len2), len2)                    # [B E] (rel_t = 0 if degenerate)
    seg = [c.contiguous() for c in torch.cat([a.flatten(0, 1), ab], 1).unbind(1)] + [inv_len2]  # 7 x [B E]
    first_flat = (first + E * torch.arange(B, device=q.device).unsqueeze(1)).flatten()  # [B Gn]
    n_flat, g_ok_flat, radius_flat = n_seg.flatten(), g_ok.flatten(), radius.flatten()  # [B Gn]
    centre_flat = centre.flatten(0, 1)                                    # [B Gn, 3]
    m = q.mean(dim=2)                                                     # [B, N, 3] row centres
    rho = (q - m.unsqueeze(2)).norm(dim=-1).amax(dim=-1)                  # [B, N]
    q_flat = q.flatten(0, 1)                                              # [B N, P, 3]
    offset = torch.arange(G, device=q.device)                             # [G]
    scene_of = torch.arange(B, device=q.device).unsqueeze(1)              # [B, 1]
    step = max(1, CHUNK // max(1, B * Gn))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        dist = (m[:, n0:n1].unsqueeze(2) - centre.unsqueeze(1)).norm(dim=-1)  # [B, Nc, Gn]
        lb = torch.where(g_ok.unsqueeze(1), (dist - radius.unsqueeze(1)).clamp(min=0.0), math.inf)  # [B, Nc, Gn]
        ub = torch.where(g_ok.unsqueeze(1), dist + radius.unsqueeze(1), math.inf)  # [B, Nc, Gn]
        bound = ub.amin(-1) + 2.0 * rho[:, n0:n1]                         # [B, Nc]
        bound = bound + 1e-2 + 1e-4 * bound.abs()                         # float32 rounding margin
        need = (lb <= bound.unsqueeze(-1)).sum(-1) * torch.isfinite(bound)  # [B, Nc] (0: scene has no segment)
        need, order = need.flatten().sort()                               # [R = B Nc] fewest first
        lb = lb.flatten(0, 1)                                             # [R, Gn]
        row_id = (scene_of * N + torch.arange(n0, n1, device=q.device)).flatten()  # [R] into B N
        group_base = (scene_of * Gn).expand(B, n1 - n0).flatten()         # [R]
        i, R = 0, need.shape[0]
        while i < R:
            # the largest batch of rows whose [n, P, k G] distance tensor stays within CHUNK
            cost = torch.arange(1, R - i + 1, device=q.device) * need[i:].clamp(min=1) * (P * G)  # [R - i]
            j = i + max(1, int((cost <= CHUNK).sum()))
            rows = order[i:j]                                             # [n]
            k = max(1, int(need[j - 1]))
            groups = lb.index_select(0, rows).topk(k, dim=-1, largest=False).indices.sort(dim=-1).values  # [n, k]
            groups = groups + group_base.index_select(0, rows).unsqueeze(1)  # [n, k] flat group ids, ascending
            rid = row_id.index_select(0, rows)                            # [n]
            qc = q_flat.index_select(0, rid)                              # [n, P, 3]
            # the same bound once more per point (rho = 0) among the row's k groups
            dq = (qc.unsqueeze(2) - _pick(centre_flat, groups).unsqueeze(1)).norm(dim=-1)  # [n, P, k]
            r_g = _pick(radius_flat, groups).unsqueeze(1)                 # [n, 1, k]
            g_in = _pick(g_ok_flat, groups).unsqueeze(1)                  # [n, 1, k]
            lb_q = torch.where(g_in, (dq - r_g).clamp(min=0.0), math.inf)  # [n, P, k]
            ub_q = torch.where(g_in, dq + r_g, math.inf).amin(-1, keepdim=True)  # [n, P, 1]
            keep = lb_q <= ub_q + 1e-2 + 1e-4 * ub_q.abs()                # [n, P, k]
            k2 = max(1, int(keep.sum(-1).max()))
            lb_k, pick = torch.where(keep, lb_q, math.inf).topk(k2, dim=-1, largest=False)  # [n, P, k2]
            pick, at = pick.sort(dim=-1)                                  # ascending groups: first on ties
            g2 = groups.unsqueeze(1).expand(-1, P, -1).gather(-1, pick)   # [n, P, k2] flat group ids
            kept = torch.isfinite(lb_k.gather(-1, at))                    # [n, P, k2]
            cand_ok = (offset < _pick(n_flat, g2).unsqueeze(-1)) & kept.unsqueeze(-1)  # [n, P, k2, G]
            cand = (_pick(first_flat, g2).unsqueeze(-1) + offset).flatten(-2).clamp(max=B * E - 1)  # [n, P, k2 G]
            ax, ay, az, dx, dy, dz, il = (_pick(w, cand) for w in seg)    # [n, P, k2 G]
            qax, qay, qaz = (qc[..., c:c + 1] - w for c, w in enumerate((ax, ay, az)))  # [n, P, k2 G]
            t = ((qax * dx + qay * dy) * il).clamp(0.0, 1.0) * sign       # [n, P, k2 G]
            d = (qax + dx * t) ** 2 + (qay + dy * t) ** 2 + (qaz + dz * t) ** 2  # squared distance
            d = torch.where(cand_ok.flatten(-2), d, math.inf)             # [n, P, k2 G]
            best = cand.gather(-1, d.argmin(-1, keepdim=True)).squeeze(-1)  # [n, P]
            idx_out.index_copy_(0, rid, best - E * (rid // N).unsqueeze(1))  # back to per-scene ids
            i = j
    return idx_out.view(B, N, P)


def _road_edge_distance_many(pos, z, yaw, size, table: dict, track: int = 1):
    """box_road_edge_distance for many boxes pos [B, Q, 2], z/yaw [B, Q], size [B, Q, 3] against a
    whole table [B, E] -> [B, Q], exact but pruned (scoring has ~1e5 boxes x ~5e3 segments).
    Consecutive runs of `track` boxes (one agent's steps) share one candidate search."""
    B, Q = pos.shape[:2]
    if Q % track:
        raise ValueError(f"_road_edge_distance_many: {Q} boxes per scene are not a multiple of track={track}")
    if table["valid"].shape[1] == 0:
        return pos.new_full((B, Q), -BIG)
    stretch = pos.new_tensor([1.0, 1.0, Z_STRETCH])                       # [3]
    corners = _box_bottom_corners(pos, z, yaw, size)                      # [B, Q, 4, 3]
    rows = (corners * stretch).view(B, Q // track, 4 * track, 3)          # [B, Qt, 4 track, 3]
    idx = _nearest_segments(rows, table["a"] * stretch, table["b"] * stretch, table["valid"])  # [B, Qt, 4 track]
    idx = idx.view(B, Q, 4)                                               # [B, Q, 4]
    f = {k: _rows(v, idx) for k, v in table.items()}                      # [B, Q, 4, ...]
    return _signed_value(corners, f).amax(dim=-1)                         # [B, Q]


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
def _interaction_features(pos, yaw, valid, size, speed, slots):
    """Distance to the nearest object and TTC of the slot agents against every agent.

    pos [B, R, A, T, 2], yaw/valid/speed [B, R, A, T] (valid already False for non-sim agents;
    speed: 2D central-difference speed), size [B, A, 3], slots [B, M] -> two [B, R, M, T].
    Every (rollout, step) is independent: they are flattened to N = R T and processed in chunks."""
    B, R, A, Tn = yaw.shape
    M, N = slots.shape[1], R * Tn
    L, W = size[..., 0], size[..., 1]                                     # [B, A]
    Li = _take(L, slots, 1)[:, None, :, None]                             # [B, 1, M, 1]
    Wi = _take(W, slots, 1)[:, None, :, None]                             # [B, 1, M, 1]
    Lj, Wj = L[:, None, None, :], W[:, None, None, :]                     # [B, 1, 1, A]
    Ri, Rj = 0.5 * torch.sqrt(Li ** 2 + Wi ** 2), 0.5 * torch.sqrt(Lj ** 2 + Wj ** 2)  # half diagonals
    ri, rj = 0.5 * torch.minimum(Li, Wi), 0.5 * torch.minimum(Lj, Wj)    # inscribed radii
    not_self = (slots.unsqueeze(-1) != torch.arange(A, device=pos.device)).unsqueeze(1)  # [B, 1, M, A]
    flat = lambda x: x.transpose(2, 3).reshape(B, N, A, *x.shape[4:])     # [B, R T, A, ...]
    P, H, V, S = flat(pos), flat(yaw), flat(valid), flat(speed)           # [B, N, A, (2)]
    Pi, Hi, Vi, Si = (_take(x, slots, 2) for x in (P, H, V, S))           # [B, N, M, (2)]
    dist_out = pos.new_empty(B, N, M)                                     # [B, N, M]
    ttc_out = pos.new_empty(B, N, M)                                      # [B, N, M]
    step = max(1, CHUNK // max(1, B * M * A))
    for n0 in range(0, N, step):
        c_ = slice(n0, min(N, n0 + step))
        x, y, cos_d, sin_d = _relative_pose(Pi[:, c_].unsqueeze(-2), Hi[:, c_].unsqueeze(-1),
                                            P[:, c_].unsqueeze(-3), H[:, c_].unsqueeze(-2))  # [B, Nc, M, A]

        # 3.2: rounded-box distance, BIG for self pairs and invalid boxes, min over the others.
        # Exact d_ij is only needed for the pairs that can be the minimum: a rounded box lies
        # between the discs of radius min(L, W)/2 and its half diagonal around its centre, so with
        # centre distance c: c - Ri - Rj <= d_ij <= c - ri - rj.
        ok = Vi[:, c_].unsqueeze(-1) & V[:, c_].unsqueeze(-2) & not_self  # [B, Nc, M, A]
        c = torch.sqrt(x * x + y * y)                                     # [B, Nc, M, A]
        lb = torch.where(ok, c - Ri - Rj, math.inf)                       # [B, Nc, M, A]
        bound = torch.where(ok, c - ri - rj, math.inf).amin(-1, keepdim=True)  # [B, Nc, M, 1]
        maybe = ok & (lb <= bound + 1e-3 * (1.0 + bound.abs()))           # float32 margin
        k = max(1, int(maybe.sum(-1).max()))
        j = torch.where(maybe, lb, math.inf).topk(k, dim=-1, largest=False).indices  # [B, Nc, M, k]
        pick = lambda v: v.expand_as(lb).gather(-1, j)                    # [B, Nc, M, k]
        d = _rounded_box_distance(pick(x), pick(y), pick(cos_d), pick(sin_d), Li, Wi, pick(Lj), pick(Wj))  # [B, Nc, M, k]
        dist_out[:, c_] = torch.where(pick(maybe), d, BIG).amin(-1)       # [B, Nc, M]

        # 3.3: the box ahead. yaw_diff is NOT wrapped (+179 deg vs -179 deg gives 358 deg: rejected);
        # |cos|, |sin| of it equal those of h_j - h_i, already at hand.
        yaw_diff = (H[:, c_].unsqueeze(-2) - Hi[:, c_].unsqueeze(-1)).abs()  # [B, Nc, M, A]
        ac, as_ = cos_d.abs(), sin_d.abs()                                # [B, Nc, M, A]
        long_off = 0.5 * Lj * ac + 0.5 * Wj * as_                        # [B, Nc, M, A] other's nearest corner
        lat_off = 0.5 * Lj * as_ + 0.5 * Wj * ac                         # [B, Nc, M, A]
        lon = x - 0.5 * Li - long_off                                     # [B, Nc, M, A] ahead of ego's front
        lat = y.abs() - 0.5 * Wi - lat_off                                # [B, Nc, M, A] < 0: overlap
        ahead = (V[:, c_].unsqueeze(-2) & (lon > 0) & (yaw_diff <= MAX_HEADING_DIFF) & (lat < 0)  # [B, Nc, M, A]
                 & ((lat < -SMALL_OVERLAP) | (yaw_diff <= MAX_HEADING_DIFF_SMALL_OVERLAP)))  # ego validity unused
        masked = lon + (~ahead).to(lon.dtype) * BIG                       # [B, Nc, M, A]
        j = masked.argmin(-1, keepdim=True)                               # [B, Nc, M, 1]
        gap = masked.gather(-1, j).squeeze(-1)                            # [B, Nc, M]
        v_ahead = S[:, c_].unsqueeze(-2).expand_as(masked).gather(-1, j).squeeze(-1)  # [B, Nc, M]
        rel = Si[:, c_] - v_ahead                                         # speed magnitudes, NaN -> 5
        ttc = torch.where(rel > 0, torch.clamp(gap / rel, max=MAX_TTC), torch.full_like(rel, MAX_TTC))  # [B, Nc, M]
        ttc_out[:, c_] = ttc
    unflat = lambda x: x.view(B, R, Tn, M).transpose(2, 3)                # [B, R, M, T]
    return unflat(dist_out), unflat(ttc_out)


# ==============================================================================================
# 3.5 Traffic-light violation
# ==============================================================================================
def _buggy_lane_distance(p, a, b):
    """The official lane-search 'distance' ||(p - a) + clip(rel_t)(b - a)|| (the `+` is the bug,
    copied for fidelity; a true distance has `-`). p, a, b [..., 2] broadcasting -> [...]."""
    pa, ab = p - a, b - a                                                 # [..., 2]
    rel_t = _div_no_nan(_dot2(pa, ab), _dot2(ab, ab)).clamp(0.0, 1.0)    # [...]
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
    is_lane = ((scenes.seg_type == LANE) & (scenes.seg_code == SURFACE_STREET_LANE) & scenes.seg_valid)[bi]  # [B', S]
    idx, ok = _compact(is_lane)                                           # [B', Sl]
    if idx.shape[1] == 0:
        return out                                                        # no lanes -> all False
    la = _rows(scenes.seg_start[bi][..., :2], idx)                        # [B', Sl, 2]
    lb = _rows(scenes.seg_end[bi][..., :2], idx)                          # [B', Sl, 2]
    poly = torch.where(ok, scenes.seg_poly[bi].gather(1, idx), torch.full_like(idx, -2))  # [B', Sl]
    Bp, Sl = idx.shape

    # current lane of each object at steps NOW..90 (NOW is needed for the crossing at step 11);
    # each agent's 81 steps are searched as 9 rows of 9 points
    p = pos[bi][..., NOW:, :]                                             # [B', R, M, 81, 2]
    p3 = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1).reshape(Bp, -1, 9, 3)  # [B', R M 9, 9, 3]
    flat3 = lambda x: torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)  # [B', Sl, 3]
    seg = _nearest_segments(p3, flat3(la), flat3(lb), ok, buggy=True)     # [B', R M 9, 9]
    lane = poly.gather(1, seg.reshape(Bp, -1)).view(Bp, R, M, T - NOW)    # [B', R, M, 81]

    # the stop point's segment in the signal's lane, per step (same buggy search)
    tl_lane = scenes.tl_lane[bi]                                          # [B', L]
    stop = scenes.tl_stop[bi][:, :, NOW:]                                 # [B', L, 81, 2]
    in_lane = (poly[:, None, :] == tl_lane[:, :, None]) & (tl_lane[:, :, None] >= 0)  # [B', L, Sl]
    L = in_lane.shape[1]
    own, own_ok = _compact(in_lane.flatten(0, 1))                         # [B' L, P] the lane's segments
    own = own.view(Bp, L, -1)                                             # [B', L, P]
    own_a, own_b = _rows(la, own), _rows(lb, own)                         # [B', L, P, 2]
    d = _buggy_lane_distance(stop.unsqueeze(-2), own_a.unsqueeze(2), own_b.unsqueeze(2))  # [B', L, 81, P]
    d = torch.where(own_ok.view(Bp, L, 1, -1), d, torch.full_like(d, BIG))  # [B', L, 81, P]
    seg = own.unsqueeze(2).expand_as(d).gather(-1, d.argmin(-1, keepdim=True)).squeeze(-1)  # [B', L, 81]
    sa = _rows(la, seg)                                                   # [B', L, 81, 2]
    sb = _rows(lb, seg)                                                   # [B', L, 81, 2]
    ab = sb - sa                                                          # [B', L, 81, 2]
    len2 = _dot2(ab, ab)                                                  # [B', L, 81]
    stop_t = _div_no_nan(_dot2(stop - sa, ab), len2).transpose(1, 2)      # [B', 81, L]
    P = pos[bi][..., NOW:, :].unsqueeze(-2)                               # [B', R, M, 81, 1, 2]
    sa_, ab_, len2_ = (x.transpose(1, 2)[:, None, None] for x in (sa, ab, len2))  # [B', 1, 1, 81, L, (2)]
    obj_t = _div_no_nan(_dot2(P - sa_, ab_), len2_)                       # [B', R, M, 81, L]
    behind = obj_t < stop_t[:, None, None]                                # [B', R, M, 81, L] strict: landing
    ahead = obj_t > stop_t[:, None, None]                                 # [B', R, M, 81, L]
    crossed = behind[..., :-1, :] & ahead[..., 1:, :]                     # [B', R, M, 80, L]
    state = scenes.tl_state[bi][:, :, NOW + 1:].transpose(1, 2)           # [B', 80, L]
    is_stop = (state == TL_STOP_STATES[0]) | (state == TL_STOP_STATES[1])  # [B', 80, L]
    lane_ok = in_lane.any(-1)                                             # [B', L]
    match = lane[..., 1:].unsqueeze(-1) == tl_lane[:, None, None, None]   # [B', R, M, 80, L]
    v = valid[bi][..., NOW + 1:].unsqueeze(-1)                            # [B', R, M, 80, 1]
    out[bi] = (v & match & is_stop[:, None, None] & lane_ok[:, None, None, None] & crossed).any(-1)  # [B', R, M, 80]
    return out


# ==============================================================================================
# 2. Per-step features of 91-step trajectories
# ==============================================================================================
def _features(scenes, pos, z, yaw, valid, slots, table) -> dict:
    """Features of the slot agents slots [B, M] on the 80 future steps, from 91-step trajectories
    pos [B, R, A, T, 2], z/yaw/valid [B, R, A, T] (valid: False for agents that are not sim agents,
    so they are no obstacles). Returns a dict of [B, R, M, 80]."""
    size = scenes.size                                                    # [B, A, 3]
    fut = slice(NOW + 1, T)
    e_pos, e_z, e_yaw, e_valid = (_take(x, slots, 2) for x in (pos, z, yaw, valid))  # [B, R, M, T, (2)]
    speed, accel, ang_speed, ang_accel = kinematic_features(e_pos[..., 0], e_pos[..., 1], e_z, e_yaw)  # [B, R, M, T]

    # TTC speeds are 2D (z = 0) central differences over the 91 steps: NaN at the last step -> 5 s
    speed2d = torch.sqrt(central_diff(pos[..., 0]) ** 2 + central_diff(pos[..., 1]) ** 2) / DT  # [B, R, A, T]
    dist, ttc = _interaction_features(pos[..., fut, :], yaw[..., fut], valid[..., fut], size,  # [B, R, M, 80]
                                      speed2d[..., fut], slots)

    # road edges of valid boxes only; invalid ones are queried on the scene's first road edge (a
    # place near the road keeps the pruning tight) and masked to -BIG afterwards
    B, R, M = e_z.shape[:3]
    fv = e_valid[..., fut]                                                # [B, R, M, 80]
    e_size = _take(size, slots, 1)[:, None, :, None].expand(B, R, M, T_FUTURE, 3)  # [B, R, M, 80, 3]
    anchor = table["a"][:, 0] if table["a"].shape[1] else pos.new_zeros(B, 3)  # [B, 3]
    q_pos = torch.where(fv.unsqueeze(-1), e_pos[..., fut, :], anchor[:, None, None, None, :2])  # [B, R, M, 80, 2]
    q_z = torch.where(fv, e_z[..., fut], anchor[:, None, None, None, 2] + 0.5 * e_size[..., 2])  # [B, R, M, 80]
    q_yaw = torch.where(fv, e_yaw[..., fut], torch.zeros_like(q_z))      # [B, R, M, 80]
    road = _road_edge_distance_many(q_pos.reshape(B, -1, 2), q_z.reshape(B, -1), q_yaw.reshape(B, -1),
                                    e_size.reshape(B, -1, 3), table, track=TRACK)  # [B, R M 80]
    road = road.view(B, R, M, T_FUTURE)                                   # [B, R, M, 80]
    road = torch.where(fv, road, torch.full_like(road, -BIG))             # [B, R, M, 80]
    return {
        "linear_speed": speed[..., fut], "linear_acceleration": accel[..., fut],
        "angular_speed": ang_speed[..., fut], "angular_acceleration": ang_accel[..., fut],
        "distance_to_nearest_object": dist, "collision_per_step": dist < 0.0,
        "time_to_collision": ttc,
        "distance_to_road_edge": road, "offroad_per_step": road > 0.0,
        "traffic_light_violation_per_step": _red_light_violation(scenes, e_pos, e_valid),
        "valid": e_valid[..., fut],
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
    """log p of the log's flag under a 2-bin histogram of the R sim flags. log [B, M], sim [B, R, M] -> [B, M]."""
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
    hold = lambda x: x.gather(2, last.view(*last.shape, *([1] * (x.dim() - 3))).expand(*last.shape, *x.shape[3:]))
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
        ids = [scenes.scene_id[i] if i < len(scenes.scene_id) else str(i) for i in no_edges.nonzero()[:, 0].tolist()]
        raise ValueError(f"score_rollouts: scene(s) {ids} have no road edges (the official metric raises "
                         "'Missing road edges.')")
    bins, weights = CONFIGS[version]
    B, R = sim_pos.shape[:2]
    sim_agent = scenes.valid[:, :, NOW]                                   # [B, A]
    slots, slot_ok = _compact(scenes.eval_mask & sim_agent, at_least=1)   # [B, M] scored agents

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
    f_log = _features(scenes, *log, slots, table)                         # [B, 1, M, 80]
    f_sim = _features(scenes, *sim, slots, table)                         # [B, R, M, 80]

    # masks: the log's future validity of scored objects masks everything, simulated values included
    valid = f_log["valid"][:, 0] & slot_ok[..., None]                     # [B, M, 80]
    speed_valid, accel_valid = kinematic_validity(valid)                  # [B, M, 80]
    vehicle = (_take(scenes.agent_type, slots, 1) == VEHICLE) & slot_ok   # [B, M]
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
                   "traffic_light_violation": ("traffic_light_violation_per_step", valid & vehicle[..., None])}
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
    err = (_take(traj, slots, 2) - _take(ref, slots, 2)).norm(dim=-1)     # [B, R, M, T]
    lv = _take(log[3], slots, 2)                                          # [B, 1, M, T]
    ade = (err * lv).sum(-1) / lv.sum(-1).clamp(min=1)                    # [B, R, M]
    per_rollout = (ade * slot_ok[:, None]).sum(-1) / slot_ok.sum(-1, keepdim=True)  # [B, R] mean over objects
    out["min_ade"] = per_rollout.amin(dim=1)                              # [B]
    out["ade"] = per_rollout.mean(dim=1)                                  # [B]
    return out


def dataset_means(per_scene: dict) -> dict:
    """Plain mean over scenes of every per-scene metric (aggregate_scenario_metrics)."""
    return {k: float(v.float().mean()) for k, v in per_scene.items()}


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
