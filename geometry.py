"""Geometry shared by the WOSAC metric and the simulator: rounded boxes, oriented road edges,
and the pruned nearest-segment searches. Spec: ../shared/research/wosac.md (section numbers below).

`wosac_metrics.py` scores with these functions and `env.py` flags collisions and off-road with
them, so what the policy is penalised for is exactly what the metric counts.

- Rounded boxes (3.2): core = box shrunk by s = 0.7 * min(L, W) / 2 on every side;
  d_ij = sd(origin, core_i (+) -core_j) - s_i - s_j, the signed distance between the cores minus
  both radii. It is evaluated without building the 8-gon: when the cores overlap it is the
  largest separating-axis gap (<= 0, minus the penetration depth); otherwise it is the distance
  between two disjoint convex polygons, which is always reached at a corner of one of them.
- Signed distance to oriented road edges (3.4): the road lies on the left of each edge; positive
  is off-road. The segment is picked in z-stretched 3D, its distance is 2D (an official quirk).
- Pruned searches (3.2 / 3.4, and the lane search of 3.5): scoring never tests every (box corner,
  road-edge segment) pair exactly; cheap bounds pick the segments that can be nearest and only
  those are measured (exact, tested against brute force). Memory is bounded by CHUNK elements per
  pairwise tensor.
"""
from __future__ import annotations

import math

import torch

from scenes import ROAD_EDGE

# ---- constants of the official code (section numbers of wosac.md) ----------------------------
BIG = 1e10                        # EXTREMELY_LARGE_DISTANCE: invalid pairs / segments (3.2, 3.4)
CORNER_ROUNDING = 0.7             # CORNER_ROUNDING_FACTOR (3.2)
Z_STRETCH = 3.0                   # _Z_STRETCH_FACTOR: z weight when picking a road-edge segment (3.4)
CHUNK = 1 << 22                   # elements per pairwise tensor chunk: the memory knob (~16 MB each)
EDGE_GROUP = 4                    # chained segments per bounding sphere in the nearest-segment search


# ==============================================================================================
# Small helpers
# ==============================================================================================
def take(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """x gathered along `dim` with a per-scene index idx [B, M] (dims between 0 and dim broadcast)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    full = list(x.shape)
    full[dim] = idx.shape[1]
    return x.gather(dim, idx.view(shape).expand(full))


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, E, *F] gathered at idx [B, *I] -> [B, *I, *F]."""
    B, feat = x.shape[0], x.shape[2:]
    flat = idx.reshape(B, -1)                                             # [B, N]
    out = x.gather(1, flat.view(B, -1, *([1] * len(feat))).expand(B, flat.shape[1], *feat))  # [B, N, *F]
    return out.view(*idx.shape, *feat)


def compact(mask: torch.Tensor, at_least: int = 0):
    """Indices of the True entries of mask [B, S], in order, padded per row: (idx [B, M], ok [B, M])."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # [B, S] True first
    M = max(int(mask.sum(1).max()) if mask.numel() else 0, at_least)
    M = min(M, mask.shape[1]) if mask.shape[1] else 0
    idx = order[:, :M]                                                    # [B, M]
    return idx, mask.gather(1, idx)


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] for x [E, *F] and any-shaped idx, via index_select (much faster than x[idx] on CPU)."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])


def cross2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """2D cross product u.x v.y - u.y v.x over the last dim (first two components)."""
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def dot2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 0] + u[..., 1] * v[..., 1]


def div_no_nan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tf.math.divide_no_nan: 0 where the denominator is 0."""
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))



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


def rounded_box_distance(x, y, cos_d, sin_d, len_i, wid_i, len_j, wid_j):
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
        dj = _point_to_rect(x + s1 * lj * cos_d - s2 * wj * sin_d, y + s1 * lj * sin_d + s2 * wj * cos_d,
                            li, wi)                                       # [...]
        di = _point_to_rect(xj + s1 * li * cos_d + s2 * wi * sin_d, yj - s1 * li * sin_d + s2 * wi * cos_d,
                            lj, wj)                                       # [...]
        d = torch.minimum(dj, di)                                         # [...]
        vertex = d if vertex is None else torch.minimum(vertex, d)        # [...]
    return torch.where(gap > 0, vertex, gap) - r_i - r_j


def relative_pose(pos_i, yaw_i, pos_j, yaw_j):
    """Box j seen from box i: centre (x, y) in i's frame and (cos, sin) of h_j - h_i. Broadcasts."""
    return relative_pose_cs(pos_i[..., 0], pos_i[..., 1], torch.cos(yaw_i), torch.sin(yaw_i),
                            pos_j[..., 0], pos_j[..., 1], torch.cos(yaw_j), torch.sin(yaw_j))


def relative_pose_cs(xi, yi, ci, si, xj, yj, cj, sj):
    """relative_pose from coordinates and the cos / sin of both headings (callers that already have
    them per box skip recomputing them per pair). All [...] broadcasting."""
    dx, dy = xj - xi, yj - yi                                             # [...] per pair
    x, y = dx * ci + dy * si, -dx * si + dy * ci                          # rotation by -h_i
    return x, y, cj * ci + sj * si, sj * ci - cj * si


def object_distance_matrix(pos, yaw, length, width, valid):
    """Signed rounded-box distances d_ij (3.2): pos [..., A, 2], yaw/length/width/valid [..., A]
    -> [..., A, A]; BIG (1e10) on the diagonal and where box i or box j is invalid.
    Collision of i is `d.min(-1) < 0`."""
    # [..., A, A]
    x, y, cd, sd = relative_pose(pos.unsqueeze(-2), yaw.unsqueeze(-1), pos.unsqueeze(-3), yaw.unsqueeze(-2))
    d = rounded_box_distance(x, y, cd, sd, length.unsqueeze(-1), width.unsqueeze(-1),
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
    idx, ok = compact(is_edge)                                           # [B, E]
    # [B, E, 3]
    out = {"a": gather_rows(scenes.seg_start, idx), "b": gather_rows(scenes.seg_end, idx), "valid": ok}
    for name, nb in (("prev", scenes.seg_prev), ("next", scenes.seg_next)):
        j = nb.gather(1, idx)                                             # [B, E] index into S (-1 none)
        jc = j.clamp(min=0)                                               # [B, E]
        out[name + "_a"] = gather_rows(scenes.seg_start, jc)                    # [B, E, 3]
        out[name + "_b"] = gather_rows(scenes.seg_end, jc)                      # [B, E, 3]
        out[name + "_ok"] = ok & (j >= 0) & scenes.seg_valid.gather(1, jc)  # [B, E]
    return out


def _selection_sq_distance(q, a, b):
    """Squared z-stretched 3D distance from q to segment a-b (3.4), with rel_t taken in 2D.
    All [..., 3], broadcasting -> [...]."""
    qa, ab = q - a, b - a                                                 # [..., 3]
    rel_t = div_no_nan(dot2(qa, ab), dot2(ab, ab))                     # [...]
    v = qa - ab * rel_t.clamp(0.0, 1.0).unsqueeze(-1)                     # [..., 3] segment -> point
    return v[..., 0] ** 2 + v[..., 1] ** 2 + (Z_STRETCH * v[..., 2]) ** 2


def _signed_value(q, f: dict):
    """Signed 2D distance from q [..., 3] to the segment whose fields f[...] were selected (3.4).

    n = sign(cross(q - a, b - a)) (+1 right of a->b = off-road). Before the start (rel_t < 0) with a
    valid previous segment, the sign is max(n, n_prev) at a convex vertex (cross(d_prev, d) > 0)
    and min(n, n_prev) otherwise; after the end (rel_t > 1) the same with the next segment."""
    a, b = f["a"], f["b"]
    qa, ab = q - a, b - a                                                 # [..., 3]
    rel_t = div_no_nan(dot2(qa, ab), dot2(ab, ab))                     # [...]
    n = torch.sign(cross2(qa, ab))                                        # [...]
    v = qa - ab * rel_t.clamp(0.0, 1.0).unsqueeze(-1)                     # [..., 3]
    dist2d = torch.sqrt(v[..., 0] ** 2 + v[..., 1] ** 2)                  # [...]
    d_prev, d_next = f["prev_b"] - f["prev_a"], f["next_b"] - f["next_a"]  # [..., 3]
    n_prev = torch.sign(cross2(q - f["prev_a"], d_prev))                  # [...]
    n_next = torch.sign(cross2(q - f["next_a"], d_next))                  # [...]
    before = torch.where(cross2(d_prev, ab) > 0, torch.maximum(n, n_prev), torch.minimum(n, n_prev))  # [...]
    after = torch.where(cross2(ab, d_next) > 0, torch.maximum(n, n_next), torch.minimum(n, n_next))  # [...]
    # [...]
    sign = torch.where((rel_t < 0) & f["prev_ok"], before, torch.where((rel_t > 1) & f["next_ok"], after, n))
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
            # [..., Q, 3]
            f[k] = v.expand(*lead, *v.shape[-2:]).gather(-2, best.unsqueeze(-1).expand(*best.shape, 3))
    val = _signed_value(points, f)                                        # [..., Q]
    return torch.where(ok.any(-1, keepdim=True).expand_as(val), val, torch.full_like(val, -BIG))


def _box_bottom_corners(pos, z, yaw, size):
    """The 4 bottom corners (x, y, z - h/2) of boxes: pos [..., 2], z/yaw [...], size [..., 3]
    -> [..., 4, 3]."""
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
        raise ValueError(f"box_road_edge_distance: edges have more leading dims "
                         f"{tuple(edges['valid'].shape[:-1])} "
                         f"than pos {tuple(pos.shape[:-1])}")
    # [..., E, ...]
    e = {k: v.reshape(*v.shape[:at], *([1] * (lead - at)), *v.shape[at:]) for k, v in edges.items()}
    corners = _box_bottom_corners(pos, z, yaw, size)                      # [..., 4, 3]
    return signed_distance_to_edges(corners, e).max(dim=-1).values       # [...]


# ==============================================================================================
# 3.4 for the simulator: per-box candidate segments that stay exact while the box moves little
# ==============================================================================================
# A box whose bottom corners q lie within r of a point c (in z-stretched coordinates) can only pick
# (3.4) a segment s with lower bound d2(c, s) - r <= min over s' of the upper bound
# sqrt(d2(c, s')^2 + Z(c, s')^2) + r: the selection distance is sqrt(d2(q, s)^2 + z-term^2) with
# d2 the exact 2D point-segment distance (1-Lipschitz) and |z-term| <= Z = max |q'z - a'z|, |q'z - b'z|.
# So the segments passing that test contain every segment the box can pick; kept in table order,
# the first-on-ties argmin among them is the full table's.
SEG_PARTS = ("ax", "ay", "az", "abx", "aby", "abz", "den")


def edge_parts(table: dict) -> dict:
    """The road-edge table flattened over scenes for per-box candidate lists: every field of
    road_edge_table as [B E + 1, ...] (one trailing invalid dummy segment to pad lists with), plus
    SEG_PARTS [B E + 1]: a, b - a and |b - a|^2 in 2D (1 where 0, which leaves rel_t = 0 exactly as
    div_no_nan does, since its numerator is then 0)."""
    flat = {}
    for k, v in table.items():
        v = v.flatten(0, 1)                                               # [B E, ...]
        flat[k] = torch.cat([v, torch.zeros_like(v[:1])])                 # [B E + 1, ...]
    ab = flat["b"] - flat["a"]                                            # [B E + 1, 3]
    len2 = dot2(ab, ab)                                                   # [B E + 1]
    for i, c in enumerate("xyz"):
        flat["a" + c], flat["ab" + c] = flat["a"][:, i].contiguous(), ab[:, i].contiguous()  # [B E + 1]
    flat["den"] = torch.where(len2 == 0, torch.ones_like(len2), len2)      # [B E + 1]
    flat["bz"] = flat["b"][:, 2].contiguous()                             # [B E + 1]
    return flat


def selection_sq_distance_parts(qx, qy, qz, p: dict):
    """_selection_sq_distance from the segment parts p (SEG_PARTS, edge_parts), component by
    component: the same float operations in the same order, so the same bits. All broadcast.
    It is the simulator's hottest loop, hence in place (no FMA-fusing ops such as addcmul):
        t = clamp((qa_x ab_x + qa_y ab_y) / den, 0, 1);  v = qa - ab t
        d = v_x^2 + v_y^2 + (Z_STRETCH v_z)^2"""
    vx, vy, vz = qx - p["ax"], qy - p["ay"], qz - p["az"]                 # [...] qa, becomes v
    t = vx * p["abx"]                                                     # [...]
    tmp = vy * p["aby"]                                                   # [...]
    t.add_(tmp).div_(p["den"]).clamp_(0.0, 1.0)
    for v, k in ((vx, "abx"), (vy, "aby"), (vz, "abz")):
        v.sub_(torch.mul(p[k], t, out=tmp))
    vz.mul_(Z_STRETCH)
    return vx.mul_(vx).add_(vy.mul_(vy)).add_(vz.mul_(vz))


def edge_candidates(cx, cy, cz, r, parts: dict, scene, E: int, width: int = 0, chunk_elems: int = 1 << 22,
                    present=None):
    """Candidate segments of boxes whose stretched bottom corners stay within r [N] of
    (cx, cy, cz) [N] (cz = Z_STRETCH * z): ids [N, C] into edge_parts (C >= width, in table
    order, padded with the dummy B E) and ok [N, C]. scene [N] is each box's scene; present [N]
    (optional) leaves absent boxes' lists empty: a padding slot sits at the origin, far from a
    real map, and its list would hold most of the map and widen every list to it. The [N, E]
    search runs over row chunks of about chunk_elems elements: a real map has thousands of edge
    segments, and 256 worlds x 128 agents of them at once took over 10 GB."""
    n, dummy = cx.shape[0], parts["valid"].shape[0] - 1
    if E == 0 or n == 0:
        out = torch.full((n, max(width, 1)), dummy, dtype=torch.long, device=cx.device)  # [N, C]
        return out, out != dummy
    rows = max(1, chunk_elems // E)
    if n > rows:                                  # each row's list is independent of the others
        outs = [edge_candidates(cx[i:i + rows], cy[i:i + rows], cz[i:i + rows], r[i:i + rows], parts,
                                scene[i:i + rows], E, width,
                                present=None if present is None else present[i:i + rows])[0]
                for i in range(0, n, rows)]
        C = max(o.shape[1] for o in outs)
        out = torch.cat([torch.nn.functional.pad(o, (0, C - o.shape[1]), value=dummy) for o in outs])  # [N, C]
        return out, out != dummy
    # [N, E] per part: each box's scene's row of the table
    p = {k: parts[k][:dummy].view(-1, E).index_select(0, scene) for k in SEG_PARTS + ("bz", "valid")}
    qax, qay = cx.unsqueeze(1) - p["ax"], cy.unsqueeze(1) - p["ay"]        # [N, E]
    t = ((qax * p["abx"] + qay * p["aby"]) / p["den"]).clamp(0.0, 1.0)    # [N, E]
    d2 = torch.sqrt((qax - p["abx"] * t) ** 2 + (qay - p["aby"] * t) ** 2)  # [N, E] exact 2D distance
    zc = cz.unsqueeze(1)                                                  # [N, 1]
    z = torch.maximum((zc - Z_STRETCH * p["az"]).abs(), (zc - Z_STRETCH * p["bz"]).abs())  # [N, E]
    upper = torch.where(p["valid"], torch.sqrt(d2 * d2 + z * z), math.inf).amin(1)  # [N]
    bound = upper + 2 * r                                                 # [N]
    bound = bound + 1e-2 + 1e-4 * bound.abs()                             # float32 rounding margin
    keep = p["valid"] & (d2 <= bound.unsqueeze(1))                        # [N, E]
    if present is not None:
        keep &= present.unsqueeze(1)
    slot = keep.cumsum(1) - 1                                             # [N, E] place in the list
    C = max(int(slot[:, -1].max()) + 1 if keep.numel() else 0, width, 1)
    # kept segments in table order, the rest written to a spill column C that is dropped
    out = torch.full((n, C + 1), dummy, dtype=torch.long, device=cx.device)  # [N, C + 1]
    e = scene.unsqueeze(1) * E + torch.arange(E, device=cx.device)        # [N, E] flat segment ids
    out.scatter_(1, torch.where(keep, slot, C), e)
    out = out[:, :C].contiguous()                                         # [N, C]
    ok = out != dummy                                                     # [N, C]
    return out, ok


def pooled_box_edge_distance(pos, z, yaw, size, pool: dict, ids, parts: dict, has_edge):
    """box_road_edge_distance of N boxes pos [N, 2], z/yaw [N], size [N, 3] from their candidate
    lists (edge_candidates): pool the candidates' SEG_PARTS and "ok" [N, C] (gathered once per
    refresh), ids [N, C] into parts, has_edge [N] (the scene has a valid edge) -> [N]."""
    corners = _box_bottom_corners(pos, z, yaw, size)                      # [N, 4, 3]
    q = corners.unsqueeze(-2)                                             # [N, 4, 1, 3]
    p = {k: pool[k].unsqueeze(1) for k in SEG_PARTS}                      # [N, 1, C]
    d = selection_sq_distance_parts(q[..., 0], q[..., 1], q[..., 2], p)   # [N, 4, C]
    d = d.masked_fill_(~pool["ok"].unsqueeze(1), math.inf)                # [N, 4, C]
    best = ids.gather(1, d.argmin(dim=-1))                                # [N, 4] first on ties
    f = {k: _pick(parts[k], best) for k in EDGE_FIELDS}                   # [N, 4, ...]
    val = _signed_value(corners, f)                                       # [N, 4]
    return torch.where(has_edge.unsqueeze(1), val, -BIG).amax(dim=-1)


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
    # [B, Gn]
    count = torch.zeros(B, Gn, device=ok.device).scatter_add_(1, gid2,
                                                            torch.ones_like(gid2, dtype=ends.dtype))
    centre = torch.zeros(B, Gn, 3, device=ok.device)                      # [B, Gn, 3]
    centre.scatter_add_(1, gid2.unsqueeze(-1).expand(-1, -1, 3), ends)
    centre = centre / count.clamp(min=1.0).unsqueeze(-1)                  # [B, Gn, 3]
    spread = (ends - gather_rows(centre, gid2)).norm(dim=-1)                    # [B, 2E]
    radius = torch.zeros(B, Gn, device=ok.device).scatter_reduce_(1, gid2, spread, "amax")  # [B, Gn]
    first = torch.full((B, Gn), E, device=ok.device).scatter_reduce_(1, gid, k, "amin")    # [B, Gn]
    n_seg = (count / 2).long()                                            # [B, Gn]
    n_seg[:, -1] = 0                                                      # the dump group
    return centre, radius, first, n_seg


def nearest_segments(q, a, b, ok, buggy: bool = False, G: int = EDGE_GROUP):
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
    inv_len2 = div_no_nan(torch.ones_like(len2), len2)                    # [B E] (rel_t = 0 if degenerate)
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
        dist = torch.cdist(m[:, n0:n1], centre, compute_mode="donot_use_mm_for_euclid_dist")  # [B, Nc, Gn]
        # [B, Nc, Gn]
        lb = torch.where(g_ok.unsqueeze(1), (dist - radius.unsqueeze(1)).clamp(min=0.0), math.inf)
        ub = torch.where(g_ok.unsqueeze(1), dist + radius.unsqueeze(1), math.inf)  # [B, Nc, Gn]
        bound = ub.amin(-1) + 2.0 * rho[:, n0:n1]                         # [B, Nc]
        bound = bound + 1e-2 + 1e-4 * bound.abs()                         # float32 rounding margin
        # [B, Nc] (0: scene has no segment)
        need = (lb <= bound.unsqueeze(-1)).sum(-1) * torch.isfinite(bound)
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
            # [n, k]
            groups = lb.index_select(0, rows).topk(k, dim=-1, largest=False).indices.sort(dim=-1).values
            # [n, k] flat group ids, ascending
            groups = groups + group_base.index_select(0, rows).unsqueeze(1)
            rid = row_id.index_select(0, rows)                            # [n]
            qc = q_flat.index_select(0, rid)                              # [n, P, 3]
            # the same bound once more per point (rho = 0) among the row's k groups
            dq = (qc.unsqueeze(2) - _pick(centre_flat, groups).unsqueeze(1)).norm(dim=-1)  # [n, P, k]
            r_g = _pick(radius_flat, groups).unsqueeze(1)                 # [n, 1, k]
            g_in = _pick(g_ok_flat, groups).unsqueeze(1)                  # [n, 1, k]
            lb_q = torch.where(g_in, (dq - r_g).clamp(min=0.0), math.inf)  # [n, P, k]
            ub_q = torch.where(g_in, dq + r_g, math.inf).amin(-1, keepdim=True)  # [n, P, 1]
            keep = (lb_q <= ub_q + 1e-2 + 1e-4 * ub_q.abs()).view(-1, k)  # [n P, k]
            # only the kept (point, group) pairs are measured: no padding to the busiest point
            pt, slot = keep.nonzero(as_tuple=True)                        # [Np] point in batch, group slot
            g2 = groups.view(-1).index_select(0, (pt // P) * k + slot)    # [Np] flat group ids
            cand = _pick(first_flat, g2).unsqueeze(-1) + offset           # [Np, G] flat segment ids
            cand_ok = offset < _pick(n_flat, g2).unsqueeze(-1)            # [Np, G]
            cand = cand.clamp(max=B * E - 1)                              # [Np, G]
            ax, ay, az, dx, dy, dz, il = (_pick(w, cand) for w in seg)    # [Np, G]
            qp = qc.view(-1, 3).index_select(0, pt)                       # [Np, 3]
            qax, qay, qaz = (qp[:, c:c + 1] - w for c, w in enumerate((ax, ay, az)))  # [Np, G]
            t = ((qax * dx + qay * dy) * il).clamp(0.0, 1.0) * sign       # [Np, G]
            d = (qax + dx * t) ** 2 + (qay + dy * t) ** 2 + (qaz + dz * t) ** 2  # squared distance
            d = torch.where(cand_ok, d, math.inf)                         # [Np, G]
            d_pair, at = d.min(-1)                                        # [Np] first on ties in a group
            s_pair = cand.gather(-1, at.unsqueeze(-1)).squeeze(-1)        # [Np]
            # per point: the smallest distance, then the smallest segment id among its ties
            nP = rows.numel() * P
            d_best = torch.full((nP,), math.inf, device=q.device).scatter_reduce_(0, pt, d_pair, "amin")
            s_pair = torch.where(d_pair == d_best.index_select(0, pt), s_pair, B * E)  # [Np]
            best = torch.full((nP,), B * E, device=q.device).scatter_reduce_(0, pt, s_pair, "amin")  # [n P]
            best = best.view(-1, P)                                       # [n, P]
            base = E * (rid // N).unsqueeze(1)                            # [n, 1] first id of the scene
            best = torch.where(best >= B * E, base, best)                 # no valid segment: 0
            idx_out.index_copy_(0, rid, best - base)                      # back to per-scene ids
            i = j
    return idx_out.view(B, N, P)


def road_edge_distance_many(pos, z, yaw, size, table: dict, track: int = 1):
    """box_road_edge_distance for many boxes pos [B, Q, 2], z/yaw [B, Q], size [B, Q, 3] against a
    whole table [B, E] -> [B, Q], exact but pruned (scoring has ~1e5 boxes x ~5e3 segments).
    Consecutive runs of `track` boxes (one agent's steps) share one candidate search."""
    B, Q = pos.shape[:2]
    if Q % track:
        raise ValueError(f"road_edge_distance_many: {Q} boxes per scene are not a multiple of track={track}")
    if table["valid"].shape[1] == 0:
        return pos.new_full((B, Q), -BIG)
    stretch = pos.new_tensor([1.0, 1.0, Z_STRETCH])                       # [3]
    corners = _box_bottom_corners(pos, z, yaw, size)                      # [B, Q, 4, 3]
    rows = (corners * stretch).view(B, Q // track, 4 * track, 3)          # [B, Qt, 4 track, 3]
    # [B, Qt, 4 track]
    idx = nearest_segments(rows, table["a"] * stretch, table["b"] * stretch, table["valid"])
    idx = idx.view(B, Q, 4)                                               # [B, Q, 4]
    f = {k: gather_rows(v, idx) for k, v in table.items()}                      # [B, Q, 4, ...]
    return _signed_value(corners, f).amax(dim=-1)                         # [B, Q]
