"""Real scenes: Waymo Open Motion Dataset (WOMD) scenarios in GPUDrive's JSON format -> `Scenes`.

One JSON file per WOMD scenario (schema: ../shared/data/womd_examples/FORMAT.md). Every field is
validated: a malformed file raises ValueError naming the file and the field path
(`objects[3].position[7].x`). Choices are listed in the comment below.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from scenes import (CROSSWALK, LANE, NOW, OTHER, ROAD_EDGE, ROAD_LINE, T, TL_STATES, Scenes, collate,
                    polylines_to_segments, scene_from_numpy, wrap_angle)

# Choices:
# - Origin: the xy mean of the agents valid at step NOW. It is subtracted from agent positions, map
#   points and stop points, so networks see small numbers. z is kept in the file's frame for agents
#   and map alike: only differences of z matter (overpasses).
# - Ranges, checked on what the tensors hold (float32, after centring), so that no value becomes inf
#   or silently changes a score: every number finite in float32; agent x, y, z and velocity at valid
#   steps, map points and stop points within MAX_COORD (1e5 m, m/s) of the origin; length, width and
#   height of an agent valid at some step finite, > 0 and < MAX_SIZE (100 m). A scene with no valid
#   agent, or none valid at step NOW, has nothing to simulate and is rejected.
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
MAX_COORD = 1e5      # m (and m/s): WOMD scenes span a few hundred metres; anything past 100 km is corrupt
MAX_SIZE = 100.0     # m: the longest road vehicles are ~30 m; 0, negative or NaN sizes break the boxes
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
                    raise _FieldError(f"{where}[{t}]" + (f".{k}" if k else ""),
                                      f"expected a number, got {v!r:.40}")
        raise _FieldError(where, "could not read as numbers")
    arr = arr.astype(np.float64).reshape(shape)                    # [P, len(keys)] or [P]
    with np.errstate(over="ignore"):
        finite = np.isfinite(arr.astype(np.float32))               # [P, ...] checked as the tensors hold it
    if not finite.all():
        t, *k = np.argwhere(~finite)[0]
        raise _FieldError(f"{where}[{t}]" + (f".{keys[k[0]]}" if keys else ""),
                          f"non-finite value, or too large for float32 ({float(arr[(t, *k)])!r})")
    return arr


def _bounded(x: np.ndarray, ok: np.ndarray, where, limit: float, what: str) -> None:
    """|x| <= limit wherever ok: x [P, ...], ok broadcastable to it; where(index) names the entry."""
    bad = ok & ~(np.abs(x) <= limit)                               # [P, ...]
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise _FieldError(where(idx), f"{x[idx]:.6g} {what}; expected at most {limit:g} in magnitude")


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
        # [T, 3]
        xyz.append(_numbers(_get(o, "position", (list,), where), where + ".position", ("x", "y", "z"), T))
        head.append(_numbers(_get(o, "heading", (list,), where), where + ".heading", (), T))  # [T]
        # [T, 2]
        vel.append(_numbers(_get(o, "velocity", (list,), where), where + ".velocity", ("x", "y"), T))
        valid.append(_bools(_get(o, "valid", (list,), where), where + ".valid", T))  # [T]
        size.append([_get(o, k, (int, float), where) for k in ("length", "width", "height")])
        kind.append(_WOMD_AGENT_TYPES[typ])
        expert.append(_get(o, "mark_as_expert", (bool,), where))
        keep.append(i)
    if not keep:
        raise _FieldError("objects", "no vehicle, pedestrian or cyclist in the scene")
    return dict(xyz=np.stack(xyz), head=np.stack(head), vel=np.stack(vel), valid=np.stack(valid),
                size=np.asarray(size, np.float64), kind=np.asarray(kind, np.int64),
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
            raise _FieldError(where + ".type",
                              f"unknown road type {typ!r}; expected one of {list(_WOMD_ROAD_TYPES)}")
        p = _numbers(_get(r, "geometry", (list,), where), where + ".geometry", ("x", "y", "z"))  # [P, 3]
        code = _get(r, "map_element_id", (int,), where)
        road_id = _get(r, "id", (int,), where)
        if typ in _WOMD_POLYGONS and len(p) >= 3 and (p[0] != p[-1]).any():
            p = np.concatenate([p, p[:1]])                         # [P + 1, 3] closed polygon
        p[:, :2] -= origin
        _bounded(p, True, lambda i, w=where: f"{w}.geometry[{i[0]}].{'xyz'[i[1]]}", MAX_COORD,
                 "m from the scene origin")
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
                raise _FieldError(f"{where}.state[{t}]",
                                  f"unknown signal state {name!r}; expected one of {list(TL_STATES)}")
        if int(key) not in lane_poly:
            continue
        t_idx = t_idx.astype(np.int64)                             # [n]
        state = np.zeros(T, np.int64)                              # [T] 0 = unknown
        state[t_idx] = [_TL_INDEX[name] for name in names]
        known = (x != WOMD_SENTINEL) & (y != WOMD_SENTINEL)        # [n]
        xy = np.stack([x, y], -1) - origin                         # [n, 2]
        _bounded(xy, known[:, None], lambda i, w=where: f"{w}.{'xy'[i[1]]}[{i[0]}]", MAX_COORD,
                 "m from the scene origin")
        xy = xy[known]                                             # [n', 2]
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
    if not valid.any():
        raise _FieldError("objects[*].valid", "no agent is valid at any step (steps holding the "
                          f"{WOMD_SENTINEL:g} sentinel count as invalid): nothing to simulate or score")
    if not valid[:, NOW].any():
        raise _FieldError(f"objects[*].valid[{NOW}]", f"no agent is valid at step {NOW} (now), where "
                          "every rollout starts: nothing to simulate")
    xy = raw["xyz"][..., :2]                                       # [A, T, 2]
    origin = xy[valid[:, NOW], NOW].mean(0)                        # [2]
    m = valid[..., None]                                           # [A, T, 1]
    obj = lambda i, field, keys: f"objects[{keep[i[0]]}].{field}[{i[1]}].{keys[i[2]]}"
    _bounded(np.concatenate([xy - origin, raw["xyz"][..., 2:]], -1), m, lambda i: obj(i, "position", "xyz"),
             MAX_COORD, "m (x, y from the scene origin)")
    _bounded(raw["vel"], m, lambda i: obj(i, "velocity", "xy"), MAX_COORD, "m/s")
    seen = valid.any(1)                                            # [A]
    size_ok = np.isfinite(raw["size"]) & (raw["size"] > 0) & (raw["size"] < MAX_SIZE)  # [A, 3]
    if (seen[:, None] & ~size_ok).any():
        a, k = np.argwhere(seen[:, None] & ~size_ok)[0]
        raise _FieldError(f"objects[{keep[a]}].{('length', 'width', 'height')[k]}",
                          f"{float(raw['size'][a, k])!r} m; expected a finite size > 0 and < {MAX_SIZE:g} m")
    agents = dict(
        pos=np.where(m, xy - origin, 0.0).astype(np.float32),     # [A, T, 2]
        z=np.where(valid, raw["xyz"][..., 2], 0.0).astype(np.float32),  # [A, T]
        yaw=np.where(valid, wrap_angle(raw["head"]), 0.0).astype(np.float32),  # [A, T]
        vel=np.where(m, raw["vel"], 0.0).astype(np.float32),      # [A, T, 2]
        valid=valid, size=np.where(seen[:, None], raw["size"], 0.0).astype(np.float32),  # [A, 3]
        agent_type=raw["kind"],
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
    if max_agents is not None and (isinstance(max_agents, bool) or not isinstance(max_agents, int)
                                   or max_agents < 1):
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
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {'not a folder' if path.exists() else 'the folder does not exist'} "
                                "(expected a folder of GPUDrive JSON scenes, see womd_examples/FORMAT.md)")
    files = sorted(path.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.json scene files (GPUDrive JSON, see womd_examples/FORMAT.md)")
    return collate([load_womd_json(f, max_agents) for f in files])


def womd_examples_dir() -> Path:
    """Where the example scenes are looked for: $WOMD_EXAMPLES, else <repo>/../shared/data/womd_examples."""
    env = os.environ.get("WOMD_EXAMPLES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "shared" / "data" / "womd_examples"


def find_womd_examples() -> Path | None:
    """The example-scene folder (womd_examples_dir), or None when it is missing or holds no *.json."""
    p = womd_examples_dir()
    return p if p.is_dir() and any(p.glob("*.json")) else None


def missing_womd_examples() -> str:
    """Why find_womd_examples found nothing, naming the folder it checked (for the callers' notes)."""
    p = womd_examples_dir()
    how = "$WOMD_EXAMPLES" if os.environ.get("WOMD_EXAMPLES") else "the default; set WOMD_EXAMPLES to move it"
    state = ("does not exist" if not p.exists() else "is not a folder" if not p.is_dir()
             else "holds no *.json scenes")
    return f"{p} ({how}) {state}"
