"""Toy scenes: procedural maps whose logs the stochastic human driver writes.

Scenes are generated deterministically from a seed on five layouts (straight and curved two-way
roads, a four-way intersection, a T-junction, an on-ramp merge), with lane centre lines, road
edges, crosswalks and stop lines; vehicles, pedestrians and cyclists follow routes along them.
Their logs come from driving the scene closed loop with `human_driver.py` through
`env.bicycle_step`, so re-running that driver from the same first 11 steps samples the *true*
behaviour distribution (the realism ceiling). A scene whose log has a collision, an off-road box
or a NaN, measured with the metric's own geometry (`geometry.py`), is rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from env import bicycle_step
from geometry import box_road_edge_distance, object_distance_matrix, road_edge_table, signed_distance_to_edges
from human_driver import DriverConfig, HumanDriver
from scenes import (CROSSWALK, DT, EDGE_CODE, LANE, NOW, OTHER, ROAD_EDGE, ROAD_LINE, SURFACE_STREET_LANE, T,
                    Scenes, collate, load_scenes, polylines_to_segments, save_scenes, scene_from_numpy)

# Procedural scenes on five layouts: a two-way road with 2 lanes each way and a mid-block
# crosswalk, the same road curved, a four-way intersection (all-way or two-way stop) and a
# T-junction (1 lane each way, crosswalks on every arm, left / straight / right movements), and an
# on-ramp merging through an acceleration lane. Right-hand traffic. The logs are driven by the
# stochastic closed-loop human driver of human_driver.py. Map conventions:
# - LANE centre lines (seg_code 2, surface street), painted ROAD_LINEs (12 double yellow centre,
#   6 broken white dividers), closed CROSSWALK polygons (18), and on stop-controlled approaches a
#   stop line: a 2-point OTHER polyline with WOMD's stop-sign code 17 (the driver reads it).
# - Sidewalks lie INSIDE the road-edge boundary: each ROAD_EDGE (15) runs along the outer side of a
#   sidewalk strip, with the road (and the sidewalk) on its left. WOMD puts edges at the kerb; we
#   do not, on purpose: pedestrians walk on sidewalks, and "generated logs contain no off-road box"
#   must hold for every agent type under the WOSAC off-road metric. Vehicles still keep lanes.
# - Scene (seed, index, attempt) is deterministic; a scene whose log has a collision, an off-road
#   box or a NaN (the metric's geometry (geometry.py)) is rebuilt with the next attempt number.
TOY_VERSION = 2   # part of the cache key: bump it when the generator changes
_TOY_SPLITS = ("train", "val", "test")


@dataclass
class ToyConfig:
    max_agents: int = 32                     # agents per scene at most (A)
    min_agents: int = 8                      # agents asked for at least (fewer if the layout is full)
    frac_pedestrian: float = 0.15            # expected share of pedestrians
    frac_cyclist: float = 0.10               # expected share of cyclists (the rest are vehicles)
    layouts: tuple = ("straight", "curve", "fourway", "tjunction", "merge")  # used round-robin
    lane_width: tuple = (3.5, 3.7)           # m, drawn per scene
    sidewalk_width: tuple = (3.0, 3.6)       # m, between the carriageway and the road edge
    arm_length: float = 110.0                # m, from the middle of the map to its boundary
    seg_len: float = 2.0                     # m, longest map segment
    route_step: float = 1.0                  # m, longest step between route points
    road_lines: bool = True                  # draw painted lines (centre line, lane dividers)
    burn_in: int = 20                        # steps driven before step 0 and not recorded
    vehicle_speed: tuple = (9.0, 15.0)       # m/s, desired speeds on open roads (x0.75 at junctions)
    pedestrian_speed: tuple = (1.0, 1.8)     # m/s, desired walking speeds
    cyclist_speed: tuple = (3.0, 6.0)        # m/s, desired cycling speeds
    headway: tuple = (1.0, 2.0)              # s, IDM time headway of vehicles and cyclists
    min_gap: tuple = (1.5, 3.0)              # m, IDM standstill gap of vehicles
    comfort_decel: tuple = (1.5, 3.0)        # m/s^2, IDM comfortable braking of vehicles
    max_attempts: int = 10                   # rebuilds of a scene whose log fails the checks


# ---- polyline geometry (numpy, one scene; polylines are [P, 2]) -------------------------------
def _unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def _arclen(p):
    return np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])  # [P]


def _resample(p, step):
    """Points at equal spacing <= step along a polyline [P, 2], both ends kept -> [P', 2]."""
    p = p[np.concatenate([[True], np.linalg.norm(np.diff(p, axis=0), axis=1) > 1e-6])]  # [P, 2] no repeats
    s = _arclen(p)                                                        # [P]
    t = np.linspace(0.0, s[-1], max(int(np.ceil(s[-1] / step - 1e-6)), 1) + 1)  # [P']
    return np.stack([np.interp(t, s, p[:, 0]), np.interp(t, s, p[:, 1])], 1)


def _offset(p, d):
    """The polyline shifted by d to its left (d < 0: right) -> [P, 2]."""
    u = _unit(np.gradient(p, axis=0))                                     # [P, 2]
    return p + d * np.stack([-u[:, 1], u[:, 0]], 1)


def _line(a, b):
    """Straight polyline from a to b, points every <= 0.5 m -> [P, 2]."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = max(int(np.ceil(np.linalg.norm(b - a) / 0.5)), 1)
    return a + (b - a) * np.linspace(0, 1, n + 1)[:, None]


def _arc(c, r, a0, a1):
    """Circular arc around c of radius r from angle a0 to a1 -> [P, 2]."""
    a = np.linspace(a0, a1, max(int(np.ceil(abs(a1 - a0) * r / 0.5)), 2) + 1)  # [P]
    return np.asarray(c) + r * np.stack([np.cos(a), np.sin(a)], 1)


def _bezier(p0, d0, p3, d3):
    """Cubic from p0 leaving along d0 to p3 arriving along d3; handles of 0.39 chord make a
    right-angle turn nearly circular. -> [P, 2]"""
    k = 0.39 * np.linalg.norm(p3 - p0)
    t = np.linspace(0, 1, max(int(np.ceil(np.linalg.norm(p3 - p0) / 0.4)), 4) + 1)[:, None]  # [P, 1]
    p1, p2 = p0 + k * d0, p3 - k * d3
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3


def _smooth(p, window=2.5):
    """Round the sharp corners of a pedestrian path: three moving averages over ~window metres."""
    p = _resample(p, 0.25)                                                # [P, 2]
    n = max(int(window / 0.25) // 2, 1)
    for _ in range(3):
        q = np.concatenate([np.repeat(p[:1], n, 0), p, np.repeat(p[-1:], n, 0)])  # [P + 2n, 2]
        c = np.cumsum(np.concatenate([np.zeros((1, 2)), q]), axis=0)      # [P + 2n + 1, 2]
        p = np.concatenate([p[:1], ((c[2 * n + 1:] - c[:-2 * n - 1]) / (2 * n + 1))[1:-1], p[-1:]])  # [P, 2]
    return p


def _nearest(p, q):
    return int(np.argmin(((p - q) ** 2).sum(1)))


def _crosswalk(c, u, half_along, half_across):
    """Closed rectangle centred at c, half_along along the road direction u -> [5, 2]."""
    n = np.array([-u[1], u[0]])
    poly = [c - half_along * u - half_across * n, c + half_along * u - half_across * n,
            c + half_along * u + half_across * n, c - half_along * u + half_across * n]
    return np.array(poly + [poly[0]])


# ---- routes: (polyline or a function that makes it, spawn interval in m along it, weight) ----
def _walk_routes(walk, keep_end=25.0):
    """Pedestrians walking along a sidewalk centre line, both directions."""
    L = _arclen(walk)[-1]
    return [(w, (2.0, L - keep_end), 1.0) for w in (walk, walk[::-1])] if L > keep_end + 5 else []


def _crossings(walk_a, walk_b, pa, pb, reach=30.0):
    """Pedestrians walking along walk_a to pa, across the road to pb and on along walk_b (either
    direction on each side, ~reach metres each), spawned 2-16 m before the kerb. The smoothing is
    paid only for routes that someone takes."""
    out = []
    for wa in (walk_a, walk_a[::-1]):
        before = wa[:_nearest(wa, pa) + 1]                                # [P, 2]
        before = before[_arclen(before) >= _arclen(before)[-1] - reach]
        for wb in (walk_b, walk_b[::-1]):
            after = wb[_nearest(wb, pb):]                                 # [P, 2]
            after = after[_arclen(after) <= reach]
            if len(before) < 4 or len(after) < 4:
                continue
            lb = _arclen(before)[-1]
            make = lambda b=before, a=after: _smooth(np.concatenate([b, _line(pa, pb), a]))
            out.append((make, (max(lb - 16.0, 1.0), max(lb - 2.0, 1.5)), 0.3))
    return out


def _new_layout():
    return {"map": [], "routes": {0: [], 1: [], 2: []}, "speed": 1.0}


def _add_vehicle_route(lay, route, spawn, weight=1.0):
    lay["routes"][0].append((route, spawn, weight))
    lay["routes"][2].append((_offset(route, -0.5), spawn, weight))       # cyclists keep to the right


# ---- layouts: map polylines (polyline, type, code) and routes per agent type -----------------
def _corridor(lay, ref, nl, w, sw, cfg, s_cw=None):
    """A two-way road of nl lanes each way along a dense reference line (traffic keeps right),
    with an optional crosswalk at arc length s_cw."""
    h = nl * w + sw                                                       # half width up to the edge
    for k in range(nl):
        fwd, bwd = _offset(ref, -(k + 0.5) * w), _offset(ref, (k + 0.5) * w)[::-1]  # [P, 2]
        lay["map"] += [(fwd, LANE, SURFACE_STREET_LANE), (bwd, LANE, SURFACE_STREET_LANE)]
        for r in (fwd, bwd):
            _add_vehicle_route(lay, r, (3.0, 0.45 * _arclen(ref)[-1]))
    if cfg.road_lines:
        lay["map"].append((ref, ROAD_LINE, 12))
        for k in range(1, nl):
            lay["map"] += [(_offset(ref, -k * w), ROAD_LINE, 6), (_offset(ref, k * w), ROAD_LINE, 6)]
    right, left = _offset(ref, -h), _offset(ref, h)[::-1]                 # [P, 2] road on their left
    lay["map"] += [(right, ROAD_EDGE, EDGE_CODE), (left, ROAD_EDGE, EDGE_CODE)]
    walks = [_offset(right, 0.5 * sw), _offset(left, 0.5 * sw)]          # sidewalk centre lines
    for wk in walks:
        lay["routes"][1] += _walk_routes(wk)
    if s_cw is not None:
        i = _nearest(_arclen(ref)[:, None], np.array([s_cw]))
        c, u = ref[i], _unit(ref[min(i + 1, len(ref) - 1)] - ref[max(i - 1, 0)])
        lay["map"].append((_crosswalk(c, u, 2.0, nl * w + 0.5), CROSSWALK, 18))
        pa, pb = walks[0][_nearest(walks[0], c)], walks[1][_nearest(walks[1], c)]
        lay["routes"][1] += _crossings(walks[0], walks[1], pa, pb) + _crossings(walks[1], walks[0], pb, pa)


def _toy_straight(rng, w, sw, cfg):
    lay, L = _new_layout(), cfg.arm_length
    _corridor(lay, _line([-L, 0.0], [L, 0.0]), 2, w, sw, cfg, s_cw=L + rng.uniform(-30, 30))
    return lay


def _toy_curve(rng, w, sw, cfg):
    """Straight, an arc of radius 35-70 m turning 45-90 degrees either way, straight."""
    lay, L = _new_layout(), cfg.arm_length
    R, th = rng.uniform(35.0, 70.0), rng.uniform(0.8, 1.6) * rng.choice([-1.0, 1.0])
    a, sg = L - 0.5 * R * abs(th), np.sign(th)
    arc = _arc([0.0, sg * R], R, -sg * np.pi / 2, -sg * np.pi / 2 + th)  # [P, 2] from the origin
    end = arc[-1] + a * np.array([np.cos(th), np.sin(th)])
    ref = np.concatenate([_line([-a, 0.0], [0.0, 0.0]), arc[1:], _line(arc[-1], end)[1:]])  # [P, 2]
    ref = _resample(ref, 0.5)                                             # [P, 2]
    _corridor(lay, ref, 2, w, sw, cfg, s_cw=rng.uniform(0.3, 0.8) * a if rng.random() < 0.7 else None)
    return lay


def _junction(rng, phis, w, sw, cfg, stop_arms):
    """Arms at angles phis (counter-clockwise, pointing out), one lane each way, a crosswalk on every
    arm, a stop line on the arms in stop_arms, and lane connectors between every pair of arms.

    The road edge between arm k and the next arm k2 follows arm k's left side in, turns around the
    block corner on an arc of radius rf (tangent to both sides) and follows arm k2's right side
    out, so the road stays on its left. Arms that are opposite (a T's through road) join straight."""
    lay, L, nl = _new_layout(), cfg.arm_length, 1
    lay["speed"] = 0.75
    h, rf, cw = nl * w + sw, rng.uniform(3.0, 6.0), rng.uniform(3.0, 4.0)
    K = len(phis)
    u = [np.array([np.cos(p), np.sin(p)]) for p in phis]                 # K x [2] out along the arm
    n = [np.array([-np.sin(p), np.cos(p)]) for p in phis]                # K x [2] its left
    s0, corners = [-np.inf] * K, []                                       # where each arm's edges begin
    for k in range(K):
        k2 = (k + 1) % K
        dphi = (phis[k2] - phis[k]) % (2 * np.pi)
        if abs(dphi - np.pi) < 1e-3:
            corners.append(None)
            continue
        st = np.linalg.solve(np.stack([u[k], -u[k2]], 1), -h * n[k2] - h * n[k])  # the two sides meet at X
        X = h * n[k] + st[0] * u[k]
        T1, T2 = X + rf / np.tan(dphi / 2) * u[k], X + rf / np.tan(dphi / 2) * u[k2]  # tangent points
        C = X + rf / np.sin(dphi / 2) * _unit(u[k] + u[k2])             # arc centre, in the block
        s0[k], s0[k2] = max(s0[k], T1 @ u[k]), max(s0[k2], T2 @ u[k2])
        corners.append((T1, C, T2))
    walks = []
    for k in range(K):
        k2 = (k + 1) % K
        a, b = h * n[k] + L * u[k], -h * n[k2] + L * u[k2]
        if corners[k] is None:
            edge = _line(a, b)                                            # [P, 2]
        else:
            T1, C, T2 = corners[k]
            a1, a2 = np.arctan2(*(T1 - C)[::-1]), np.arctan2(*(T2 - C)[::-1])
            da = (a2 - a1 + np.pi) % (2 * np.pi) - np.pi
            edge = np.concatenate([_line(a, T1), _arc(C, rf, a1, a1 + da)[1:], _line(T2, b)[1:]])  # [P, 2]
        lay["map"].append((edge, ROAD_EDGE, EDGE_CODE))
        walks.append(_offset(_resample(edge, 0.5), 0.5 * sw))             # sidewalk around the block corner
        lay["routes"][1] += _walk_routes(walks[-1], keep_end=60.0)
    s_lane = []                                                           # where the arms' lanes end
    for k in range(K):
        s_cw = s0[k] + 1.0 + 0.5 * cw
        s_lane.append(s_cw + 0.5 * cw + 1.5)
        lay["map"].append((_crosswalk(s_cw * u[k], u[k], 0.5 * cw, nl * w + 0.5), CROSSWALK, 18))
        if k in stop_arms:                                                # across the incoming lane
            stop = np.stack([s_lane[k] * u[k] + 0.2 * n[k],
                             s_lane[k] * u[k] + (nl * w - 0.2) * n[k]])  # [2, 2]
            lay["map"].append((stop, OTHER, 17))
        if cfg.road_lines:
            lay["map"].append((_line(s_lane[k] * u[k], L * u[k]), ROAD_LINE, 12))
        side_r, side_l = walks[(k - 1) % K], walks[k]                     # the arm's right and left sidewalks
        pa = s_cw * u[k] - (nl * w + 0.5 * sw) * n[k]
        pb = s_cw * u[k] + (nl * w + 0.5 * sw) * n[k]
        lay["routes"][1] += _crossings(side_r, side_l, pa, pb) + _crossings(side_l, side_r, pb, pa)
    lanes_in = [_line(L * u[k] + 0.5 * w * n[k], s_lane[k] * u[k] + 0.5 * w * n[k]) for k in range(K)]
    lanes_out = [_line(s_lane[k] * u[k] - 0.5 * w * n[k], L * u[k] - 0.5 * w * n[k]) for k in range(K)]
    lay["map"] += [(p, LANE, SURFACE_STREET_LANE) for p in lanes_in + lanes_out]
    for i in range(K):
        for k in range(K):
            if k != i:                                                    # left, straight or right
                conn = _bezier(lanes_in[i][-1], -u[i], lanes_out[k][0], u[k])  # [P, 2]
                lay["map"].append((conn, LANE, SURFACE_STREET_LANE))
                route = np.concatenate([lanes_in[i], conn[1:], lanes_out[k][1:]])  # [P, 2]
                _add_vehicle_route(lay, route, (3.0, _arclen(lanes_in[i])[-1] - 12.0))
    for k in range(K):                                                    # some already past the junction
        _add_vehicle_route(lay, lanes_out[k], (3.0, 0.5 * _arclen(lanes_out[k])[-1]), weight=0.5)
    return lay


def _toy_fourway(rng, w, sw, cfg):
    phi0 = rng.uniform(-0.15, 0.15)
    phis = [phi0 + k * np.pi / 2 + rng.uniform(-0.1, 0.1) * (k % 2) for k in range(4)]
    stops = (0, 1, 2, 3) if rng.random() < 0.5 else (1, 3)               # all-way or two-way stop
    return _junction(rng, phis, w, sw, cfg, stops)


def _toy_tjunction(rng, w, sw, cfg):
    return _junction(rng, [0.0, np.pi / 2 + rng.uniform(-0.25, 0.25), np.pi], w, sw, cfg, (1,))


def _toy_merge(rng, w, sw, cfg):
    """Two lanes each way along x; an on-ramp from the south-west bends into an acceleration lane
    that tapers into the outer eastbound lane. The south road edge is the outer side of the ramp
    route; a second edge runs round the gore between the ramp and the main road."""
    lay, L = _new_layout(), cfg.arm_length
    for k in range(2):
        east = _line([-L, -(k + 0.5) * w], [L, -(k + 0.5) * w])           # [P, 2]
        west = _line([L, (k + 0.5) * w], [-L, (k + 0.5) * w])             # [P, 2]
        lay["map"] += [(east, LANE, SURFACE_STREET_LANE), (west, LANE, SURFACE_STREET_LANE)]
        _add_vehicle_route(lay, east, (3.0, 0.9 * L))
        _add_vehicle_route(lay, west, (3.0, 0.9 * L))
    xa = rng.uniform(-45.0, -25.0)                                        # acceleration lane [xa, xb]
    xb, taper, alpha, R, ya = xa + rng.uniform(40.0, 60.0), 30.0, rng.uniform(0.25, 0.4), 60.0, -2.5 * w
    arc = _arc([xa, ya - R], R, np.pi / 2 + alpha, np.pi / 2)            # [P, 2] bends to heading east
    feed = arc[0] - (arc[0][0] + L) / np.cos(alpha) * np.array([np.cos(alpha), np.sin(alpha)])
    tx = np.linspace(0, 1, 61)[:, None]                                   # [61, 1]
    tap = np.concatenate([xb + taper * tx, ya + w * (1 - np.cos(np.pi * tx)) / 2], 1)  # [61, 2] S-shaped
    ramp = np.concatenate([_line(feed, arc[0]), arc[1:], _line([xa, ya], [xb, ya])[1:], tap[1:]])  # [P, 2]
    ramp = _resample(ramp, 0.5)                                           # [P, 2]
    full = np.concatenate([ramp, _line(tap[-1], [L, -1.5 * w])[1:]])     # [P, 2] ramp, then the outer lane
    lay["map"].append((ramp, LANE, SURFACE_STREET_LANE))
    _add_vehicle_route(lay, full, (3.0, _arclen(ramp)[_nearest(ramp, np.array([xa, ya]))] - 10.0), weight=2.0)
    south = _offset(_resample(full, 0.5), -(0.5 * w + sw))                # [P, 2]
    ye = -(2 * w + sw)                                                    # main road's south edge
    ramp_left = _offset(ramp, 0.5 * w + sw)                               # [P, 2]
    i = int(np.argmax(ramp_left[:, 1] >= ye))                             # the edges meet: the gore tip
    r0, r1 = ramp_left[i - 1], ramp_left[i]                               # [2] each, across ye
    X = r0 + (ye - r0[1]) / (r1[1] - r0[1]) * (r1 - r0)                   # [2]
    gore = np.concatenate([_line([-L, ye], X), ramp_left[:i][::-1]])      # [P, 2]
    north = _line([L, 2 * w + sw], [-L, 2 * w + sw])
    lay["map"] += [(south, ROAD_EDGE, EDGE_CODE), (gore, ROAD_EDGE, EDGE_CODE), (north, ROAD_EDGE, EDGE_CODE)]
    if cfg.road_lines:
        lay["map"] += [(_line([-L, 0.0], [L, 0.0]), ROAD_LINE, 12), (_line([-L, w], [L, w]), ROAD_LINE, 6),
                       (_line([-L, -w], [L, -w]), ROAD_LINE, 6),
                       (_line([xa, -2 * w], [xb, -2 * w]), ROAD_LINE, 6)]
    walk_s = _offset(south, 0.5 * sw)                                     # [P, 2]
    for wk in (_offset(north, 0.5 * sw), walk_s[walk_s[:, 0] > xb + taper + 5.0],
               _offset(_line([-L, ye], [X[0] - 15.0, ye]), 0.5 * sw)):
        lay["routes"][1] += _walk_routes(wk)
    return lay


_LAYOUTS = {"straight": _toy_straight, "curve": _toy_curve, "fourway": _toy_fourway,
            "tjunction": _toy_tjunction, "merge": _toy_merge}


# ---- agents ----------------------------------------------------------------------------------
def _pose_on(route, sl, s):
    """Position and heading at arc length s along a dense polyline with arc lengths sl."""
    i = min(max(int(np.searchsorted(sl, s)), 1), len(route) - 1)
    f = (s - sl[i - 1]) / max(sl[i] - sl[i - 1], 1e-9)
    d = route[i] - route[i - 1]
    return route[i - 1] + f * d, float(np.arctan2(d[1], d[0]))


def _toy_style(rng, typ, speed, cfg):
    """Box size [3] and driver style [4] (v0, T, s0, b) of a new agent of type typ."""
    if typ == 0:
        return ([rng.uniform(4.0, 5.2), rng.uniform(1.8, 2.1), 1.5],
                [rng.uniform(*cfg.vehicle_speed) * speed, rng.uniform(*cfg.headway),
                 rng.uniform(*cfg.min_gap), rng.uniform(*cfg.comfort_decel)])
    if typ == 1:
        d = rng.uniform(0.7, 0.9)
        return [d, d, 1.7], [rng.uniform(*cfg.pedestrian_speed), rng.uniform(0.6, 1.0),
                             rng.uniform(0.4, 0.7), rng.uniform(1.0, 2.0)]
    return ([rng.uniform(1.7, 1.9), rng.uniform(0.6, 0.8), 1.7],
            [rng.uniform(*cfg.cyclist_speed), rng.uniform(*cfg.headway),
             rng.uniform(1.0, 2.0), rng.uniform(1.5, 2.5)])


def _toy_agents(rng, lay, cfg, place):
    """Agents on their routes at their start (the start of the burn-in), without overlaps: each
    takes the first free spot among up to 3 x 4 candidates, keeping a headway to agents in its
    lane. place(route, type) maps a layout route into the scene frame. -> list of dicts."""
    n = int(rng.integers(cfg.min_agents, cfg.max_agents + 1))
    p_ped = cfg.frac_pedestrian if lay["routes"][1] else 0.0
    types = rng.choice(3, size=n, p=[1 - p_ped - cfg.frac_cyclist, p_ped, cfg.frac_cyclist])  # [n]
    built, agents = {}, []
    P, S, V = np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0)             # placed positions, sizes, speeds
    for typ in map(int, types):
        routes = lay["routes"][typ]
        wts = np.array([r[2] for r in routes])                            # [R]
        size, style = _toy_style(rng, typ, lay["speed"], cfg)
        reach = style[0] * (T + cfg.burn_in) * DT                         # m covered at v0 in burn-in + log
        for _ in range(3):
            cand = []
            for r in map(int, rng.choice(len(routes), size=4, p=wts / wts.sum())):
                if (typ, r) not in built:
                    raw = routes[r][0]
                    route = place(raw() if callable(raw) else raw, typ)   # [P, 2]
                    built[typ, r] = (route, _arclen(route))
                lo, hi = routes[r][1]
                hi = min(hi, built[typ, r][1][-1] - reach)                # stay on the map during the log
                if hi > lo:
                    s = rng.uniform(lo, hi)
                    cand.append((r, s) + _pose_on(*built[typ, r], s))
            if not cand:
                continue
            p = np.array([c[2] for c in cand])                            # [C, 2]
            u = np.stack([np.cos([c[3] for c in cand]), np.sin([c[3] for c in cand])], 1)  # [C, 2]
            v = style[0] * rng.uniform(0.6, 1.0)
            d = P[None] - p[:, None]                                      # [C, n, 2]
            along = np.abs((d * u[:, None]).sum(-1))                      # [C, n]
            across = np.abs(d[..., 0] * u[:, None, 1] - d[..., 1] * u[:, None, 0])  # [C, n]
            same_lane = across < 0.5 * (size[1] + S[:, 1]) + 0.8
            headway = 0.5 * (size[0] + S[:, 0]) + 2.0 + np.maximum(v, V)  # [n] 1 s at the faster speed
            diag = 0.5 * (np.hypot(size[0], size[1]) + np.hypot(S[:, 0], S[:, 1])) + 1.0  # [n]
            overlap = (np.hypot(d[..., 0], d[..., 1]) <= diag).any(1)    # [C]
            free = ~(same_lane & (along <= headway)).any(1) & ~overlap    # [C]
            if free.any():
                r, s, p, yaw = cand[int(np.argmax(free))]
                route, sl = built[typ, r]
                route = route[sl >= s - 10.0]                             # [P, 2] from 10 m behind the start
                short = reach + 20.0 - (sl[-1] - s)                       # lane ends too soon: go straight
                if short > 0:
                    steps = np.linspace(1.0, short, int(short) + 1)[:, None]  # [E, 1] m past the end
                    ext = route[-1] + _unit(route[-1] - route[-2]) * steps  # [E, 2]
                    route = np.concatenate([route, ext])                  # [P', 2]
                agents.append(dict(pos=p, yaw=yaw, speed=v, size=size, type=typ, style=style,
                                   route=_resample(route, cfg.route_step)))
                P, S, V = np.vstack([P, p]), np.vstack([S, size[:2]]), np.append(V, v)
                break
    return agents


def _toy_scene(seed: int, index: int, attempt: int, cfg: ToyConfig):
    """One scene before driving (numpy): layout name, agents at their start, map segments."""
    rng = np.random.default_rng([seed, index, attempt])
    name = cfg.layouts[index % len(cfg.layouts)]
    w, sw = rng.uniform(*cfg.lane_width), rng.uniform(*cfg.sidewalk_width)
    lay = _LAYOUTS[name](rng, w, sw, cfg)
    rot = rng.uniform(-np.pi, np.pi)                                      # any map orientation
    Rm = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])  # [2, 2]
    # pedestrians keep right: walking either way on a sidewalk, they pass 1.2 m apart
    agents = _toy_agents(rng, lay, cfg, lambda r, typ: (_offset(r, -0.6) if typ == 1 else r) @ Rm.T)
    polys = [_resample(p @ Rm.T, cfg.seg_len) for p, _, _ in lay["map"]]
    polys = [np.concatenate([p, np.zeros((len(p), 1))], 1) for p in polys]  # [P, 3], z = 0
    types, codes = [t for _, t, _ in lay["map"]], [c for _, _, c in lay["map"]]
    return name, agents, polylines_to_segments(polys, types, codes)


def _drive(batch: Scenes, pos, yaw, speed, cfg: ToyConfig, gen: torch.Generator):
    """The human driver closed loop from the start poses pos [B, A, 2], yaw, speed [B, A]: burn_in
    unrecorded steps, then T recorded ones. -> pos [B, A, T, 2], yaw [B, A, T] and the WOMD-style
    velocity vel[t] = (pos[t] - pos[t-1]) / DT [B, A, T, 2] (step -1 is the last burn-in step)."""
    if cfg.burn_in < 1:
        raise ValueError(f"ToyConfig.burn_in must be >= 1 (step -1 gives the velocity of step 0), "
                         f"got {cfg.burn_in}")
    drv = HumanDriver(batch, generator=gen)
    active, L = batch.valid[:, :, 0], batch.size[..., 0]                 # [B, A]
    out_pos = pos.new_zeros(*active.shape, T + 1, 2)                     # [B, A, T+1, 2] steps -1..90
    out_yaw = yaw.new_zeros(*active.shape, T + 1)                        # [B, A, T+1]
    for k in range(-cfg.burn_in, T - 1):
        if k >= -1:
            out_pos[:, :, k + 1], out_yaw[:, :, k + 1] = pos, yaw
        accel, steer = drv.act(pos, yaw, speed, active, k)
        pos, yaw, speed = bicycle_step(pos, yaw, speed, accel, steer, L)
    out_pos[:, :, T], out_yaw[:, :, T] = pos, yaw
    return out_pos[:, :, 1:], out_yaw[:, :, 1:], (out_pos[:, :, 1:] - out_pos[:, :, :-1]) / DT


def toy_log_failures(scenes: Scenes, chunk: int = 64) -> torch.Tensor:
    """Which scenes' logs break the rules, [B] bool: a collision (rounded boxes, d < 0) or an
    off-road box (signed road-edge distance > 0) at any valid step, or a non-finite value, with
    the metric's geometry (geometry.py). Shortcuts that keep it fast on big batches: only pairs whose centres
    are closer than their half diagonals can collide; a box whose centre is inside by more than its
    half diagonal is inside; the rest get the exact box test against the 24 road-edge segments
    nearest to them (re-picked every 5 steps, as env.py does)."""
    finite = torch.isfinite(scenes.pos).flatten(1).all(1)                # [B]
    bad = ~(finite & torch.isfinite(scenes.yaw).flatten(1).all(1))       # [B]
    edges = road_edge_table(scenes)                                    # [B, E, ...]
    K = 5                                                                 # steps per pool of edges
    Tp = (T + K - 1) // K * K
    # [b, A, T, ...] -> [b, A, Tp, ...], the last step repeated
    padT = lambda x: torch.cat([x, x[:, :, -1:].expand(*x.shape[:2], Tp - T, *x.shape[3:])], 2)
    for b0 in range(0, scenes.B, chunk):
        sc = scenes.select(slice(b0, b0 + chunk))
        b, A, N = sc.B, sc.A, Tp // K
        # collisions among the candidate pairs
        p, v = sc.pos.transpose(1, 2), sc.valid.transpose(1, 2)           # [b, T, A, 2], [b, T, A]
        hd = 0.5 * sc.size[..., :2].norm(dim=-1)                          # [b, A] half diagonals
        close = torch.cdist(p, p) < (hd.unsqueeze(-1) + hd.unsqueeze(-2)).unsqueeze(1)  # [b, T, A, A]
        close &= v.unsqueeze(-1) & v.unsqueeze(-2) & torch.ones_like(close[0, 0]).triu(1)
        bi, ti, i, j = close.nonzero(as_tuple=True)                       # [M] each
        two = lambda x: torch.stack([x[bi, i], x[bi, j]], 1)              # [M, 2, ...]
        d = object_distance_matrix(torch.stack([sc.pos[bi, i, ti], sc.pos[bi, j, ti]], 1),
                                      torch.stack([sc.yaw[bi, i, ti], sc.yaw[bi, j, ti]], 1),
                                      two(sc.size[..., 0]), two(sc.size[..., 1]),
                                      torch.ones_like(two(sc.valid[..., 0])))
        bad[b0 + bi[d[:, 0, 1] < 0]] = True
        # off-road boxes
        e = {k: v[b0:b0 + chunk] for k, v in edges.items()}               # [b, E, ...]
        if e["valid"].shape[1] == 0:
            continue
        mid = 0.5 * (e["a"][..., :2] + e["b"][..., :2])                   # [b, E, 2]
        mid = torch.where(e["valid"].unsqueeze(-1), mid, torch.full_like(mid, 1e6))
        p = padT(sc.pos).view(b, A, N, K, 2)                              # [b, A, N, K, 2]
        d_mid = torch.cdist(p.mean(3).flatten(1, 2), mid)                 # [b, A*N, E]
        pick = d_mid.topk(min(24, mid.shape[1]), dim=-1, largest=False).indices  # [b, A*N, C]
        bidx = torch.arange(b).view(b, 1, 1)                              # [b, 1, 1]
        C = pick.shape[-1]
        cand = {k: v[bidx, pick].view(b, A, N, C, *v.shape[2:]) for k, v in e.items()}  # [b, A, N, C, ...]
        zb = padT(sc.z - 0.5 * sc.size[..., 2:3]).view(b, A, N, K, 1)     # [b, A, N, K, 1]
        r_c = signed_distance_to_edges(torch.cat([p, zb], -1), cand)   # [b, A, N, K] box centres
        near = (r_c > -(hd.view(b, A, 1, 1) + 0.2)) & padT(sc.valid).view(b, A, N, K)  # [b, A, N, K]
        bi, ai, ni, ki = near.nonzero(as_tuple=True)                      # [M] each
        ti = ni * K + ki
        r = box_road_edge_distance(p[bi, ai, ni, ki], padT(sc.z)[bi, ai, ti], padT(sc.yaw)[bi, ai, ti],
                                      sc.size[bi, ai], {k: v[bi, ai, ni] for k, v in cand.items()})  # [M]
        bad[b0 + bi[r > 0]] = True
    return bad


def _toy_batch(seed: int, indices: list, attempt: int, cfg: ToyConfig) -> Scenes:
    """Build the scenes (seed, index, attempt), drive their logs as one batch, centre each scene on
    its agents at step NOW (as the WOMD loader does)."""
    parts, starts = [], []
    for i in indices:
        name, agents, segs = _toy_scene(seed, i, attempt, cfg)
        nA, P = len(agents), max(len(g["route"]) for g in agents)
        route, rvalid = np.zeros((nA, P, 2), np.float32), np.zeros((nA, P), bool)  # [A, P, 2], [A, P]
        for k, g in enumerate(agents):
            route[k, :len(g["route"])], rvalid[k, :len(g["route"])] = g["route"], True
        start = np.array([[*g["pos"], g["yaw"], g["speed"]] for g in agents], np.float32)  # [A, 4]
        ag = dict(pos=np.zeros((nA, T, 2)), z=np.zeros((nA, T)), yaw=np.zeros((nA, T)),
                  vel=np.zeros((nA, T, 2)),
                  valid=np.ones((nA, T), bool), size=np.array([g["size"] for g in agents]),
                  agent_type=np.array([g["type"] for g in agents]), controlled=np.ones(nA, bool),
                  eval_mask=np.ones(nA, bool))
        parts.append(scene_from_numpy(f"toy-{name}-s{seed}-i{i}-a{attempt}", ag, segs, route=route,
                                      route_valid=rvalid, style=np.array([g["style"] for g in agents])))
        starts.append(torch.as_tensor(start))
    batch = collate(parts)
    B, A = batch.B, batch.A
    start = torch.zeros(B, A, 4)                                          # [B, A, 4] x, y, yaw, speed
    for b, s in enumerate(starts):
        start[b, :len(s)] = s
    gen = torch.Generator().manual_seed(seed * 7919 + attempt)
    pos, yaw, vel = _drive(batch, start[..., :2], start[..., 2], start[..., 3], cfg, gen)
    real = batch.valid[:, :, :1]                                          # [B, A, 1]
    centre = (pos[:, :, NOW] * real).sum(1) / real.sum(1).clamp(min=1)   # [B, 2]
    batch.pos = torch.where(real.unsqueeze(-1), pos - centre.view(B, 1, 1, 2), torch.zeros_like(pos))
    batch.yaw = torch.where(real, yaw, torch.zeros_like(yaw))
    batch.vel = torch.where(real.unsqueeze(-1), vel, torch.zeros_like(vel))
    batch.goal = batch.pos[:, :, T - 1].clone()                           # [B, A, 2] last valid step
    c3 = torch.cat([centre, torch.zeros(B, 1)], -1).unsqueeze(1)          # [B, 1, 3]
    sv = batch.seg_valid.unsqueeze(-1)                                    # [B, S, 1]
    batch.seg_start = torch.where(sv, batch.seg_start - c3, batch.seg_start)
    batch.seg_end = torch.where(sv, batch.seg_end - c3, batch.seg_end)
    batch.route = torch.where(batch.route_valid.unsqueeze(-1), batch.route - centre.view(B, 1, 1, 2),
                              batch.route)                                # [B, A, P, 2]
    return batch


def make_toy_scenes(n: int, seed: int, cfg: ToyConfig = ToyConfig()) -> Scenes:
    """n toy scenes as one batch, deterministic from (n, seed, cfg); layouts go round-robin over
    cfg.layouts. Scenes whose log fails `toy_log_failures` are rebuilt (next attempt number);
    make_toy_scenes.last_rejections counts the rebuilds of the last call."""
    if n < 1:
        raise ValueError(f"make_toy_scenes: n must be >= 1, got {n}")
    unknown = [name for name in cfg.layouts if name not in _LAYOUTS]
    if unknown or not cfg.layouts:
        raise ValueError(f"ToyConfig.layouts: unknown {unknown}, choose from {list(_LAYOUTS)}")
    done, todo, rejected = [None] * n, list(range(n)), 0
    for attempt in range(cfg.max_attempts):
        batch = _toy_batch(seed, todo, attempt, cfg)
        bad = toy_log_failures(batch).tolist()
        for k, i in enumerate(todo):
            if not bad[k]:
                done[i] = batch.select([k])
        rejected += sum(bad)
        todo = [i for k, i in enumerate(todo) if bad[k]]
        if not todo:
            make_toy_scenes.last_rejections = rejected
            return collate(done)
    raise RuntimeError(f"make_toy_scenes: scenes {todo[:5]} (seed {seed}) still fail after "
                       f"{cfg.max_attempts} attempts")


make_toy_scenes.last_rejections = 0


def toy_dataset(split: str, n: int, seed: int = 0, cache_dir="data", cfg: ToyConfig = ToyConfig()) -> Scenes:
    """n toy scenes of a split, cached as <cache_dir>/toy_<split>_n<n>_s<seed>_<config hash>.pt and
    rebuilt when missing or unusable. Splits draw from disjoint seeds (seed + 1000003 * split number)."""
    if split not in _TOY_SPLITS:
        raise ValueError(f"toy_dataset: split must be one of {_TOY_SPLITS}, got {split!r}")
    # the logs also depend on the driver's defaults, so DriverConfig is part of the key
    spec = repr((TOY_VERSION, sorted(dataclasses.asdict(cfg).items()), DriverConfig()))
    key = hashlib.sha1(spec.encode()).hexdigest()[:8]
    path = Path(cache_dir) / f"toy_{split}_n{n}_s{seed}_{key}.pt"
    cached = load_scenes(path, cache=True)
    if cached is not None:
        return cached
    scenes = make_toy_scenes(n, seed + 1_000_003 * (_TOY_SPLITS.index(split) + 1), cfg)
    save_scenes(scenes, path)
    return scenes


def toy_splits(n_train: int, n_val: int, n_test: int, seed: int, cache_dir="data") -> dict:
    """The train / val / test splits of the toy dataset (generated once, then cached on disk)."""
    sizes = dict(train=n_train, val=n_val, test=n_test)
    return {split: toy_dataset(split, n, seed=seed, cache_dir=cache_dir) for split, n in sizes.items()}
