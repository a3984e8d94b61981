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
