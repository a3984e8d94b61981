"""The road-edge distance of scoring (3.4), exact and pruned per box: the same numbers as
geometry.road_edge_distance_many, found with less work. Spec: ../shared/research/wosac.md.

geometry.nearest_segments prunes in two levels: a row (`track` steps of one agent, 4 corners each)
keeps the segment groups that can hold the nearest segment of any of its points, then every POINT
repeats the sphere test on all of its row's groups before the kept segments are measured. With
~50 groups per row that per-point test is most of the cost. Here the second level is per BOX
(its 4 bottom corners lie within rho_b of their mean m_b): with d_g = |m_b - c_g| and sphere
radius r_g, a corner's nearest segment lies in a group with

    max(d_g - r_g, 0) <= min_g' (d_g' + r_g') + 2 rho_b

(the same bound the rows use), a quarter of the tests. The kept (box, group) pairs are then
measured for all 4 corners at once from a group-major table (one row of G segments x 7 floats
per group: one gather instead of seven scattered ones). The squared distance is computed with
exactly the ops of nearest_segments, and ties go to the smallest segment id, so the chosen
segment, hence the value, is the same (tested in tests/test_speed_equivalence.py).
"""
from __future__ import annotations

import math

import torch

from geometry import (BIG, EDGE_GROUP, Z_STRETCH, _box_bottom_corners, _segment_spheres, _signed_value,
                      div_no_nan, gather_rows)

CHUNK = 1 << 22                   # elements per pairwise tensor of the row stage (geometry.CHUNK)
BATCH = 1 << 22                   # (point, segment) pairs per batch of rows


def _margin(x: torch.Tensor) -> torch.Tensor:
    """float32 rounding slack of a bound, as geometry.nearest_segments allows."""
    return x + 1e-2 + 1e-4 * x.abs()


def _norm3(v: torch.Tensor) -> torch.Tensor:
    """|v| over a last dim of 3, by components (a norm reduction over 3 values is slow on CPU)."""
    return torch.sqrt(v[..., 0] ** 2 + v[..., 1] ** 2 + v[..., 2] ** 2)


def _group_table(a, b, ok, G: int):
    """Bounding spheres of runs of G chained segments (geometry._segment_spheres) and, per group,
    its G segments as 7 tables ax, ay, az, dx, dy, dz, 1/len2d^2 (az = inf for padding slots, so
    their distance is inf). a, b [B, E, 3], ok [B, E] -> centre [B Gn, 3], radius [B Gn],
    g_ok [B Gn], Gn, pack (7 x [B Gn, G]), seg_id [B Gn, G] (flat over scenes, B E = none)."""
    B, E = ok.shape
    chained = torch.zeros_like(ok)                                        # [B, E]
    chained[:, 1:] = (a[:, 1:] == b[:, :-1]).all(-1) & ok[:, 1:] & ok[:, :-1]
    centre, radius, first, n_seg = _segment_spheres(a, b, ok, chained, G)  # [B, Gn, ...]
    Gn = centre.shape[1]
    ab = (b - a).flatten(0, 1)                                            # [B E, 3]
    len2 = ab[:, 0] ** 2 + ab[:, 1] ** 2                                  # [B E]
    inv_len2 = div_no_nan(torch.ones_like(len2), len2)                    # [B E]
    seg = torch.cat([a.flatten(0, 1), ab, inv_len2.unsqueeze(1)], 1)      # [B E, 7]
    offset = torch.arange(G, device=ok.device)                            # [G]
    first_flat = (first + E * torch.arange(B, device=ok.device).unsqueeze(1)).flatten()  # [B Gn]
    seg_id = first_flat.unsqueeze(1) + offset                             # [B Gn, G]
    slot_ok = offset < n_seg.flatten().unsqueeze(1)                       # [B Gn, G]
    seg_id = torch.where(slot_ok, seg_id, B * E)                          # [B Gn, G]
    pack = seg.index_select(0, seg_id.clamp(max=B * E - 1).flatten()).view(B * Gn, G, 7)  # [B Gn, G, 7]
    pack[..., 2] = torch.where(slot_ok, pack[..., 2], math.inf)          # padding: infinitely far
    pack[..., 5] = torch.where(slot_ok, pack[..., 5], 0.0)               # (inf + 0 t)^2 = inf
    pack = [c.contiguous() for c in pack.unbind(-1)]                      # 7 x [B Gn, G], one table per field
    return centre.flatten(0, 1), radius.flatten(), (n_seg > 0).flatten(), Gn, pack, seg_id


def _segment_sq_distance(qp, gid, pack, seg_id):
    """Squared selection distance (3.4, z stretched) of points qp [X, 3] to the G segments of
    groups gid [X], with exactly the ops of geometry.nearest_segments -> the smallest [X] and its
    segment id [X] (the first on ties, ids ascend within a group)."""
    ax, ay, az, dx, dy, dz, il = (w.index_select(0, gid) for w in pack)  # [X, G] each
    qax, qay, qaz = qp[:, 0:1] - ax, qp[:, 1:2] - ay, qp[:, 2:3] - az    # [X, G]
    t = ((qax * dx + qay * dy) * il).clamp(0.0, 1.0) * -1.0              # [X, G]
    d = (qax + dx * t) ** 2 + (qay + dy * t) ** 2 + (qaz + dz * t) ** 2  # [X, G] squared
    d_min, at = d.min(-1)                                                 # [X]
    return d_min, seg_id.index_select(0, gid).gather(1, at.unsqueeze(1)).squeeze(1)


def nearest_edge_per_corner(corners, a, b, ok, track: int, G: int = EDGE_GROUP):
    """Nearest segment of every box corner: corners [B, Q, 4, 3] (z already stretched), segments
    a, b [B, E, 3] (stretched), ok [B, E] -> idx [B, Q, 4] into E (0 where a scene has none).
    Runs of `track` boxes (one agent's consecutive steps) share the row-level search."""
    B, Q = corners.shape[:2]
    E, dev = ok.shape[1], corners.device
    idx_out = torch.zeros(B * Q * 4, dtype=torch.long, device=dev)       # [B Q 4]
    if E == 0 or Q == 0:
        return idx_out.view(B, Q, 4)
    centre, radius, g_ok, Gn, pack, seg_id = _group_table(a, b, ok, G)   # [B Gn, ...]
    N, P = Q // track, 4 * track
    q = corners.reshape(B, N, P, 3)                                       # [B, N, P, 3] rows
    m = q.mean(dim=2)                                                     # [B, N, 3] row centres
    rho = _norm3(q - m.unsqueeze(2)).amax(dim=-1)                         # [B, N]
    box = corners.reshape(B * N, track, 4, 3)                             # [B N, track, 4, 3]
    m_b = box.mean(dim=2)                                                 # [B N, track, 3] box centres
    rho_b = _norm3(box - m_b.unsqueeze(2)).amax(dim=-1)                   # [B N, track]
    scene_of = torch.arange(B, device=dev).unsqueeze(1)                   # [B, 1]
    step = max(1, CHUNK // max(1, B * Gn))
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        # rows: the groups that can hold a nearest segment of any point of the row (as nearest_segments)
        dist = torch.cdist(m[:, n0:n1], centre.view(B, Gn, 3), compute_mode="donot_use_mm_for_euclid_dist")
        r, gk = radius.view(B, 1, Gn), g_ok.view(B, 1, Gn)                # [B, 1, Gn]
        lb = torch.where(gk, (dist - r).clamp(min=0.0), math.inf)         # [B, Nc, Gn]
        ub = torch.where(gk, dist + r, math.inf)                          # [B, Nc, Gn]
        bound = _margin(ub.amin(-1) + 2.0 * rho[:, n0:n1])                # [B, Nc]
        need = (lb <= bound.unsqueeze(-1)).sum(-1) * torch.isfinite(bound)  # [B, Nc] 0: no segment
        need, order = need.flatten().sort()                               # [Rn] fewest groups first
        lb = lb.flatten(0, 1)                                             # [Rn, Gn]
        row_id = (scene_of * N + torch.arange(n0, n1, device=dev)).flatten()  # [Rn] into B N
        group_base = (scene_of * Gn).expand(B, n1 - n0).flatten()         # [Rn]
        i, Rn = 0, need.shape[0]
        while i < Rn:
            cost = torch.arange(1, Rn - i + 1, device=dev) * need[i:].clamp(min=1) * (P * G)  # [Rn - i]
            j = i + max(1, int((cost <= BATCH).sum()))
            rows = order[i:j]                                             # [n]
            k = max(1, int(need[j - 1]))
            # [n, k] the row's groups, flat ids
            groups = lb.index_select(0, rows).topk(k, dim=-1, largest=False).indices.sort(dim=-1).values
            groups = groups + group_base.index_select(0, rows).unsqueeze(1)  # [n, k]
            rid = row_id.index_select(0, rows)                            # [n]
            # boxes: the same bound per box centre, with rho_b, against an exact upper bound: the
            # corners' distances to the segments of the box's most promising group
            mb = m_b.index_select(0, rid)                                 # [n, track, 3]
            cg = centre.index_select(0, groups.flatten()).view(-1, k, 3)  # [n, k, 3]
            d_b = torch.cdist(mb, cg, compute_mode="donot_use_mm_for_euclid_dist")  # [n, track, k]
            r_g = radius.index_select(0, groups.flatten()).view(-1, 1, k)  # [n, 1, k]
            in_g = g_ok.index_select(0, groups.flatten()).view(-1, 1, k)  # [n, 1, k]
            lb_b = torch.where(in_g, (d_b - r_g).clamp(min=0.0), math.inf)  # [n, track, k]
            first = lb_b.argmin(-1, keepdim=True)                         # [n, track, 1]
            g1 = groups.gather(1, first.view(-1, track)).view(-1)         # [n track] flat group ids
            box_flat = rid.unsqueeze(1) * track + torch.arange(track, device=dev)  # [n, track] into B N track
            qb_all = box.view(-1, 4, 3).index_select(0, box_flat.view(-1))  # [n track, 4, 3]
            d1, s1 = _segment_sq_distance(qb_all.view(-1, 3), g1.repeat_interleave(4), pack, seg_id)  # [n track 4]
            ub_c = torch.sqrt(d1).view(-1, 4)                             # [n track, 4] exact upper bounds
            bound_b = _margin(ub_c.amax(-1).view(-1, track) + rho_b.index_select(0, rid))  # [n, track]
            keep_b = lb_b <= bound_b.unsqueeze(-1)                        # [n, track, k]
            keep_b.scatter_(-1, first, False)                             # measured already
            bx, slot = keep_b.view(-1, k).nonzero(as_tuple=True)          # [Nb] box, group
            g2 = groups.view(-1).index_select(0, (bx // track) * k + slot)  # [Nb] flat group ids
            # corners: the test once more per corner (rho = 0), against its exact upper bound
            qb = qb_all.index_select(0, bx)                               # [Nb, 4, 3]
            d_c = _norm3(qb - centre.index_select(0, g2).unsqueeze(1))    # [Nb, 4]
            r_c = radius.index_select(0, g2).unsqueeze(1)                 # [Nb, 1]
            lb_c = (d_c - r_c).clamp(min=0.0)                             # [Nb, 4]
            pair, corner = (lb_c <= _margin(ub_c.index_select(0, bx))).nonzero(as_tuple=True)  # [Nk] kept
            # the kept (corner, group) pairs and the first group's results: G segments each
            d_pair, s_pair = _segment_sq_distance(qb.view(-1, 3).index_select(0, pair * 4 + corner),
                                                  g2.index_select(0, pair), pack, seg_id)  # [Nk]
            pt = torch.cat([torch.arange(d1.numel(), device=dev), (bx.index_select(0, pair) * 4 + corner)])  # [N1 + Nk]
            d_pair, s_pair = torch.cat([d1, d_pair]), torch.cat([s1, s_pair])  # [N1 + Nk] corner in batch
            nP = rows.numel() * P
            # per corner: the smallest distance, then the smallest segment id among its ties
            d_best = torch.full((nP,), math.inf, device=dev).scatter_reduce_(0, pt, d_pair, "amin")  # [n P]
            s_pair = torch.where(d_pair == d_best.index_select(0, pt), s_pair, B * E)  # [N1 + Nk]
            best = torch.full((nP,), B * E, device=dev).scatter_reduce_(0, pt, s_pair, "amin")  # [n P]
            best = best.view(-1, P)                                       # [n, P]
            base = E * (rid // N).unsqueeze(1)                            # [n, 1] first id of the scene
            best = torch.where(best >= B * E, base, best) - base          # [n, P] per-scene ids
            at_out = (rid.unsqueeze(1) * P + torch.arange(P, device=dev)).flatten()  # [n P]
            idx_out.index_copy_(0, at_out, best.flatten())
            i = j
    return idx_out.view(B, Q, 4)


def road_edge_distance(pos, z, yaw, size, table: dict, track: int):
    """geometry.road_edge_distance_many, same arguments and result: boxes pos [B, Q, 2],
    z/yaw [B, Q], size [B, Q, 3] against a whole table [B, E] -> [B, Q] signed distances."""
    B, Q = pos.shape[:2]
    if Q % track:
        raise ValueError(f"road_edge_distance: {Q} boxes per scene are not a multiple of track={track}")
    if table["valid"].shape[1] == 0:
        return pos.new_full((B, Q), -BIG)
    stretch = pos.new_tensor([1.0, 1.0, Z_STRETCH])                       # [3]
    corners = _box_bottom_corners(pos, z, yaw, size)                      # [B, Q, 4, 3]
    idx = nearest_edge_per_corner(corners * stretch, table["a"] * stretch, table["b"] * stretch,
                                  table["valid"], track)                  # [B, Q, 4]
    f = {k: gather_rows(v, idx) for k, v in table.items()}                # [B, Q, 4, ...]
    return _signed_value(corners, f).amax(dim=-1)                         # [B, Q]
