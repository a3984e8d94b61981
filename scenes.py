"""The data: a batch of driving scenes as padded tensors, where scenes come from, and caching.

Every module of the project reads scenes through one dataclass, `Scenes`, laid out like the
Waymo Open Motion Dataset (WOMD): 91 steps at 10 Hz, history 0..10 ("now" is step 10) and an
8 s future 11..90. Two sources fill it:

1. Toy scenes, generated procedurally from a seed (`make_toy_scenes`): straight and curved
   multi-lane roads, a four-way intersection, a T-junction and a merge. Their logs are driven by
   the stochastic closed-loop human driver of `human_driver.py`, so re-running that driver from
   the same first 11 steps samples the *true* behaviour distribution (the realism ceiling).
2. Real WOMD scenes in GPUDrive's JSON format (`load_womd_json`).

Maps are polylines cut into segments `[B, S]`. Road edges keep WOMD's orientation (the road
lies on the left of the point order), because the signed distance to the road edge, and so
"off-road", is defined by it (`research/wosac.md` 3.4).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Conventions shared by every module
# --------------------------------------------------------------------------------------------
DT = 0.1            # seconds per step (10 Hz)
T = 91              # steps per scene: history 0..10, future 11..90
NOW = 10            # the "current" step: simulation starts from the log here
T_FUTURE = T - NOW - 1  # 80 simulated steps
AGENT_TYPES = ("vehicle", "pedestrian", "cyclist")  # agent_type 0, 1, 2

# Coarse map segment types (what the models embed). `seg_code` keeps WOMD's fine map_element_id.
MAP_TYPES = ("lane", "road_line", "road_edge", "crosswalk", "other")
LANE, ROAD_LINE, ROAD_EDGE, CROSSWALK, OTHER = range(5)
SURFACE_STREET_LANE = 2  # WOMD map_element_id of a surface-street lane (traffic-light metric)
EDGE_CODE = 15           # WOMD map_element_id of a road-edge boundary

# WOSAC traffic-signal state enum (scenario.proto TrafficSignalLaneState.State)
TL_STATES = ("unknown", "arrow_stop", "arrow_caution", "arrow_go", "stop", "caution", "go",
             "flashing_stop", "flashing_caution")


@dataclass
class Scenes:
    """A batch of B scenes, padded to A agents, S map segments, L traffic-light lanes."""
    pos: torch.Tensor          # [B, A, T, 2] box centre (m)
    z: torch.Tensor            # [B, A, T] height of the box centre (0 for toy scenes)
    yaw: torch.Tensor          # [B, A, T] heading (rad, wrapped)
    vel: torch.Tensor          # [B, A, T, 2] velocity (m/s)
    valid: torch.Tensor        # [B, A, T] bool, observed at that step; padding is never valid
    size: torch.Tensor         # [B, A, 3] length, width, height (m)
    agent_type: torch.Tensor   # [B, A] long, 0 vehicle / 1 pedestrian / 2 cyclist
    controlled: torch.Tensor   # [B, A] bool, may be driven by a policy
    eval_mask: torch.Tensor    # [B, A] bool, scored by the metrics
    goal: torch.Tensor         # [B, A, 2] position at the agent's last valid step
    seg_start: torch.Tensor    # [B, S, 3] segment start point (x, y, z)
    seg_end: torch.Tensor      # [B, S, 3] segment end point (x, y, z)
    seg_type: torch.Tensor     # [B, S] long, index into MAP_TYPES
    seg_code: torch.Tensor     # [B, S] long, WOMD map_element_id (fine type)
    seg_poly: torch.Tensor     # [B, S] long, polyline index within the scene (-1 padding)
    seg_prev: torch.Tensor     # [B, S] long, previous segment for the road-edge sign rule (-1 none)
    seg_next: torch.Tensor     # [B, S] long, next segment for the road-edge sign rule (-1 none)
    seg_valid: torch.Tensor    # [B, S] bool
    tl_lane: torch.Tensor      # [B, L] long, polyline index of the signal's lane (-1 padding)
    tl_state: torch.Tensor     # [B, L, T] long, index into TL_STATES
    tl_stop: torch.Tensor      # [B, L, T, 2] stop point of the signal
    route: torch.Tensor        # [B, A, P, 2] intended path (toy driver's lane sequence; empty for WOMD)
    route_valid: torch.Tensor  # [B, A, P] bool
    style: torch.Tensor        # [B, A, 4] driver style: desired speed, headway, min gap, comfort decel
    scene_id: list = field(default_factory=list)  # B strings

    # ---- small conveniences --------------------------------------------------------------
    @property
    def B(self) -> int:
        return self.pos.shape[0]

    @property
    def A(self) -> int:
        return self.pos.shape[1]

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scene_id"}

    def to(self, device) -> "Scenes":
        return Scenes(**{k: v.to(device) for k, v in self.tensors().items()}, scene_id=list(self.scene_id))

    def select(self, idx) -> "Scenes":
        """Scenes `idx` (a slice, list or long tensor) as a new batch."""
        if isinstance(idx, slice):
            ids = self.scene_id[idx]
        else:
            ids = [self.scene_id[int(i)] for i in idx]
        return Scenes(**{k: v[idx] for k, v in self.tensors().items()}, scene_id=ids)

    def repeat(self, R: int) -> "Scenes":
        """Each scene R times in a row ([B] -> [B * R]): how rollouts are batched together."""
        ids = [s for s in self.scene_id for _ in range(R)]
        return Scenes(**{k: v.repeat_interleave(R, dim=0) for k, v in self.tensors().items()}, scene_id=ids)

    @property
    def device(self):
        return self.pos.device


# Padding value of each field (anything not listed pads with 0 / False).
_PAD = {"seg_poly": -1, "seg_prev": -1, "seg_next": -1, "tl_lane": -1}


def collate(batches: list) -> Scenes:
    """Concatenate Scenes with different A, S, L, P into one batch, padding every dim to the max."""
    fields = batches[0].tensors().keys()
    out = {}
    for name in fields:
        parts = [getattr(b, name) for b in batches]
        ndim = parts[0].dim()
        target = [max(p.shape[d] for p in parts) for d in range(ndim)]
        padded = []
        for p in parts:
            full = torch.full([p.shape[0]] + target[1:], _PAD.get(name, 0), dtype=p.dtype, device=p.device)
            full[tuple(slice(0, s) for s in p.shape)] = p
            padded.append(full)
        out[name] = torch.cat(padded, dim=0)
    return Scenes(**out, scene_id=[s for b in batches for s in b.scene_id])


def save_scenes(scenes: Scenes, path) -> None:
    """Atomic save: write a temporary file, then rename, so a crash never leaves half a cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({**scenes.tensors(), "scene_id": scenes.scene_id}, tmp)
    os.replace(tmp, path)


def load_scenes(path) -> Scenes:
    d = torch.load(path, map_location="cpu", weights_only=True)
    missing = [f.name for f in dataclasses.fields(Scenes) if f.name not in d]
    if missing:
        raise ValueError(f"{path}: cached scenes lack fields {missing}; delete the file to regenerate it")
    return Scenes(**d)


# --------------------------------------------------------------------------------------------
# Map polylines -> segments
# --------------------------------------------------------------------------------------------
def polylines_to_segments(polylines: list, types: list, codes: list) -> dict:
    """Cut polylines into segments, numpy in, numpy out (one scene).

    polylines: list of [P_i, 3] arrays; types: MAP_TYPES index each; codes: WOMD map_element_id.
    Polygons (crosswalks) must already be closed by the caller if their closing edge matters.

    `seg_prev` / `seg_next` reproduce the official road-edge sign rule (wosac.md 3.4): within a
    polyline they are the neighbouring segments; a *cyclic* road edge (|first - last|^2 < 1 m^2)
    wraps around only if it has as many points as the longest road edge of the scene, because
    the official code wraps into zero padding otherwise and then falls back to the segment's own
    sign. Polylines with fewer than 2 points are dropped (as officially).
    """
    keep = [i for i, p in enumerate(polylines) if len(p) >= 2]
    edge_lens = [len(polylines[i]) for i in keep if types[i] == ROAD_EDGE]
    longest_edge = max(edge_lens) if edge_lens else 0
    start, end, seg_type, seg_code, seg_poly, prev, nxt = [], [], [], [], [], [], []
    for poly_index, i in enumerate(keep):
        p = np.asarray(polylines[i], dtype=np.float32)           # [P, 3]
        n = len(p) - 1
        first = len(seg_type)  # segments so far (`start` holds one array per polyline)
        start.append(p[:-1]); end.append(p[1:])
        seg_type += [types[i]] * n; seg_code += [codes[i]] * n; seg_poly += [poly_index] * n
        idx = np.arange(first, first + n)
        pv, nx = idx - 1, idx + 1
        pv[0], nx[-1] = -1, -1
        cyclic = float(((p[0] - p[-1]) ** 2).sum()) < 1.0  # 3D, as _check_polyline_cycles
        if types[i] == ROAD_EDGE and cyclic and len(p) == longest_edge:
            pv[0], nx[-1] = idx[-1], idx[0]
        prev.append(pv); nxt.append(nx)
    if not start:
        z3 = np.zeros((0, 3), np.float32)
        zi = np.zeros((0,), np.int64)
        return dict(seg_start=z3, seg_end=z3, seg_type=zi, seg_code=zi, seg_poly=zi, seg_prev=zi, seg_next=zi)
    return dict(
        seg_start=np.concatenate(start),                          # [S, 3]
        seg_end=np.concatenate(end),                              # [S, 3]
        seg_type=np.asarray(seg_type, np.int64),                  # [S]
        seg_code=np.asarray(seg_code, np.int64),                  # [S]
        seg_poly=np.asarray(seg_poly, np.int64),                  # [S]
        seg_prev=np.concatenate(prev).astype(np.int64),           # [S]
        seg_next=np.concatenate(nxt).astype(np.int64),            # [S]
    )


def scene_from_numpy(scene_id: str, agents: dict, segments: dict, tl: dict | None = None,
                     route=None, route_valid=None, style=None) -> Scenes:
    """One scene (B = 1) from numpy arrays: agents holds pos [A,T,2], z [A,T], yaw [A,T],
    vel [A,T,2], valid [A,T], size [A,3], agent_type [A], controlled [A], eval_mask [A]."""
    A = agents["pos"].shape[0]
    valid = np.asarray(agents["valid"], bool)                     # [A, T]
    last = np.where(valid.any(1), T - 1 - np.argmax(valid[:, ::-1], axis=1), 0)  # [A]
    goal = agents["pos"][np.arange(A), last]                      # [A, 2]
    S = segments["seg_start"].shape[0]
    if tl is None or len(tl.get("lane", [])) == 0:
        tl = dict(lane=np.zeros((0,), np.int64), state=np.zeros((0, T), np.int64), stop=np.zeros((0, T, 2), np.float32))
    if route is None:
        route, route_valid = np.zeros((A, 1, 2), np.float32), np.zeros((A, 1), bool)
    if style is None:
        style = np.zeros((A, 4), np.float32)
    f32 = lambda x: torch.as_tensor(np.asarray(x, np.float32))[None]
    i64 = lambda x: torch.as_tensor(np.asarray(x, np.int64))[None]
    b = lambda x: torch.as_tensor(np.asarray(x, bool))[None]
    return Scenes(
        pos=f32(agents["pos"]), z=f32(agents["z"]), yaw=f32(agents["yaw"]), vel=f32(agents["vel"]),
        valid=b(valid), size=f32(agents["size"]), agent_type=i64(agents["agent_type"]),
        controlled=b(agents["controlled"]), eval_mask=b(agents["eval_mask"]), goal=f32(goal),
        seg_start=f32(segments["seg_start"]), seg_end=f32(segments["seg_end"]),
        seg_type=i64(segments["seg_type"]), seg_code=i64(segments["seg_code"]),
        seg_poly=i64(segments["seg_poly"]), seg_prev=i64(segments["seg_prev"]),
        seg_next=i64(segments["seg_next"]), seg_valid=torch.ones(1, S, dtype=torch.bool),
        tl_lane=i64(tl["lane"]), tl_state=i64(tl["state"]), tl_stop=f32(tl["stop"]),
        route=f32(route), route_valid=b(route_valid), style=f32(style), scene_id=[scene_id],
    )


def wrap_angle(a):
    """Wrap to [-pi, pi) with a floor-mod, as the official metric code does."""
    return (a + math.pi) % (2 * math.pi) - math.pi


# --------------------------------------------------------------------------------------------
# ---- Real WOMD scenes (GPUDrive JSON) ----
# --------------------------------------------------------------------------------------------
# One JSON file per WOMD scenario (schema: ../shared/data/womd_examples/FORMAT.md). Choices:
# - Origin: the xy mean of the agents valid at step NOW (of all valid positions if none is). It is
#   subtracted from agent positions, map points and stop points, so networks see small numbers. z is
#   kept in the file's frame for agents and map alike: only differences of z matter (overpasses).
# - Invalid steps hold -10000 sentinels in the file; here they are 0 and `valid` says which is which.
#   A step marked valid that still holds a sentinel is treated as invalid.
# - Agent types 'unset' / 'other' are dropped (no model has a vocabulary for them); any other unknown
#   type is an error. Indices in `metadata` are remapped past the dropped objects.
# - Polygons (crosswalk, speed bump, driveway) are stored open; they are closed here so that the
#   closing edge is a segment too. Road edges keep the file's point order (road on the left).
# - controlled = valid at NOW and not `mark_as_expert` (log replay); eval_mask = the SDC and
#   `tracks_to_predict`, where valid at NOW.
# - A traffic signal whose lane is not a lane polyline with >= 2 points is dropped: no segment could
#   carry it, and the official metric could not match it either. Steps missing from a signal's
#   lists are 'unknown', with the signal's first known stop point.
WOMD_SENTINEL = -10000.0
_WOMD_AGENT_TYPES = {"vehicle": 0, "pedestrian": 1, "cyclist": 2}
_WOMD_DROPPED_TYPES = ("unset", "other")
_WOMD_ROAD_TYPES = {"lane": LANE, "road_line": ROAD_LINE, "road_edge": ROAD_EDGE, "crosswalk": CROSSWALK,
                    "stop_sign": OTHER, "speed_bump": OTHER, "driveway": OTHER}
_WOMD_POLYGONS = ("crosswalk", "speed_bump", "driveway")
_TL_INDEX = {s: i for i, s in enumerate(TL_STATES)}


class _FieldError(Exception):
    """A schema violation at a JSON field path such as `objects[3].position`; the loader adds the file."""
    def __init__(self, field_path: str, msg: str):
        super().__init__(f"{field_path}: {msg}")


def _get(d, key: str, kinds: tuple, parent: str = ""):
    """d[key], checked to be an instance of `kinds` (a bool never passes for a number)."""
    where = f"{parent}.{key}" if parent else key
    if not isinstance(d, dict):
        raise _FieldError(parent or "top level", f"expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise _FieldError(where, "missing")
    v = d[key]
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _FieldError(where, f"expected {names}, got {type(v).__name__}")
    return v


def _numbers(items: list, where: str, keys: tuple = (), n: int | None = None) -> np.ndarray:
    """A JSON list of numbers ([P]) or of {key: number} points ([P, len(keys)]) as float64.

    The fast path is one numpy conversion; only when it fails do we walk the list to name the entry."""
    if n is not None and len(items) != n:
        raise _FieldError(where, f"expected {n} entries, got {len(items)}")
    shape = (len(items), len(keys)) if keys else (len(items),)
    try:
        arr = np.array([[p[k] for k in keys] for p in items] if keys else items)  # [P, len(keys)] or [P]
        ok = arr.shape == shape and (arr.dtype.kind in "iuf" or len(items) == 0)
    except (KeyError, TypeError, IndexError, ValueError):
        ok = False
    if not ok:
        for t, p in enumerate(items):  # slow path: find the first bad entry for the message
            for k in keys or (None,):
                if k is not None and not isinstance(p, dict):
                    raise _FieldError(f"{where}[{t}]", f"expected an object with keys {list(keys)}")
                v = p if k is None else p.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise _FieldError(f"{where}[{t}]" + (f".{k}" if k else ""), f"expected a number, got {v!r:.40}")
        raise _FieldError(where, "could not read as numbers")
    arr = arr.astype(np.float64).reshape(shape)                    # [P, len(keys)] or [P]
    if not np.isfinite(arr).all():
        t = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise _FieldError(f"{where}[{t}]", "non-finite value")
    return arr


def _bools(items: list, where: str, n: int) -> np.ndarray:
    if len(items) != n:
        raise _FieldError(where, f"expected {n} entries, got {len(items)}")
    try:
        arr = np.array(items)                                      # [T]
    except ValueError:  # ragged nested lists
        arr = np.zeros(0)
    if arr.dtype != bool or arr.shape != (n,):
        t = next(t for t, v in enumerate(items) if not isinstance(v, bool))
        raise _FieldError(f"{where}[{t}]", f"expected true/false, got {items[t]!r:.40}")
    return arr


def _womd_agents(objects: list) -> tuple:
    """Raw per-agent arrays (global frame, sentinels still in) and the file index of each kept object."""
    xyz, head, vel, valid, size, kind, expert, keep = [], [], [], [], [], [], [], []
    for i, o in enumerate(objects):
        where = f"objects[{i}]"
        typ = _get(o, "type", (str,), where)
        if typ in _WOMD_DROPPED_TYPES:
            continue
        if typ not in _WOMD_AGENT_TYPES:
            raise _FieldError(where + ".type", f"unknown agent type {typ!r}; expected one of "
                              f"{list(_WOMD_AGENT_TYPES) + list(_WOMD_DROPPED_TYPES)}")
        xyz.append(_numbers(_get(o, "position", (list,), where), where + ".position", ("x", "y", "z"), T))  # [T, 3]
        head.append(_numbers(_get(o, "heading", (list,), where), where + ".heading", (), T))  # [T]
        vel.append(_numbers(_get(o, "velocity", (list,), where), where + ".velocity", ("x", "y"), T))  # [T, 2]
        valid.append(_bools(_get(o, "valid", (list,), where), where + ".valid", T))  # [T]
        size.append([_get(o, k, (int, float), where) for k in ("length", "width", "height")])
        kind.append(_WOMD_AGENT_TYPES[typ])
        expert.append(_get(o, "mark_as_expert", (bool,), where))
        keep.append(i)
    if not keep:
        raise _FieldError("objects", "no vehicle, pedestrian or cyclist in the scene")
    return dict(xyz=np.stack(xyz), head=np.stack(head), vel=np.stack(vel), valid=np.stack(valid),
                size=np.asarray(size, np.float32), kind=np.asarray(kind, np.int64),
                expert=np.asarray(expert, bool)), np.asarray(keep)


def _womd_eval_indices(meta: dict, n_objects: int) -> tuple:
    """(SDC file index, set of file indices to evaluate) from `metadata`, range-checked."""
    sdc = _get(meta, "sdc_track_index", (int,), "metadata")
    if not 0 <= sdc < n_objects:
        raise _FieldError("metadata.sdc_track_index", f"{sdc} is not an index into {n_objects} objects")
    chosen = {sdc}
    for j, item in enumerate(_get(meta, "tracks_to_predict", (list,), "metadata")):
        k = _get(item, "track_index", (int,), f"metadata.tracks_to_predict[{j}]")
        if not 0 <= k < n_objects:
            raise _FieldError(f"metadata.tracks_to_predict[{j}].track_index", f"{k} is out of range")
        chosen.add(k)
    return sdc, chosen


def _womd_map(roads: list, origin: np.ndarray) -> tuple:
    """Segments of all road features, and {lane id: polyline index} as polylines_to_segments numbers them."""
    polylines, types, codes, lane_poly = [], [], [], {}
    n_kept = 0  # polylines_to_segments drops polylines of < 2 points and numbers the rest in order
    for j, r in enumerate(roads):
        where = f"roads[{j}]"
        typ = _get(r, "type", (str,), where)
        if typ not in _WOMD_ROAD_TYPES:
            raise _FieldError(where + ".type", f"unknown road type {typ!r}; expected one of {list(_WOMD_ROAD_TYPES)}")
        p = _numbers(_get(r, "geometry", (list,), where), where + ".geometry", ("x", "y", "z"))  # [P, 3]
        code = _get(r, "map_element_id", (int,), where)
        road_id = _get(r, "id", (int,), where)
        if typ in _WOMD_POLYGONS and len(p) >= 3 and (p[0] != p[-1]).any():
            p = np.concatenate([p, p[:1]])                         # [P + 1, 3] closed polygon
        p[:, :2] -= origin
        if len(p) >= 2:
            if typ == "lane":
                lane_poly[road_id] = n_kept
            n_kept += 1
        polylines.append(p); types.append(_WOMD_ROAD_TYPES[typ]); codes.append(code)
    return polylines_to_segments(polylines, types, codes), lane_poly


def _womd_lights(tl_states: dict, lane_poly: dict, origin: np.ndarray) -> dict:
    """Signals as dense [L, T] arrays indexed by polyline (see the notes above for dropped signals)."""
    lanes, states, stops = [], [], []
    for key, s in tl_states.items():
        where = f"tl_states[{key!r}]"
        if not key.lstrip("-").isdigit():
            raise _FieldError(where, "key must be a lane id (an integer written as a string)")
        names = _get(s, "state", (list,), where)
        L_t = len(names)
        t_idx = _numbers(_get(s, "time_index", (list,), where), where + ".time_index", (), L_t)  # [n]
        x = _numbers(_get(s, "x", (list,), where), where + ".x", (), L_t)  # [n]
        y = _numbers(_get(s, "y", (list,), where), where + ".y", (), L_t)  # [n]
        if ((t_idx < 0) | (t_idx >= T) | (t_idx != np.round(t_idx))).any():
            raise _FieldError(where + ".time_index", f"expected integers in 0..{T - 1}")
        for t, name in enumerate(names):
            if name not in _TL_INDEX:
                raise _FieldError(f"{where}.state[{t}]", f"unknown signal state {name!r}; expected one of {list(TL_STATES)}")
        if int(key) not in lane_poly:
            continue
        t_idx = t_idx.astype(np.int64)                             # [n]
        state = np.zeros(T, np.int64)                              # [T] 0 = unknown
        state[t_idx] = [_TL_INDEX[name] for name in names]
        known = (x != WOMD_SENTINEL) & (y != WOMD_SENTINEL)        # [n]
        xy = np.stack([x, y], -1)[known] - origin                  # [n', 2]
        stop = np.zeros((T, 2), np.float64)                        # [T, 2]
        if len(xy):
            stop[:] = xy[0]  # a stop line does not move: fill the steps the file does not list
            stop[t_idx[known]] = xy
        lanes.append(lane_poly[int(key)]); states.append(state); stops.append(stop)
    if not lanes:
        return None
    return dict(lane=np.asarray(lanes, np.int64), state=np.stack(states),   # [L], [L, T]
                stop=np.stack(stops).astype(np.float32))                     # [L, T, 2]


def _womd_keep(agents: dict, sdc: int | None, max_agents: int) -> np.ndarray:
    """Indices (ascending) of at most `max_agents` agents: scored agents first, then controlled ones,
    then the rest; within a group the nearest to the SDC at step NOW first (unseen at NOW: last)."""
    ref = agents["pos"][sdc, NOW] if sdc is not None else np.zeros(2, np.float32)  # [2]
    dist = np.linalg.norm(agents["pos"][:, NOW] - ref, axis=-1)   # [A]
    dist = np.where(agents["valid"][:, NOW], dist, np.inf)        # [A]
    group = np.where(agents["eval_mask"], 0, np.where(agents["controlled"], 1, 2))  # [A]
    return np.sort(np.lexsort((dist, group))[:max_agents])       # [A']


def _womd_scene(d, max_agents: int | None) -> Scenes:
    if not isinstance(d, dict):
        raise _FieldError("top level", f"expected a JSON object, got {type(d).__name__}")
    scene_id = _get(d, "scenario_id", (str,))
    objects = _get(d, "objects", (list,))
    roads = _get(d, "roads", (list,))
    tl_states = _get(d, "tl_states", (dict,))
    sdc_file, chosen = _womd_eval_indices(_get(d, "metadata", (dict,)), len(objects))
    raw, keep = _womd_agents(objects)

    # a step still holding a sentinel is unobserved, whatever `valid` says
    sentinel = ((raw["xyz"][..., :2] == WOMD_SENTINEL).any(-1) | (raw["head"] == WOMD_SENTINEL)
                | (raw["vel"] == WOMD_SENTINEL).any(-1))          # [A, T]
    valid = raw["valid"] & ~sentinel                               # [A, T]
    xy = raw["xyz"][..., :2]                                       # [A, T, 2]
    origin = xy[valid[:, NOW], NOW].mean(0) if valid[:, NOW].any() else xy[valid].mean(0)  # [2]
    m = valid[..., None]                                           # [A, T, 1]
    agents = dict(
        pos=np.where(m, xy - origin, 0.0).astype(np.float32),     # [A, T, 2]
        z=np.where(valid, raw["xyz"][..., 2], 0.0).astype(np.float32),  # [A, T]
        yaw=np.where(valid, wrap_angle(raw["head"]), 0.0).astype(np.float32),  # [A, T]
        vel=np.where(m, raw["vel"], 0.0).astype(np.float32),      # [A, T, 2]
        valid=valid, size=raw["size"], agent_type=raw["kind"],
        controlled=valid[:, NOW] & ~raw["expert"],                 # [A]
        eval_mask=np.isin(keep, sorted(chosen)) & valid[:, NOW],  # [A]
    )
    sdc = int(np.flatnonzero(keep == sdc_file)[0]) if sdc_file in keep else None
    segments, lane_poly = _womd_map(roads, origin)
    tl = _womd_lights(tl_states, lane_poly, origin)
    if max_agents is not None and len(keep) > max_agents:
        idx = _womd_keep(agents, sdc, max_agents)                  # [A']
        agents = {k: v[idx] for k, v in agents.items()}
    return scene_from_numpy(scene_id, agents, segments, tl)


def load_womd_json(path, max_agents: int | None = None) -> Scenes:
    """One GPUDrive-format WOMD scene (B = 1), centred (see the notes above). `max_agents` keeps at
    most that many agents (scored, then controlled, then others, nearest to the SDC first).
    A malformed file raises ValueError naming the file and the field."""
    if max_agents is not None and (isinstance(max_agents, bool) or not isinstance(max_agents, int) or max_agents < 1):
        raise ValueError(f"max_agents must be a positive int or None, got {max_agents!r}")
    path = Path(path)
    try:
        d = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON, the file may be truncated ({e})") from None
    try:
        return _womd_scene(d, max_agents)
    except _FieldError as e:
        raise ValueError(f"{path}: {e}") from None


def load_womd_dir(path, max_agents: int | None = None) -> Scenes:
    """Every *.json scene of a folder, sorted by file name, collated into one padded batch."""
    files = sorted(Path(path).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.json scene files (GPUDrive JSON, see womd_examples/FORMAT.md)")
    return collate([load_womd_json(f, max_agents) for f in files])


def find_womd_examples() -> Path | None:
    """The example-scene folder: $WOMD_EXAMPLES, else <repo>/../shared/data/womd_examples; None if absent."""
    env = os.environ.get("WOMD_EXAMPLES")
    p = Path(env) if env else Path(__file__).resolve().parent.parent / "shared" / "data" / "womd_examples"
    return p if p.is_dir() and any(p.glob("*.json")) else None


# --------------------------------------------------------------------------------------------
# ---- Toy scenes ----
# --------------------------------------------------------------------------------------------
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
#   box or a NaN (wosac_metrics' geometry) is rebuilt with the next attempt number.
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
    ref = _resample(np.concatenate([_line([-a, 0.0], [0.0, 0.0]), arc[1:], _line(arc[-1], end)[1:]]), 0.5)  # [P, 2]
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
    s0, corners = [-np.inf] * K, []                                       # where each arm's straight edges begin
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
            stop = np.stack([s_lane[k] * u[k] + 0.2 * n[k], s_lane[k] * u[k] + (nl * w - 0.2) * n[k]])  # [2, 2]
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
        east, west = _line([-L, -(k + 0.5) * w], [L, -(k + 0.5) * w]), _line([L, (k + 0.5) * w], [-L, (k + 0.5) * w])
        lay["map"] += [(east, LANE, SURFACE_STREET_LANE), (west, LANE, SURFACE_STREET_LANE)]
        _add_vehicle_route(lay, east, (3.0, 0.9 * L))
        _add_vehicle_route(lay, west, (3.0, 0.9 * L))
    xa = rng.uniform(-45.0, -25.0)                                        # acceleration lane [xa, xb]
    xb, taper, alpha, R, ya = xa + rng.uniform(40.0, 60.0), 30.0, rng.uniform(0.25, 0.4), 60.0, -2.5 * w
    arc = _arc([xa, ya - R], R, np.pi / 2 + alpha, np.pi / 2)            # [P, 2] bends to heading east
    feed = arc[0] - (arc[0][0] + L) / np.cos(alpha) * np.array([np.cos(alpha), np.sin(alpha)])
    tx = np.linspace(0, 1, 61)[:, None]                                   # [61, 1]
    tap = np.concatenate([xb + taper * tx, ya + w * (1 - np.cos(np.pi * tx)) / 2], 1)  # [61, 2] S-shaped taper
    ramp = _resample(np.concatenate([_line(feed, arc[0]), arc[1:], _line([xa, ya], [xb, ya])[1:], tap[1:]]), 0.5)
    full = np.concatenate([ramp, _line(tap[-1], [L, -1.5 * w])[1:]])     # [P, 2] ramp, then the outer lane
    lay["map"].append((ramp, LANE, SURFACE_STREET_LANE))
    _add_vehicle_route(lay, full, (3.0, _arclen(ramp)[_nearest(ramp, np.array([xa, ya]))] - 10.0), weight=2.0)
    south = _offset(_resample(full, 0.5), -(0.5 * w + sw))                # [P, 2]
    ye = -(2 * w + sw)                                                    # main road's south edge
    ramp_left = _offset(ramp, 0.5 * w + sw)                               # [P, 2]
    i = int(np.argmax(ramp_left[:, 1] >= ye))                             # where the two edges meet: the gore tip
    X = ramp_left[i - 1] + (ye - ramp_left[i - 1, 1]) / (ramp_left[i, 1] - ramp_left[i - 1, 1]) * (ramp_left[i] - ramp_left[i - 1])
    gore = np.concatenate([_line([-L, ye], X), ramp_left[:i][::-1]])      # [P, 2]
    north = _line([L, 2 * w + sw], [-L, 2 * w + sw])
    lay["map"] += [(south, ROAD_EDGE, EDGE_CODE), (gore, ROAD_EDGE, EDGE_CODE), (north, ROAD_EDGE, EDGE_CODE)]
    if cfg.road_lines:
        lay["map"] += [(_line([-L, 0.0], [L, 0.0]), ROAD_LINE, 12), (_line([-L, w], [L, w]), ROAD_LINE, 6),
                       (_line([-L, -w], [L, -w]), ROAD_LINE, 6), (_line([xa, -2 * w], [xb, -2 * w]), ROAD_LINE, 6)]
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
                [rng.uniform(*cfg.vehicle_speed) * speed, rng.uniform(*cfg.headway), rng.uniform(*cfg.min_gap),
                 rng.uniform(*cfg.comfort_decel)])
    if typ == 1:
        d = rng.uniform(0.7, 0.9)
        return [d, d, 1.7], [rng.uniform(*cfg.pedestrian_speed), rng.uniform(0.6, 1.0), rng.uniform(0.4, 0.7), rng.uniform(1.0, 2.0)]
    return ([rng.uniform(1.7, 1.9), rng.uniform(0.6, 0.8), 1.7],
            [rng.uniform(*cfg.cyclist_speed), rng.uniform(*cfg.headway), rng.uniform(1.0, 2.0), rng.uniform(1.5, 2.5)])


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
            free = ~(same_lane & (along <= headway)).any(1) & ~(np.hypot(d[..., 0], d[..., 1]) <= diag).any(1)  # [C]
            if free.any():
                r, s, p, yaw = cand[int(np.argmax(free))]
                route, sl = built[typ, r]
                route = route[sl >= s - 10.0]                             # [P, 2] from 10 m behind the start
                short = reach + 20.0 - (sl[-1] - s)                       # the lane ends too soon: go on straight
                if short > 0:
                    ext = route[-1] + _unit(route[-1] - route[-2]) * np.linspace(1.0, short, int(short) + 1)[:, None]
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
    return name, agents, polylines_to_segments(polys, [t for _, t, _ in lay["map"]], [c for _, _, c in lay["map"]])


def _drive(batch: Scenes, pos, yaw, speed, cfg: ToyConfig, gen: torch.Generator):
    """The human driver closed loop from the start poses pos [B, A, 2], yaw, speed [B, A]: burn_in
    unrecorded steps, then T recorded ones. -> pos [B, A, T, 2], yaw [B, A, T] and the WOMD-style
    velocity vel[t] = (pos[t] - pos[t-1]) / DT [B, A, T, 2] (step -1 is the last burn-in step)."""
    from env import bicycle_step            # env.py and human_driver.py import this module
    from human_driver import HumanDriver
    if cfg.burn_in < 1:
        raise ValueError(f"ToyConfig.burn_in must be >= 1 (step -1 gives the velocity of step 0), got {cfg.burn_in}")
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
    wosac_metrics' geometry. Shortcuts that keep it fast on big batches: only pairs whose centres
    are closer than their half diagonals can collide; a box whose centre is inside by more than its
    half diagonal is inside; the rest get the exact box test against the 24 road-edge segments
    nearest to them (re-picked every 5 steps, as env.py does)."""
    import wosac_metrics as wm              # it imports this module
    bad = ~(torch.isfinite(scenes.pos).flatten(1).all(1) & torch.isfinite(scenes.yaw).flatten(1).all(1))  # [B]
    edges = wm.road_edge_table(scenes)                                    # [B, E, ...]
    K = 5                                                                 # steps per pool of edges
    Tp = (T + K - 1) // K * K
    padT = lambda x: torch.cat([x, x[:, :, -1:].expand(*x.shape[:2], Tp - T, *x.shape[3:])], 2)  # [b, A, Tp, ...]
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
        d = wm.object_distance_matrix(torch.stack([sc.pos[bi, i, ti], sc.pos[bi, j, ti]], 1),
                                      torch.stack([sc.yaw[bi, i, ti], sc.yaw[bi, j, ti]], 1),
                                      two(sc.size[..., 0]), two(sc.size[..., 1]), torch.ones_like(two(sc.valid[..., 0])))
        bad[b0 + bi[d[:, 0, 1] < 0]] = True
        # off-road boxes
        e = {k: v[b0:b0 + chunk] for k, v in edges.items()}               # [b, E, ...]
        if e["valid"].shape[1] == 0:
            continue
        mid = 0.5 * (e["a"][..., :2] + e["b"][..., :2])                   # [b, E, 2]
        mid = torch.where(e["valid"].unsqueeze(-1), mid, torch.full_like(mid, 1e6))
        p = padT(sc.pos).view(b, A, N, K, 2)                              # [b, A, N, K, 2]
        pick = torch.cdist(p.mean(3).flatten(1, 2), mid).topk(min(24, mid.shape[1]), dim=-1, largest=False).indices  # [b, A*N, C]
        bidx = torch.arange(b).view(b, 1, 1)                              # [b, 1, 1]
        cand = {k: v[bidx, pick].view(b, A, N, pick.shape[-1], *v.shape[2:]) for k, v in e.items()}  # [b, A, N, C, ...]
        zb = padT(sc.z - 0.5 * sc.size[..., 2:3]).view(b, A, N, K, 1)     # [b, A, N, K, 1]
        r_c = wm.signed_distance_to_edges(torch.cat([p, zb], -1), cand)   # [b, A, N, K] box centres
        near = (r_c > -(hd.view(b, A, 1, 1) + 0.2)) & padT(sc.valid).view(b, A, N, K)  # [b, A, N, K]
        bi, ai, ni, ki = near.nonzero(as_tuple=True)                      # [M] each
        ti = ni * K + ki
        r = wm.box_road_edge_distance(p[bi, ai, ni, ki], padT(sc.z)[bi, ai, ti], padT(sc.yaw)[bi, ai, ti],
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
        ag = dict(pos=np.zeros((nA, T, 2)), z=np.zeros((nA, T)), yaw=np.zeros((nA, T)), vel=np.zeros((nA, T, 2)),
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
    batch.route = torch.where(batch.route_valid.unsqueeze(-1), batch.route - centre.view(B, 1, 1, 2), batch.route)
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
    raise RuntimeError(f"make_toy_scenes: scenes {todo[:5]} (seed {seed}) still fail after {cfg.max_attempts} attempts")


make_toy_scenes.last_rejections = 0


def toy_dataset(split: str, n: int, seed: int = 0, cache_dir="data", cfg: ToyConfig = ToyConfig()) -> Scenes:
    """n toy scenes of a split, cached as <cache_dir>/toy_<split>_n<n>_s<seed>_<config hash>.pt and
    rebuilt when missing. Splits draw from disjoint seeds (seed + 1000003 * split number)."""
    if split not in _TOY_SPLITS:
        raise ValueError(f"toy_dataset: split must be one of {_TOY_SPLITS}, got {split!r}")
    import hashlib
    from human_driver import DriverConfig   # the logs also depend on the driver's defaults
    key = hashlib.sha1(repr((TOY_VERSION, sorted(dataclasses.asdict(cfg).items()), DriverConfig())).encode()).hexdigest()[:8]
    path = Path(cache_dir) / f"toy_{split}_n{n}_s{seed}_{key}.pt"
    if path.exists():
        return load_scenes(path)
    scenes = make_toy_scenes(n, seed + 1_000_003 * (_TOY_SPLITS.index(split) + 1), cfg)
    save_scenes(scenes, path)
    return scenes
