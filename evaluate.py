"""The results table across methods, and pictures of what the agents do.

Every method is judged the same way: R = 32 rollouts of the 80 future steps per held-out scene,
scored by the WOSAC realism metric (`wosac_metrics.score_rollouts`), plus the goal rate (an
agent comes within `goal_radius` of its logged final position) and the rollout throughput in
scenarios per second. Methods:

- constant velocity: controlled agents keep their step-10 velocity (the floor);
- human driver: the toy logs' own stochastic driver re-run from step 10 with new seeds, i.e.
  samples of the true behaviour distribution (the ceiling on toy scenes);
- BC and CAT-K: the centralized reference model (`reference_model.py`);
- PPO, HR-PPO, SPACeR: the decentralized policy (`ppo_anchor.py`);
- SFT-SFT and SFT-RFT-SFT: SMART-R1's schedule (`r1_finetune.py`).

A method whose checkpoint is missing is listed as missing, never silently dropped.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

import wosac_metrics as wm
from env import EnvConfig, MultiAgentEnv
from scenes import DT, NOW, T, ROAD_EDGE, LANE, CROSSWALK, Scenes

TABLE_KEYS = ("realism_meta", "kinematic", "interactive", "map_based", "min_ade",
              "collision_rate", "offroad_rate", "goal_rate")


# --------------------------------------------------------------------------------------------
# Baseline rollouts
# --------------------------------------------------------------------------------------------
def constant_velocity(scenes: Scenes, R: int) -> tuple:
    """Controlled agents keep their step-10 velocity and heading; others replay the log.
    Returns fut_pos [B, R, A, 80, 2], fut_z, fut_yaw [B, R, A, 80]."""
    t = DT * torch.arange(1, T - NOW, device=scenes.device, dtype=torch.float32)  # [80]
    pos = scenes.pos[:, :, NOW, None] + scenes.vel[:, :, NOW, None] * t[:, None]  # [B, A, 80, 2]
    ctrl = scenes.controlled[..., None]                                        # [B, A, 1]
    pos = torch.where(ctrl[..., None], pos, scenes.pos[:, :, NOW + 1:])        # [B, A, 80, 2]
    yaw = torch.where(ctrl, scenes.yaw[:, :, NOW, None].expand_as(pos[..., 0]), scenes.yaw[:, :, NOW + 1:])  # [B, A, 80]
    z = scenes.z[:, :, NOW, None].expand_as(yaw)                               # [B, A, 80]
    rep = lambda x: x[:, None].expand(-1, R, *([-1] * (x.dim() - 1))).contiguous()
    return rep(pos), rep(z), rep(yaw)


@torch.no_grad()
def human_driver_rollout(scenes: Scenes, R: int, seed: int = 0, batch_worlds: int = 512) -> tuple:
    """The toy human driver re-run from step 10 in the env (continuous bicycle mode), R times per
    scene with new noise. Returns fut_pos [B, R, A, 80, 2], fut_z, fut_yaw [B, R, A, 80]."""
    from human_driver import HumanDriver
    gen = torch.Generator(device=scenes.device).manual_seed(seed)
    per = max(1, batch_worlds // R)
    outs = []
    for b0 in range(0, scenes.B, per):
        s = scenes.select(slice(b0, b0 + per)).repeat(R)                       # [b * R] worlds
        env = MultiAgentEnv(s, EnvConfig(mode="continuous"))
        env.reset()
        driver = HumanDriver(s, generator=gen)
        for t in range(NOW, T - 1):
            accel, steer = driver.act(env.pos, env.yaw, env.speed, env.active, t)   # [b*R, A] each
            env.step(torch.stack([accel, steer], -1))
        outs.append([x.unflatten(0, (-1, R)) for x in env.rollout_future()])   # [b, R, A, 80, ...]
    return tuple(torch.cat([o[i] for o in outs]) for i in range(3))


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def goal_rate(scenes: Scenes, fut_pos, radius: float = 2.0) -> torch.Tensor:
    """Per scene: fraction of (rollout, controlled agent) pairs that come within `radius` m of the
    agent's goal (its logged last position) at some future step. fut_pos [B, R, A, 80, 2] -> [B]."""
    d = (fut_pos - scenes.goal[:, None, :, None]).norm(dim=-1)                 # [B, R, A, 80]
    reached = (d < radius).any(-1).float()                                     # [B, R, A]
    m = scenes.controlled[:, None].float().expand_as(reached)                  # [B, R, A]
    return (reached * m).sum((1, 2)) / m.sum((1, 2)).clamp(min=1)


def score(scenes: Scenes, fut_pos, fut_z, fut_yaw, chunk: int = 4) -> dict:
    """Dataset means of the WOSAC metrics (+ goal rate) of R rollouts per scene, scored a few
    scenes at a time to bound memory at R = 32."""
    per_scene = []
    for b0 in range(0, scenes.B, chunk):
        sl = slice(b0, b0 + chunk)
        d = wm.score_rollouts(scenes.select(sl), fut_pos[sl], fut_z[sl], fut_yaw[sl])
        d["goal_rate"] = goal_rate(scenes.select(sl), fut_pos[sl])
        per_scene.append(d)
    return wm.dataset_means({k: torch.cat([d[k] for d in per_scene]) for k in per_scene[0]})


def timed(fn, scenes: Scenes, R: int):
    """Run a rollout function and measure scenarios (scene x rollout) per second."""
    if scenes.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(scenes, R)
    if scenes.device.type == "cuda":
        torch.cuda.synchronize()
    return out, scenes.B * R / (time.perf_counter() - t0)


def format_table(results: dict, keys=TABLE_KEYS) -> str:
    """Markdown table; a method given as None is listed as missing."""
    extra = ("scenarios_per_s", "params")
    lines = ["| method | " + " | ".join(keys + extra) + " |", "|---" * (len(keys) + len(extra) + 1) + "|"]
    for name, m in results.items():
        if m is None:
            lines.append(f"| {name} | " + " | ".join(["missing"] * (len(keys) + len(extra))) + " |")
            continue
        cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "-" for k in keys]
        cells.append(f"{m['scenarios_per_s']:.1f}" if m.get("scenarios_per_s") else "-")
        cells.append(f"{int(m['params']):,}" if m.get("params") else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, obj) -> None:
    """Atomic JSON write (tmp file + rename), so a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
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
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4.2), squeeze=False)
    sim = scenes.valid[b, :, NOW] & scenes.controlled[b]                       # [A]
    centre = scenes.pos[b, sim, NOW].mean(0).cpu() if sim.any() else torch.zeros(2)
    for ax, name in zip(axes[0], names):
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
        corners = wm.box_corners(pos[:, t], yaw[:, t], size[:, 0], size[:, 1])  # [A, 4, 2]
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
