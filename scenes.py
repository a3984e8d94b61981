"""The data contract: a batch of driving scenes as padded tensors, and what every module shares.

Every module of the project reads scenes through one dataclass, `Scenes`, laid out like the
Waymo Open Motion Dataset (WOMD): 91 steps at 10 Hz, history 0..10 ("now" is step 10) and an
8 s future 11..90. Two sources fill it: real WOMD scenes (`womd.py`) and procedural toy scenes
whose logs the stochastic human driver writes (`toy_scenes.py`).

Maps are polylines cut into segments `[B, S]`. Road edges keep WOMD's orientation (the road
lies on the left of the point order), because the signed distance to the road edge, and so
"off-road", is defined by it (`research/wosac.md` 3.4).

Also here, because every other file uses them: batching (collate / select / repeat), caching
with one atomic save, the finiteness check that stops training on a NaN (`check_finite`), and
the pose algebra of local frames,

    apply_local:  (x, y)_j = (x0, y0) + R(yaw0) (x_j, y_j),   yaw_j = wrap(yaw0 + yaw_j)
    to_local:     its inverse,  (x_j, y_j) = R(-yaw0) ((x, y)_j - (x0, y0)).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
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



AGENT_FIELDS = ("pos", "z", "yaw", "vel", "valid", "size", "agent_type", "controlled", "eval_mask", "goal",
                "route", "route_valid", "style")
SEG_FIELDS = ("seg_start", "seg_end", "seg_type", "seg_code", "seg_poly", "seg_prev", "seg_next", "seg_valid")


def trim(scenes: Scenes, tokens: dict | None = None) -> tuple:
    """Drop trailing padding agents and map segments of a batch (a dataset is padded to its largest
    scene; a batch rarely needs that much). tokens [B, A, ...] are trimmed alongside."""
    any_agent = scenes.valid.any(-1).any(0)                                    # [A]
    A = int(any_agent.nonzero().max()) + 1 if bool(any_agent.any()) else 1
    any_seg = scenes.seg_valid.any(0)                                          # [S]
    Sn = int(any_seg.nonzero().max()) + 1 if bool(any_seg.any()) else 1
    t = scenes.tensors()
    unknown = set(t) - set(AGENT_FIELDS) - set(SEG_FIELDS) - {"tl_lane", "tl_state", "tl_stop"}
    if unknown:
        raise ValueError(f"scenes.trim: Scenes fields {sorted(unknown)} are not classified as agent or map "
                         "fields")
    for name in AGENT_FIELDS:
        t[name] = t[name][:, :A]                                               # [B, A', ...]
    for name in SEG_FIELDS:
        t[name] = t[name][:, :Sn]                                              # [B, S', ...]
    out = Scenes(**t, scene_id=list(scenes.scene_id))
    return out, (None if tokens is None else {k: v[:, :A] for k, v in tokens.items()})


def batches(n: int, size: int, shuffle: bool, gen=None) -> list:
    """Index batches over n scenes, shuffled by `gen` or in order."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)  # [n]
    return [order[i:i + size] for i in range(0, n, size)]


def batch_of(split: Scenes, enc: dict, device, idx) -> tuple:
    """Scenes `idx` of a split, trimmed, on `device`, with their log tokens (enc [B, A, ...] each)."""
    s, tk = trim(split.select(idx), {k: v[idx] for k, v in enc.items()})
    return s.to(device), {k: v.to(device) for k, v in tk.items()}


def check_finite(value, what: str) -> None:
    """Raise FloatingPointError naming `what` (and the entry inside it) when a tensor or a float in
    `value` (or in the dicts, lists and tuples it holds) is NaN or infinite."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{what}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{what}[{i}]")
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise FloatingPointError(f"{what} is not finite ({value.item() if value.numel() == 1 else bad})")
    elif isinstance(value, float) and not math.isfinite(value):
        raise FloatingPointError(f"{what} is not finite ({value})")


def checksum_path(path: Path) -> Path:
    """The sha256 sidecar of a torch file (`bc.pt` -> `bc.pt.sha256`)."""
    return path.with_name(path.name + ".sha256")


def save_atomic(obj, path) -> None:
    """The one way files are written: to a temporary file, then renamed, so a crash never leaves
    half a file. A `.json` path gets JSON text, anything else `torch.save` and a sha256 sidecar
    (`checksum_path`) that read_file checks, so a bit flipped later is caught, not loaded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
        return
    torch.save(obj, tmp)
    side, side_tmp = checksum_path(path), checksum_path(tmp)
    side_tmp.write_text(hashlib.sha256(tmp.read_bytes()).hexdigest())
    os.replace(tmp, path)
    os.replace(side_tmp, side)


def read_file(path, what: str, fix: str, keys: tuple = (), device="cpu") -> dict:
    """The one way checkpoints, logs and caches are read: a `.json` path as JSON, anything else with
    torch.load(weights_only=True) (tensors and plain containers only: never unpickle code), then
    checked to be a dict holding `keys`. Every failure (missing, empty, truncated, corrupt, a
    checksum that no longer matches, not a dict, a key missing) raises FileNotFoundError or
    ValueError naming the file, `what` it should hold, and `fix`, what the user can do about it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected {what}); {fix}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), expected {what}; {fix}")
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}), expected {what}; {fix}") from None
    else:
        side = checksum_path(path)
        data = path.read_bytes()
        if side.is_file() and side.read_text().strip() != hashlib.sha256(data).hexdigest():
            raise ValueError(f"{path}: its bytes no longer match the checksum written with it ({side}): the "
                             f"file is corrupt, expected {what}; {fix} (if a run stopped while saving it, "
                             f"deleting {side.name} accepts the file as it is)")
        try:
            obj = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        # truncated or random bytes raise many kinds of error, and torch's message would advise an unsafe
        # load: name the kind only
        except Exception as e:
            raise ValueError(f"{path}: cannot be read as a torch file ({type(e).__name__}; truncated or "
                             f"corrupt), expected {what}; {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, expected {what} (a dict); {fix}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{path}: lacks {missing}, expected {what}; {fix}")
    return obj


def save_scenes(scenes: Scenes, path) -> None:
    save_atomic({**scenes.tensors(), "scene_id": scenes.scene_id}, path)


def load_scenes(path, cache: bool = False) -> Scenes | None:
    """Scenes saved by save_scenes; any fault raises read_file's named error. A cache (cache=True)
    is never a reason to stop: missing or unusable, it gives None (with a printed note when
    unusable) and the caller rebuilds it."""
    try:
        d = read_file(path, "cached scenes (save_scenes)", "delete the file to regenerate it",
                      keys=tuple(f.name for f in dataclasses.fields(Scenes)))
    except (FileNotFoundError, ValueError) as e:
        if not cache:
            raise
        if not isinstance(e, FileNotFoundError):
            print(f"rebuilding the cache, the file on disk is unusable: {e}")
        return None
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
        tl = dict(lane=np.zeros((0,), np.int64), state=np.zeros((0, T), np.int64),
                  stop=np.zeros((0, T, 2), np.float32))
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
# Pose algebra: local frames
# --------------------------------------------------------------------------------------------
def apply_local(pose: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Place local poses in the world: pose [..., 3] (x, y, yaw), local [..., P, 3] -> [..., P, 3].
    The tokenizer decodes and the simulator executes tokens with exactly this, so the motion
    executed reproduces the decoded poses to float precision."""
    c, s = torch.cos(pose[..., 2:3]), torch.sin(pose[..., 2:3])              # [..., 1]
    x = pose[..., None, 0] + c * local[..., 0] - s * local[..., 1]           # [..., P]
    y = pose[..., None, 1] + s * local[..., 0] + c * local[..., 1]           # [..., P]
    yaw = wrap_angle(pose[..., None, 2] + local[..., 2])                     # [..., P]
    return torch.stack([x, y, yaw], -1)                                      # [..., P, 3]


def to_local_xy(xy: torch.Tensor, origin: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Points xy [..., P, 2] into the frame at origin [..., 2] with heading yaw [...] -> [..., P, 2]."""
    d = xy - origin.unsqueeze(-2)                                            # [..., P, 2]
    c, s = torch.cos(yaw).unsqueeze(-1), torch.sin(yaw).unsqueeze(-1)       # [..., 1]
    return torch.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)  # [..., P, 2]


def to_local(pose: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_local`: world poses [..., P, 3] in the frame of pose [..., 3] -> [..., P, 3]."""
    xy = to_local_xy(world[..., :2], pose[..., :2], pose[..., 2])            # [..., P, 2]
    yaw = wrap_angle(world[..., 2] - pose[..., None, 2])                     # [..., P]
    return torch.cat([xy, yaw.unsqueeze(-1)], -1)                            # [..., P, 3]
