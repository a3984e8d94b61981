"""Pictures: one busy scene driven by each method beside its log, one rollout as a GIF, training curves.

What a reader should see in `rollouts_<suite>.png` is *how* the methods differ, which a table of
rates cannot show: one scene, the same for every panel, chosen as the densest junction of the split
(`busiest_scene`: most pairs of vehicles that come close on crossing headings in the log);
the log, then one rollout of each method, all with the same crop and scale and equal axes. Each
agent keeps its colour in every panel: its 1 s history (grey), its 8 s future, its box at the last
step; a red cross where it first touches another box and a magenta diamond where it first leaves
the road. Those events are the metric's own flags (`wosac_metrics.trajectory_features`: rounded-box
distance < 0, signed road-edge distance > 0), so each panel's title counts, for this one rollout,
what the collision and off-road rates of the results table count (the table over scored agents
only; on toy scenes every agent drawn is scored), with the rollout's average distance to the log.

Read-only views of tensors the other files compute (evaluate.py calls them); matplotlib is imported
inside each function so that nothing else needs it.
"""
from __future__ import annotations

import math

import torch

from geometry import box_corners
from scenes import CROSSWALK, DT, LANE, NOW, ROAD_EDGE, ROAD_LINE, T, Scenes
from wosac_metrics import VEHICLE, log_as_rollouts, trajectory_features

# Agent colours: tab20 without its reds, pinks and greys, which mark events and replayed agents.
PALETTE = tuple(i for i in range(20) if i not in (6, 7, 12, 13, 14, 15))
COLLISION, OFFROAD, REPLAYED = "red", "magenta", "0.55"
MAP_STYLE = {ROAD_EDGE: dict(colors="k", linewidths=1.1), ROAD_LINE: dict(colors="0.7", linewidths=0.5),
             LANE: dict(colors="0.8", linewidths=0.5, linestyles=":"),
             CROSSWALK: dict(colors="0.55", linewidths=0.6, linestyles="--")}


# --------------------------------------------------------------------------------------------
# Which scene, and what happened in it
# --------------------------------------------------------------------------------------------
def crossing_pairs(scenes: Scenes, radius: float = 15.0, every: int = 5):
    """Per scene, the pairs of scored vehicles that at one logged step (every `every`-th of 10..90)
    are within `radius` m of each other on crossing headings, |sin(yaw_i - yaw_j)| > 1/2 (30 to 150
    degrees apart). That is the signature of a junction: on an open road, vehicles close to each
    other follow or meet head-on in their own lanes. -> [B] long, each pair once."""
    steps = slice(NOW, T, every)
    pos, yaw = scenes.pos[:, :, steps], scenes.yaw[:, :, steps]            # [B, A, t, 2], [B, A, t]
    scored = scenes.eval_mask & scenes.valid[:, :, NOW] & (scenes.agent_type == VEHICLE)  # [B, A]
    ok = scenes.valid[:, :, steps] & scored.unsqueeze(-1)                  # [B, A, t]
    near = (pos.unsqueeze(2) - pos.unsqueeze(1)).norm(dim=-1) < radius     # [B, A, A, t]
    crossing = torch.sin(yaw.unsqueeze(2) - yaw.unsqueeze(1)).abs() > 0.5  # [B, A, A, t]
    both = ok.unsqueeze(2) & ok.unsqueeze(1)                               # [B, A, A, t]
    return (near & crossing & both).any(-1).triu(1).sum((1, 2))            # [B]


def busiest_scene(scenes: Scenes) -> int:
    """The densest junction: the scene with the most crossing pairs (crossing_pairs); ties go to
    more scored agents, then to the first scene, so the choice is deterministic."""
    scored = scenes.eval_mask & scenes.valid[:, :, NOW]                    # [B, A]
    key = crossing_pairs(scenes) * (scenes.A + 1) + scored.sum(1)          # [B] pairs first, then agents
    return int(key.argmax())                                               # the first of equal keys


def first_events(scenes: Scenes, fut_pos, fut_z, fut_yaw, fut_valid=None) -> dict:
    """The first future step (0..79, -1 for never) at which each agent collides and goes off-road,
    with the metric's flags on the 91-step trajectory (log history + the 80 given steps).
    fut_pos [B, R, A, 80, 2], fut_z/fut_yaw [B, R, A, 80]; fut_valid [B, R, A, 80] (default: all
    valid, as score_rollouts treats a rollout) -> {"collision", "offroad"}: [B, R, A] long."""
    R = fut_pos.shape[1]
    hist = lambda x: x[:, None, :, :NOW + 1].expand(-1, R, *([-1] * (x.dim() - 1)))  # [B, R, A, 11, ...]
    if fut_valid is None:
        fut_valid = torch.ones(fut_yaw.shape, dtype=torch.bool, device=fut_yaw.device)  # [B, R, A, 80]
    f = trajectory_features(scenes, torch.cat([hist(scenes.pos), fut_pos], 3),   # [B, R, A, 91, 2]
                            torch.cat([hist(scenes.z), fut_z], 3),                # [B, R, A, 91]
                            torch.cat([hist(scenes.yaw), fut_yaw], 3),            # [B, R, A, 91]
                            torch.cat([hist(scenes.valid), fut_valid], 3))        # [B, R, A, 91]
    sim = scenes.valid[:, None, :, NOW, None]                                     # [B, 1, A, 1]
    out = {}
    for name, key in (("collision", "collision_per_step"), ("offroad", "offroad_per_step")):
        flags = f[key] & f["valid"] & sim                                         # [B, R, A, 80]
        first = flags.int().argmax(-1)                                            # [B, R, A] first True
        out[name] = torch.where(flags.any(-1), first, torch.full_like(first, -1))
    return out


# --------------------------------------------------------------------------------------------
# Drawing pieces
# --------------------------------------------------------------------------------------------
def _draw_map(ax, scenes: Scenes, b: int) -> None:
    """Road edges, painted lines, lane centres and crosswalks of scene b, one LineCollection each."""
    from matplotlib.collections import LineCollection
    for kind, style in MAP_STYLE.items():
        m = scenes.seg_valid[b] & (scenes.seg_type[b] == kind)                    # [S]
        seg = torch.stack([scenes.seg_start[b, m, :2], scenes.seg_end[b, m, :2]], 1)  # [S', 2, 2]
        ax.add_collection(LineCollection(seg.cpu().numpy(), zorder=1, **style))


def _colours(scenes: Scenes, b: int) -> dict:
    """Sim agent index -> its colour, the same in every panel; agents not controlled are grey."""
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    sim = torch.nonzero(scenes.valid[b, :, NOW]).flatten().tolist()
    return {i: cmap(PALETTE[k % len(PALETTE)]) if bool(scenes.controlled[b, i]) else REPLAYED
            for k, i in enumerate(sim)}


def _view(ax, box) -> None:
    """The shared crop: equal axes, no ticks (metres are shown by the scale bar)."""
    (x0, y0), side = box
    ax.set_xlim(x0, x0 + side)
    ax.set_ylim(y0, y0 + side)
    ax.set_aspect("equal")
    ax.set_xticks([]); ax.set_yticks([])


def _scale_bar(ax, box) -> None:
    """A bar of a round length in the lower-left corner, so that sizes read in metres."""
    (x0, y0), side = box
    metres = next(m for m in (5, 10, 20, 50, 100, 200, 500) if m >= side / 8)
    x, y = x0 + 0.04 * side, y0 + 0.04 * side
    ax.plot([x, x + metres], [y, y], color="k", lw=2, zorder=2)                # under the agents
    ax.text(x + metres / 2, y + 0.015 * side, f"{metres} m", ha="center", va="bottom", fontsize=7, zorder=2)


def crop(scenes: Scenes, b: int, margin: float = 6.0, keep: float = 0.8):
    """One square window for every panel, fitted to the log of scene b: the middle `keep` share of
    the sim agents' logged positions along each axis (agents far out on the arms would otherwise
    shrink the junction to a dot), plus `margin` m. Rollouts are clipped to it, never widen it (a
    rollout that drives off to nowhere must not shrink everyone else). -> ((x0, y0), side)."""
    ok = scenes.valid[b] & scenes.valid[b, :, NOW].unsqueeze(-1)           # [A, T]
    logged = scenes.pos[b][ok]                                              # [P, 2]
    if logged.shape[0] == 0:
        return (-50.0, -50.0), 100.0
    q = logged.new_tensor([(1 - keep) / 2, (1 + keep) / 2])                 # [2]
    lo, hi = torch.quantile(logged, q, dim=0) + logged.new_tensor([[-margin], [margin]])  # [2] each
    side = float((hi - lo).max())
    centre = 0.5 * (lo + hi)                                                # [2]
    return (float(centre[0]) - side / 2, float(centre[1]) - side / 2), side


def _draw_agents(ax, scenes: Scenes, b: int, pos, yaw, events: dict, future_ok=None) -> None:
    """One rollout of scene b: history, future, box at the last step, first collision and off-road.
    pos [A, 80, 2], yaw [A, 80]; events: "collision"/"offroad" [A] first step or -1; future_ok
    [A, 80] hides log steps where an agent is not observed (a rollout is valid everywhere)."""
    from matplotlib.collections import LineCollection, PolyCollection
    colour = _colours(scenes, b)
    idx = list(colour)
    hist = scenes.pos[b, :, :NOW + 1].clone()                               # [A, 11, 2]
    hist[~scenes.valid[b, :, :NOW + 1]] = math.nan                          # gaps stay gaps
    fut = torch.cat([scenes.pos[b, :, NOW:NOW + 1], pos], 1)                # [A, 81, 2] from "now"
    if future_ok is not None:
        fut[:, 1:][~future_ok] = math.nan
    ax.add_collection(LineCollection([hist[i].numpy() for i in idx], colors="0.35", linewidths=1.0,
                                     zorder=3))
    ax.add_collection(LineCollection([fut[i].numpy() for i in idx], colors=[colour[i] for i in idx],
                                     linewidths=1.6, alpha=0.9, zorder=3))
    # the box at the last step (the last observed one in the log)
    last = torch.full((pos.shape[0],), pos.shape[1] - 1, dtype=torch.long)  # [A]
    if future_ok is not None:
        steps = torch.arange(pos.shape[1])                                  # [80]
        last = torch.where(future_ok, steps, -1).amax(-1).clamp(min=0)      # [A]
    ar = torch.arange(pos.shape[0])                                         # [A]
    size = scenes.size[b]                                                   # [A, 3]
    corners = box_corners(pos[ar, last], yaw[ar, last], size[:, 0], size[:, 1])  # [A, 4, 2]
    hit, off = events["collision"], events["offroad"]                       # [A] each
    edge = [COLLISION if hit[i] >= 0 else OFFROAD if off[i] >= 0 else "k" for i in idx]
    ax.add_collection(PolyCollection([corners[i].numpy() for i in idx], facecolors=[colour[i] for i in idx],
                                     edgecolors=edge, linewidths=[1.8 if e != "k" else 0.6 for e in edge],
                                     zorder=4))
    for name, style in (("collision", dict(marker="X", s=70, c=COLLISION)),
                        ("offroad", dict(marker="D", s=36, c=OFFROAD))):
        who = [i for i in idx if events[name][i] >= 0]
        if who:
            at = pos[who, events[name][who]]                                # [n, 2] first event positions
            ax.scatter(at[:, 0], at[:, 1], edgecolors="white", linewidths=0.8, zorder=5, **style)


def _summary(scenes: Scenes, b: int, pos, events: dict, future_ok=None) -> str:
    """A panel's title line over the agents drawn (sim agents): how many collide and go off-road,
    and for a rollout its average displacement from the log (ADE, over the logged future steps)."""
    sim = scenes.valid[b, :, NOW]                                           # [A]
    n = int(sim.sum())
    hit = int((events["collision"][sim] >= 0).sum())
    off = int((events["offroad"][sim] >= 0).sum())
    line = f"{hit}/{n} collide, {off}/{n} off-road"
    if future_ok is None:
        ok = scenes.valid[b, :, NOW + 1:] & sim.unsqueeze(-1)               # [A, 80]
        err = (pos - scenes.pos[b, :, NOW + 1:]).norm(dim=-1)               # [A, 80]
        line += f", ADE {float(err[ok].mean()) if ok.any() else math.nan:.1f} m"
    return line


def _legend_handles(any_replayed: bool) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Line2D([], [], color="0.35", lw=1.0, label="history (1 s)"),
               Line2D([], [], color="tab:blue", lw=1.6, label="future (8 s), one colour per agent"),
               Patch(facecolor="tab:blue", edgecolor="k", lw=0.6, label="box at the last step"),
               Line2D([], [], ls="", marker="X", ms=9, color=COLLISION, mec="white",
                      label="first contact (box edged red)"),
               Line2D([], [], ls="", marker="D", ms=6, color=OFFROAD, mec="white",
                      label="first off-road (box edged magenta)"),
               Line2D([], [], color="k", lw=1.1, label="road edge"),
               Line2D([], [], color="0.7", lw=0.5, label="lane line / centre (dotted)"),
               Line2D([], [], color="0.55", lw=0.6, ls="--", label="crosswalk")]
    if any_replayed:
        handles.insert(3, Patch(facecolor=REPLAYED, label="not controlled: replays its log"))
    return handles


# --------------------------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------------------------
def plot_rollouts(path, scenes: Scenes, rollouts: dict, b: int = 0, title: str = "") -> list:
    """The log of scene b beside one rollout of each method: same crop and scale, a shared legend,
    a title per panel with that rollout's events. rollouts: panel name -> (fut_pos [A, 80, 2],
    fut_z [A, 80], fut_yaw [A, 80]) of scene b. Returns the panel titles, log first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenes = scenes.select([b]).to("cpu")
    log_ok = scenes.valid[0, :, NOW + 1:]                                   # [A, 80]
    panels = {"log": [x[0, 0] for x in log_as_rollouts(scenes)],           # [A, 80, 2], [A, 80] x2
              **{k: [x.cpu().float() for x in v] for k, v in rollouts.items()}}
    # every panel's events in one metric call: the panels are the R axis of one [1, N, A, 80] batch
    stack = lambda j: torch.stack([p[j] for p in panels.values()])[None]    # [1, N, A, 80, ...]
    valid = torch.stack([log_ok] + [torch.ones_like(log_ok)] * len(rollouts))[None]  # [1, N, A, 80]
    ev = first_events(scenes, stack(0), stack(1), stack(2), valid)          # [1, N, A] each
    box = crop(scenes, 0)
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows + 1.2), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    titles = []
    for k, (ax, (name, (pos, _, yaw))) in enumerate(zip(axes.flat, panels.items())):
        events = {e: v[0, k] for e, v in ev.items()}                        # [A] each
        ok = log_ok if name == "log" else None
        _draw_map(ax, scenes, 0)
        _draw_agents(ax, scenes, 0, pos, yaw, events, ok)
        _view(ax, box)
        _scale_bar(ax, box)
        titles.append(f"{name}\n{_summary(scenes, 0, pos, events, ok)}")
        ax.set_title(titles[-1], fontsize=10)
    replayed = bool((scenes.valid[0, :, NOW] & ~scenes.controlled[0]).any())
    fig.legend(handles=_legend_handles(replayed), loc="outside lower center", ncol=4, fontsize=9,
               frameon=False)
    fig.suptitle(title or f"scene {scenes.scene_id[0]}: the log and one 8 s rollout per method", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return titles


def animate_rollout(path, scenes: Scenes, fut_pos, fut_z, fut_yaw, b: int = 0, r: int = 0, every: int = 2,
                    name: str = "") -> None:
    """A GIF of one rollout in the crop and colours of plot_rollouts: boxes moving over the map with
    their trails, edged red from their first contact on and magenta from their first off-road step.
    fut_pos [B, R, A, 80, 2], fut_z/fut_yaw [B, R, A, 80]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.collections import LineCollection, PolyCollection
    scenes = scenes.select([b]).to("cpu")
    one = lambda x: x[b:b + 1, r:r + 1].cpu().float()                      # [1, 1, A, 80, ...]
    pos, z, yaw = one(fut_pos), one(fut_z), one(fut_yaw)
    ev = {k: v[0, 0] for k, v in first_events(scenes, pos, z, yaw).items()}  # [A] each
    pos, yaw = pos[0, 0], yaw[0, 0]                                         # [A, 80, 2], [A, 80]
    colour = _colours(scenes, 0)
    idx = list(colour)
    size = scenes.size[0]                                                   # [A, 3]
    box = crop(scenes, 0)
    fig, ax = plt.subplots(figsize=(5, 5.3))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.94)      # fixed: no layout pass per frame
    _draw_map(ax, scenes, 0)
    _view(ax, box)
    _scale_bar(ax, box)
    trails = LineCollection([], colors=list(colour.values()), linewidths=1.2, alpha=0.7, zorder=3)
    boxes = PolyCollection([], facecolors=list(colour.values()), zorder=4)
    ax.add_collection(trails)
    ax.add_collection(boxes)

    def frame(t):
        corners = box_corners(pos[:, t], yaw[:, t], size[:, 0], size[:, 1])  # [A, 4, 2]
        boxes.set_verts([corners[i].numpy() for i in idx])
        hit = [0 <= ev["collision"][i] <= t for i in idx]
        off = [0 <= ev["offroad"][i] <= t for i in idx]
        boxes.set_edgecolors([COLLISION if h else OFFROAD if o else "k" for h, o in zip(hit, off)])
        boxes.set_linewidths([1.8 if h or o else 0.6 for h, o in zip(hit, off)])
        trails.set_segments([pos[i, :t + 1].numpy() for i in idx])
        ax.set_title(f"{name}{': ' if name else ''}t = {(t + 1) * DT:.1f} s; so far {sum(hit)} collided, "
                     f"{sum(off)} off-road", fontsize=9)
        return [boxes, trails]

    anim = FuncAnimation(fig, frame, frames=range(0, pos.shape[1], every), blit=False)
    anim.save(path, writer=PillowWriter(fps=1 / (every * DT)))                # real time
    plt.close(fig)


def plot_curves(path, logs: dict) -> None:
    """Training curves: logs maps a title to {series name: list of values}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {k: {n: ys for n, ys in v.items() if ys} for k, v in logs.items()}
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return
    fig, axes = plt.subplots(1, len(logs), figsize=(4.5 * len(logs), 3.5), squeeze=False)
    for ax, (title, series) in zip(axes[0], logs.items()):
        for name, ys in series.items():
            ys = [y for y in ys if y is not None and not (isinstance(y, float) and math.isnan(y))]
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, label=name)
        ax.set_title(title); ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
