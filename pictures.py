"""Pictures: a scene's map with each method's rollouts, one rollout as a GIF, training curves.

Read-only views of tensors the other files compute (evaluate.py calls them); matplotlib is imported
inside each function so that nothing else needs it.
"""
from __future__ import annotations

import math

import torch

from geometry import box_corners
from scenes import CROSSWALK, DT, LANE, NOW, ROAD_EDGE, Scenes


def _draw_map(ax, scenes: Scenes, b: int):
    s = scenes.select([b])
    ok = s.seg_valid[0]
    for kind, style in ((LANE, dict(color="0.8", lw=0.6, ls="--")), (ROAD_EDGE, dict(color="k", lw=1.2)),
                        (CROSSWALK, dict(color="tab:orange", lw=0.8))):
        m = ok & (s.seg_type[0] == kind)
        a, e = s.seg_start[0, m, :2].cpu(), s.seg_end[0, m, :2].cpu()          # [S', 2]
        for p, q in zip(a.tolist(), e.tolist()):
            ax.plot([p[0], q[0]], [p[1], q[1]], **style)


def plot_rollouts(path, scenes: Scenes, rollouts: dict, b: int = 0, n_show: int = 4) -> None:
    """A scene's map with the log and a few rollouts of each method, side by side.
    rollouts: method name -> fut_pos [B, R, A, 80, 2]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["log"] + list(rollouts)
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    sim = scenes.valid[b, :, NOW] & scenes.controlled[b]                       # [A]
    centre = scenes.pos[b, sim, NOW].mean(0).cpu() if sim.any() else torch.zeros(2)
    for ax, name in zip(axes.flat, names):
        _draw_map(ax, scenes, b)
        hist = scenes.pos[b, :, :NOW + 1].cpu()                                # [A, 11, 2]
        if name == "log":
            trajs = scenes.pos[b, :, NOW:].cpu()[None]                         # [1, A, 81, 2]
        else:
            trajs = rollouts[name][b, :n_show].cpu()                           # [r, A, 80, 2]
        for i in torch.nonzero(sim).flatten().tolist():
            ax.plot(hist[i, :, 0], hist[i, :, 1], color="0.3", lw=1.5)
            for r in range(trajs.shape[0]):
                ax.plot(trajs[r, i, :, 0], trajs[r, i, :, 1], lw=0.8, alpha=0.7, color=f"C{i % 10}")
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlim(centre[0] - 60, centre[0] + 60)
        ax.set_ylim(centre[1] - 60, centre[1] + 60)
        ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle(f"scene {scenes.scene_id[b]}: history (grey), {n_show} rollouts per method")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def animate_rollout(path, scenes: Scenes, fut_pos, fut_yaw, b: int = 0, r: int = 0, every: int = 2) -> None:
    """A GIF of one rollout: boxes moving over the map. fut_pos [B, R, A, 80, 2], fut_yaw [B, R, A, 80]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    fig, ax = plt.subplots(figsize=(5, 5))
    _draw_map(ax, scenes, b)
    sim = (scenes.valid[b, :, NOW] & scenes.controlled[b]).cpu()               # [A]
    pos, yaw = fut_pos[b, r].cpu(), fut_yaw[b, r].cpu()                        # [A, 80, 2], [A, 80]
    size = scenes.size[b].cpu()                                                # [A, 3]
    centre = pos[sim, 0].mean(0) if sim.any() else torch.zeros(2)
    ax.set_xlim(centre[0] - 60, centre[0] + 60); ax.set_ylim(centre[1] - 60, centre[1] + 60)
    ax.set_aspect("equal"); ax.set_xticks([]); ax.set_yticks([])
    patches = [ax.fill([0], [0], color=f"C{i % 10}", alpha=0.8)[0] for i in range(pos.shape[0])]

    def frame(t):
        corners = box_corners(pos[:, t], yaw[:, t], size[:, 0], size[:, 1])  # [A, 4, 2]
        for i, p in enumerate(patches):
            p.set_xy(corners[i].numpy() if sim[i] else [[0, 0]])
        ax.set_title(f"t = {(t + 1) * DT:.1f} s")
        return patches

    anim = FuncAnimation(fig, frame, frames=range(0, pos.shape[1], every), blit=False)
    anim.save(path, writer=PillowWriter(fps=10 // every))
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


# --------------------------------------------------------------------------------------------
# The eval stage: every checkpoint under the runs folder, on the same scenes, one table
