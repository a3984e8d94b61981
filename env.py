"""Vectorized kinematic multi-agent simulator: the self-play world of SPACeR.

B worlds of up to A agents are held as flat tensors and advanced together, 0.1 s per step,
with no Python loop over worlds or agents, on CPU or CUDA. An episode starts from the log at
step 10 (history replayed) and runs the 80 future steps; agents that are not controlled replay
their log.

Action modes
- token (default): an action is a motion-token id per agent; the token's `steps_per_token`
  poses (local x, y, yaw in the agent's frame) are executed one 0.1 s step at a time, so the
  motion executed is *exactly* the token chosen. This is what makes the reference model's
  likelihood `log p_ref(a_t | s_t)` of the executed action exact (SPACeR Eq. 1, 3).
- bicycle: a kinematic bicycle (GPUDrive "classic") driven by an id into an
  acceleration x steering grid, one id per 0.1 s.
- continuous: the same bicycle with (accel, steer) given directly: how the toy human driver acts.

Events and reward (SPACeR's task reward)
    r_task = w_goal * 1[goal reached, first time] - w_coll * 1[collided] - w_off * 1[off-road]
summed over the 0.1 s steps of one action. Collision and off-road use exactly the rounded-box
distance and the signed road-edge distance that `wosac_metrics.py` scores (both from geometry.py),
so what the policy is penalised for is what the metric counts. Collisions and off-road driving do
not end an agent's episode (GPUDrive's collision_behavior "ignore").

Reaching the goal (`EnvConfig.at_goal`)
- "stop", the self-play setting (ppo_anchor.make_env): a controlled agent that comes within
  goal_radius of its goal is *done*, as in GPUDrive, which SPACeR trains in: it is paid w_goal
  and nothing after that step, neither reward nor penalty (`done` [B, A], which PPO reads to stop
  bootstrapping and to leave the agent out of its loss). GPUDrive's training default then
  removes the agent from the world; its WOSAC evaluation instead parks it (goal_behavior
  "stop"), because the metric needs every scored agent at all 80 steps. We park it in training
  too, so the policy learns among the same parked agents that it meets at evaluation: from its
  next action on, a done agent holds its pose (in token mode it executes the zero-motion token,
  so the executed token is still exact), stays an obstacle for the others, and keeps being
  recorded. The paper does not say more than GPUDrive's setting; this is that setting.
- "continue": every agent drives to the end and may collect rewards after its goal; the human
  driver and the log replay use it (stopping them would change the behaviour they sample).

Speed: the road-edge check and the road observation do not look at every map segment for every
agent at every step.
- Off-road: each agent keeps the road-edge segments it can possibly pick while its box stays
  within `edge_margin` of where the list was made (geometry.edge_candidates, a distance bound), and
  its list alone is refreshed when it moves further. The flags are exactly those of the whole
  table, and the per-step cost depends on how many edges are near an agent, not on the map size.
- Road observation: a pool of the `n_road_pool` nearest map segments per agent, refreshed every
  `refresh_every` steps (an agent at 25 m/s moves 12.5 m in 0.5 s, far less than the pool
  radius), and only computed when an observation is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from geometry import (SEG_PARTS, Z_STRETCH, edge_candidates, edge_parts, gather_rows,
                      pooled_box_edge_distance, relative_pose_cs, road_edge_table, rounded_box_distance)
from scenes import DT, MAP_TYPES, NOW, T, Scenes, apply_local, to_local_xy, wrap_angle


# --------------------------------------------------------------------------------------------
# Dynamics
# --------------------------------------------------------------------------------------------
def bicycle_step(pos, yaw, speed, accel, steer, length, dt: float = DT):
    """Kinematic bicycle with the centre of mass at mid-length (GPUDrive's "classic" model).

    v_bar = v + a dt / 2;  beta = atan(tan(delta) / 2)
    x += v_bar cos(yaw + beta) dt;  y += v_bar sin(yaw + beta) dt
    yaw += v_bar cos(beta) tan(delta) / L dt;  v = max(v + a dt, 0)   (no reversing)
    pos [..., 2], yaw/speed/accel/steer/length [...] -> (pos [..., 2], yaw [...], speed [...])
    """
    v_bar = (speed + 0.5 * accel * dt).clamp(min=0.0)          # [...]
    beta = torch.atan(0.5 * torch.tan(steer))                  # [...]
    heading = yaw + beta                                       # [...]
    step = torch.stack([torch.cos(heading), torch.sin(heading)], -1) * (v_bar * dt).unsqueeze(-1)  # [..., 2]
    new_yaw = yaw + v_bar * torch.cos(beta) * torch.tan(steer) / length.clamp(min=0.5) * dt      # [...]
    return pos + step, wrap_angle(new_yaw), (speed + accel * dt).clamp(min=0.0)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class EnvConfig:
    mode: str = "token"          # token | bicycle | continuous
    at_goal: str = "continue"    # stop (done at the goal, parked: self-play) | continue (see above)
    w_goal: float = 1.0          # reward for reaching the goal (once)
    w_coll: float = 0.75         # penalty per step in collision
    w_off: float = 0.75          # penalty per step off-road
    goal_radius: float = 2.0     # m, goal reached within this distance
    obs_radius: float = 50.0     # m, partners and road points beyond are not observed
    n_partners: int = 16         # nearest partners in the observation
    n_road: int = 64             # nearest road segments in the observation
    edge_margin: float = 4.0     # m, an agent's road-edge candidates are rebuilt beyond this move
    n_road_pool: int = 192       # nearest map segments kept per agent for the road observation
    refresh_every: int = 5       # steps between refreshes of the road observation pool
    accel_grid: tuple = (-4.0, -2.67, -1.33, 0.0, 1.33, 2.67, 4.0)   # m/s^2, bicycle mode
    steer_grid: tuple = tuple(round(-0.5 + i / 12, 4) for i in range(13))  # rad, |delta| <= 0.5


# speed, length, width, type one-hot (3), goal x, goal y, goal dist, collided, offroad, reached
EGO_DIM = 12
PARTNER_DIM = 11    # rel x, rel y, cos dyaw, sin dyaw, rel vx, rel vy, length, width, type one-hot (3)
ROAD_DIM = 4 + 1 + len(MAP_TYPES)  # mid x, mid y, cos, sin, length, type one-hot


class MultiAgentEnv:
    """B worlds x A agents. `reset()` -> obs; `step(actions)` -> (obs, reward [B, A], info)."""

    def __init__(self, scenes: Scenes, cfg: EnvConfig = EnvConfig(), token_table=None,
                 steps_per_token: int = 1):
        if cfg.mode not in ("token", "bicycle", "continuous"):
            raise ValueError(f"EnvConfig.mode must be token, bicycle or continuous, got {cfg.mode!r}")
        if cfg.mode == "token" and token_table is None:
            raise ValueError("token mode needs token_table [3, K, steps_per_token, 3] (tokenizer.table)")
        if cfg.at_goal not in ("stop", "continue"):
            raise ValueError(f"EnvConfig.at_goal must be stop or continue, got {cfg.at_goal!r}")
        self.s, self.cfg = scenes, cfg
        self.device = scenes.device
        self.B, self.A = scenes.pos.shape[:2]
        if token_table is not None:
            self.table = token_table.to(self.device)                   # [3, K, spt, 3]
            self.spt = token_table.shape[2]
            # a parked agent executes its type's zero-motion token (tokenizer: id 0)
            still = self.table.abs().flatten(2).sum(-1) == 0                # [3, K]
            if cfg.mode == "token" and cfg.at_goal == "stop" and not bool(still.any(-1).all()):
                raise ValueError("EnvConfig.at_goal='stop' in token mode needs a zero-motion token of "
                                 "every agent type in token_table (tokenizer: id 0)")
            self.stop_ids = still.float().argmax(-1)                        # [3]
        else:
            self.table, self.spt = None, 1
        self.accel_grid = torch.tensor(cfg.accel_grid, device=self.device)  # [Na]
        self.steer_grid = torch.tensor(cfg.steer_grid, device=self.device)  # [Ns]
        self.edges = road_edge_table(scenes)                         # [B, E, ...] per field
        mid = 0.5 * (scenes.seg_start[..., :2] + scenes.seg_end[..., :2])      # [B, S, 2]
        # [B, S, 2]
        self.seg_mid = torch.where(scenes.seg_valid.unsqueeze(-1), mid, torch.full_like(mid, 1e6))
        d = scenes.seg_end[..., :2] - scenes.seg_start[..., :2]         # [B, S, 2]
        self.seg_len = d.norm(dim=-1)                                   # [B, S]
        self.seg_dir = d / self.seg_len.clamp(min=1e-6).unsqueeze(-1)   # [B, S, 2]
        # what an observation reads of a segment besides its midpoint, gathered once per step:
        # direction (world frame), length / 10, type one-hot
        self.seg_static = torch.cat([self.seg_dir, self.seg_len.unsqueeze(-1) / 10.0,
                                     torch.nn.functional.one_hot(scenes.seg_type, len(MAP_TYPES)).float()],
                                    -1)                                 # [B, S, 3 + len(MAP_TYPES)]
        # a partner's size / [10, 5] and type one-hot, likewise
        self.agent_static = torch.cat([scenes.size[..., :2] / torch.tensor([10.0, 5.0], device=self.device),
                                       torch.nn.functional.one_hot(scenes.agent_type, 3).float()],
                                      -1)                               # [B, A, 5]
        self.parts = edge_parts(self.edges)                                # [B E + 1, ...] per field
        self.has_edge = self.edges["valid"].any(1).repeat_interleave(self.A)  # [B A]
        self.scene_of = torch.arange(self.B, device=self.device).repeat_interleave(self.A)  # [B A]
        # collision prefilter: rounded boxes lie inside the disc of their half diagonal, so a pair
        # can only touch when its centre distance is below the sum of both (+ a float margin)
        L, W = scenes.size[..., 0], scenes.size[..., 1]                           # [B, A]
        half_diag = 0.5 * torch.sqrt(L * L + W * W)                               # [B, A]
        reach = half_diag.unsqueeze(-1) + half_diag.unsqueeze(-2) + 1e-2          # [B, A, A]
        self.reach2 = torch.where(torch.eye(self.A, dtype=torch.bool, device=self.device), -1.0,
                                  reach * reach)
        # bottom corners lie within the half diagonal of the centre: candidates cover edge_margin more
        self.edge_r = half_diag.flatten() + cfg.edge_margin                       # [B A]

    # ---- episode start ---------------------------------------------------------------------
    def reset(self, start_step: int = NOW):
        s = self.s
        self.t = start_step
        self.controlled = s.controlled.clone()                               # [B, A]
        self.traj_pos = s.pos.clone()                                        # [B, A, T, 2]
        self.traj_yaw = s.yaw.clone()                                        # [B, A, T]
        self.traj_valid = s.valid.clone()                                    # [B, A, T]
        # [B, A, T]
        ctrl_future = self.controlled.unsqueeze(-1) & (torch.arange(T, device=self.device) > start_step)
        # controlled agents live to the end
        self.traj_valid = torch.where(ctrl_future, True, self.traj_valid)
        self.pos = s.pos[:, :, start_step].clone()                           # [B, A, 2]
        self.yaw = s.yaw[:, :, start_step].clone()                           # [B, A]
        self.z = s.z[:, :, start_step].clone()                               # [B, A]
        self.speed = s.vel[:, :, start_step].norm(dim=-1)                    # [B, A]
        self.vel = s.vel[:, :, start_step].clone()                           # [B, A, 2]
        # [B, A] sim agents (WOSAC): valid at the start
        self.sim = s.valid[:, :, start_step].clone()
        self.active = self.sim.clone()                                       # [B, A]
        self.goal_reached = torch.zeros_like(self.active)                    # [B, A]
        self.done = torch.zeros_like(self.active)                            # [B, A] parked at the goal
        self.collided = torch.zeros_like(self.active)                        # [B, A] at the last step
        self.offroad = torch.zeros_like(self.active)                         # [B, A] at the last step
        self.ever_collided = torch.zeros_like(self.active)                   # [B, A]
        self.ever_offroad = torch.zeros_like(self.active)                    # [B, A]
        self._refresh_edges()
        self._refresh_road_pool()
        self._events()
        return self.observe()

    # ---- one action ------------------------------------------------------------------------
    def step(self, actions):
        """token mode: actions [B, A] ids, advances steps_per_token steps; bicycle: [B, A] ids
        into the accel x steer grid; continuous: [B, A, 2] (accel, steer). Returns
        (obs, reward [B, A], info) with the reward summed over the steps taken; info["actions"]
        are the ids executed (a done agent's replaced by the zero-motion token in token mode) and
        info["agent_done"] [B, A] the agents done at their goal after this action."""
        if self.t + self.spt > T - 1:
            raise RuntimeError(f"episode over: t={self.t}, no room for {self.spt} more steps")
        L = self.s.size[..., 0]                                              # [B, A]
        hold = self.done.clone()                                             # [B, A] parked for this action
        if self.cfg.mode == "token":
            actions = torch.where(hold, self.stop_ids[self.s.agent_type], actions.long())  # [B, A]
            local = self.table[self.s.agent_type, actions.long()]           # [B, A, spt, 3]
            pose = torch.cat([self.pos, self.yaw.unsqueeze(-1)], -1)         # [B, A, 3]
            poses = apply_local(pose, local)                                 # [B, A, spt, 3]
        reward = torch.zeros(self.B, self.A, device=self.device)             # [B, A]
        for k in range(self.spt):
            if self.cfg.mode == "token":
                new_pos, new_yaw = poses[:, :, k, :2], poses[:, :, k, 2]     # [B, A, 2], [B, A]
            else:
                if self.cfg.mode == "bicycle":
                    n_steer = self.steer_grid.numel()
                    accel = self.accel_grid[actions.long() // n_steer]       # [B, A]
                    steer = self.steer_grid[actions.long() % n_steer]        # [B, A]
                else:
                    accel, steer = actions[..., 0], actions[..., 1]          # [B, A]
                new_pos, new_yaw, new_speed = bicycle_step(self.pos, self.yaw, self.speed, accel, steer, L)
                new_speed = torch.where(hold, torch.zeros_like(new_speed), new_speed)
            reward = reward + self._advance(new_pos, new_yaw, None if self.cfg.mode == "token" else new_speed,
                                            hold)
        info = dict(collided=self.collided, offroad=self.offroad, goal_reached=self.goal_reached,
                    agent_done=self.done, actions=actions, done=self.t >= T - 1)
        return self.observe(), reward, info

    def _advance(self, new_pos, new_yaw, new_speed=None, hold=None):
        """Move controlled agents to their new pose (agents in `hold` [B, A] keep theirs exactly),
        replay the log for the others, score events; agents done before this step earn nothing.
        new_speed: the bicycle's speed state; in token mode speed is the displacement rate."""
        t = self.t + 1
        s, ctrl = self.s, self.controlled
        if hold is not None:
            new_pos = torch.where(hold.unsqueeze(-1), self.pos, new_pos)     # [B, A, 2]
            new_yaw = torch.where(hold, self.yaw, new_yaw)                   # [B, A]
        was_done = self.done.clone()                                         # [B, A]
        log_pos, log_yaw = s.pos[:, :, t], s.yaw[:, :, t]                    # [B, A, 2], [B, A]
        pos = torch.where(ctrl.unsqueeze(-1), new_pos, log_pos)              # [B, A, 2]
        self.vel = (pos - self.pos) / DT                                     # [B, A, 2]
        self.speed = self.vel.norm(dim=-1)                                   # [B, A]
        if new_speed is not None:
            self.speed = torch.where(ctrl, new_speed, self.speed)
        self.z = torch.where(ctrl, self.z, s.z[:, :, t])                     # [B, A]
        self.pos, self.yaw, self.t = pos, torch.where(ctrl, new_yaw, log_yaw), t
        # objects absent at the start are absent from the whole episode, as in the metric's scenes
        was_active, self.active = self.active, (ctrl | s.valid[:, :, t]) & self.sim  # [B, A]
        self.traj_pos[:, :, t] = self.pos
        self.traj_yaw[:, :, t] = self.yaw
        # a replayed agent reappearing after a gap in its log may be far from its stale road pool
        if self.t % self.cfg.refresh_every == 0 or bool((self.active & ~was_active).any()):
            self._refresh_road_pool()
        newly = self._events()
        cfg = self.cfg
        # [B, A]
        r = cfg.w_goal * newly.float() - cfg.w_coll * self.collided.float() - cfg.w_off * self.offroad.float()
        return torch.where(ctrl & ~was_done, r, torch.zeros_like(r))

    # ---- events ----------------------------------------------------------------------------
    def _events(self):
        """Collision, off-road and goal flags at the current step; returns newly reached goals."""
        s, act = self.s, self.active
        self.collided = self._collisions()                                   # [B, A]
        at = self._edge_anchor()                                             # [B A, 3]
        # [B A]; an agent absent at the start is never active (its list stays empty)
        moved = (((at - self.edge_at) ** 2).sum(-1) > self.cfg.edge_margin ** 2) & self.sim.view(-1)
        rows = moved.nonzero().squeeze(1)                                    # [n] agents to refresh
        if rows.numel():
            self._refresh_edges(rows)
        d_road = pooled_box_edge_distance(self.pos.view(-1, 2), self.z.view(-1), self.yaw.view(-1),
                                          s.size.view(-1, 3), self.edge_pool, self.edge_ids, self.parts,
                                          self.has_edge).view(self.B, self.A)  # [B, A]
        self.offroad = (d_road > 0.0) & act                                  # [B, A]
        self.ever_collided |= self.collided
        self.ever_offroad |= self.offroad
        reached = ((self.pos - s.goal).norm(dim=-1) < self.cfg.goal_radius) & act  # [B, A]
        newly = reached & ~self.goal_reached                                 # [B, A]
        self.goal_reached |= reached
        if self.cfg.at_goal == "stop":
            self.done = self.goal_reached & self.controlled                  # [B, A]
        return newly

    def _collisions(self):
        """collided[b, i] = min_j d_ij < 0 over active j != i, with d the metric's rounded-box
        distance (geometry.object_distance_matrix), measured only for the pairs whose centres are
        within the sum of both half diagonals: every other pair has d_ij >= c - R_i - R_j > 0.
        The same formula on the same per-agent cos / sin, so the flags equal the full matrix's."""
        act, size = self.active, self.s.size
        x, y = self.pos[..., 0], self.pos[..., 1]                            # [B, A]
        d2 = x.unsqueeze(-2) - x.unsqueeze(-1)                               # [B, A, A] dx, then dx^2 + dy^2
        dy = y.unsqueeze(-2) - y.unsqueeze(-1)                               # [B, A, A]
        d2.mul_(d2).add_(dy.mul_(dy))
        b, i, j = (d2 < self.reach2).nonzero(as_tuple=True)                  # [Np] pairs within reach
        fi, fj = b * self.A + i, b * self.A + j                              # [Np] flat agent ids
        live = act.view(-1)                                                  # [B A]
        both = live.index_select(0, fi) & live.index_select(0, fj)           # [Np]
        fi, fj = fi[both], fj[both]                                          # [Np'] active pairs only
        # per agent once: x, y, cos, sin, length, width; then one gather per side of the pairs
        per = torch.stack([x, y, torch.cos(self.yaw), torch.sin(self.yaw), size[..., 0], size[..., 1]],
                          -1).view(-1, 6)                                    # [B A, 6]
        xi, yi, ci, si, li, wi = per.index_select(0, fi).unbind(1)           # [Np'] each
        xj, yj, cj, sj, lj, wj = per.index_select(0, fj).unbind(1)           # [Np'] each
        xr, yr, cd, sd = relative_pose_cs(xi, yi, ci, si, xj, yj, cj, sj)    # [Np']
        d = rounded_box_distance(xr, yr, cd, sd, li, wi, lj, wj)             # [Np']
        hit = torch.zeros(self.B * self.A, dtype=torch.bool, device=self.device)  # [B A]
        hit[fi[d < 0.0]] = True
        return hit.view(self.B, self.A) & act

    def _edge_anchor(self):
        """Where each agent's bottom corners are centred, z stretched as the edge selection sees it."""
        zb = Z_STRETCH * (self.z - 0.5 * self.s.size[..., 2])                # [B, A]
        return torch.stack([self.pos[..., 0], self.pos[..., 1], zb], -1).view(-1, 3)  # [B A, 3]

    def _refresh_edges(self, rows=None):
        """Road-edge candidates of every agent (rows None) or of the agents `rows` [n] (flat B A)."""
        at = self._edge_anchor()                                             # [B A, 3]
        E = self.edges["valid"].shape[1]
        if rows is None:
            self.edge_at = at                                                # [B A, 3]
            self.edge_ids, ok = edge_candidates(at[:, 0], at[:, 1], at[:, 2], self.edge_r, self.parts,
                                                self.scene_of, E, present=self.sim.view(-1))  # [B A, C]
        else:
            at = at.index_select(0, rows)                                    # [n, 3]
            C = self.edge_ids.shape[1]
            ids, ok_n = edge_candidates(at[:, 0], at[:, 1], at[:, 2], self.edge_r.index_select(0, rows),
                                        self.parts, self.scene_of.index_select(0, rows), E, C)  # [n, C']
            self.edge_at.index_copy_(0, rows, at)
            if ids.shape[1] == C:  # the usual case: only these agents' lists change
                self.edge_ids.index_copy_(0, rows, ids)
                self.edge_pool["ok"].index_copy_(0, rows, ok_n)
                for k in SEG_PARTS:
                    self.edge_pool[k].index_copy_(0, rows, self.parts[k][ids])  # [n, C] into [B A, C]
                return
            pad = ids.shape[1] - C                                           # the lists grow, never shrink
            dummy = self.parts["valid"].shape[0] - 1
            self.edge_ids = torch.nn.functional.pad(self.edge_ids, (0, pad), value=dummy)  # [B A, C']
            ok = torch.nn.functional.pad(self.edge_pool["ok"], (0, pad), value=False)  # [B A, C']
            self.edge_ids.index_copy_(0, rows, ids)
            ok.index_copy_(0, rows, ok_n)
        # the candidates' parts, gathered once per refresh, not per step
        self.edge_pool = {k: self.parts[k][self.edge_ids] for k in SEG_PARTS}  # [B A, C] per part
        self.edge_pool["ok"] = ok

    def _refresh_road_pool(self):
        """Nearest map segments per agent (observations), from the positions now; the search itself
        waits for the next observe(), as an events-only rollout never needs it."""
        self._road_from = self.pos.clone()                                   # [B, A, 2]

    def _road_pool(self):
        if self._road_from is not None:
            n_r = min(self.cfg.n_road_pool, self.seg_mid.shape[1])
            d_r = torch.cdist(self._road_from, self.seg_mid)                 # [B, A, S]
            self.road_idx = d_r.topk(n_r, dim=-1, largest=False).indices     # [B, A, C]
            self._road_from = None
        return self.road_idx

    # ---- observations ----------------------------------------------------------------------
    def observe(self):
        """Ego-centric, normalised observations for a decentralized policy (no history).

        ego [B, A, EGO_DIM]; partners [B, A, n_partners, PARTNER_DIM] + mask; road
        [B, A, n_road, ROAD_DIM] + mask. Everything is in the agent's own frame.
        """
        s, cfg = self.s, self.cfg
        B, A = self.B, self.A
        goal_ego = to_local_xy(s.goal.unsqueeze(-2), self.pos, self.yaw).squeeze(-2)   # [B, A, 2]
        goal_dist = goal_ego.norm(dim=-1, keepdim=True)                           # [B, A, 1]
        goal_ego = goal_ego / goal_dist.clamp(min=1.0) * goal_dist.clamp(max=100.0) / 100.0  # [B, A, 2]
        type1h = torch.nn.functional.one_hot(s.agent_type, 3).float()             # [B, A, 3]
        ego = torch.cat([self.speed.unsqueeze(-1) / 30.0,
                         s.size[..., :2] / torch.tensor([10.0, 5.0], device=self.device),
                         type1h, goal_ego, goal_dist.clamp(max=100.0) / 100.0,
                         self.collided.unsqueeze(-1).float(), self.offroad.unsqueeze(-1).float(),
                         self.goal_reached.unsqueeze(-1).float()], -1)            # [B, A, EGO_DIM]

        # partners: nearest active agents within obs_radius
        dist = torch.cdist(self.pos, self.pos)                                    # [B, A, A]
        ok = self.active.unsqueeze(1) & self.active.unsqueeze(2) & (dist < cfg.obs_radius)  # [B, A, A]
        ok &= ~torch.eye(A, dtype=torch.bool, device=self.device)
        n_p = min(cfg.n_partners, A)
        # [B, A, P]
        d_sel, j = torch.where(ok, dist, torch.full_like(dist, 1e9)).topk(n_p, dim=-1, largest=False)
        p_mask = d_sel < 1e8                                                      # [B, A, P]
        # every partner read in one gather: x, y, yaw, vx, vy, then the static size / type block
        other = gather_rows(torch.cat([self.pos, self.yaw.unsqueeze(-1), self.vel, self.agent_static], -1),
                            j)                                                    # [B, A, P, 10]
        rel = to_local_xy(other[..., 0:2], self.pos, self.yaw)                    # [B, A, P, 2]
        dyaw = other[..., 2] - self.yaw.unsqueeze(-1)                             # [B, A, P]
        rel_v = to_local_xy(other[..., 3:5], torch.zeros_like(self.pos), self.yaw) - to_local_xy(
            self.vel.unsqueeze(-2), torch.zeros_like(self.pos), self.yaw)          # [B, A, P, 2]
        partners = torch.cat([rel / cfg.obs_radius, torch.cos(dyaw).unsqueeze(-1),
                              torch.sin(dyaw).unsqueeze(-1), rel_v / 30.0,
                              other[..., 5:]], -1)                                # [B, A, P, PARTNER_DIM]
        partners = partners * p_mask.unsqueeze(-1)
        pad = cfg.n_partners - n_p   # fixed width, whatever A is, so one policy fits every scene
        # [B, A, n_partners, PARTNER_DIM]
        partners = torch.nn.functional.pad(partners, (0, 0, 0, pad))
        p_mask = torch.nn.functional.pad(p_mask, (0, pad))                     # [B, A, n_partners]

        # road: nearest map segments within obs_radius, chosen from the per-agent pool
        road_idx = self._road_pool()                                              # [B, A, C]
        mid = gather_rows(self.seg_mid, road_idx)                               # [B, A, C, 2]
        rel_mid = to_local_xy(mid, self.pos, self.yaw)                                 # [B, A, C, 2]
        d_mid = rel_mid.norm(dim=-1)                                              # [B, A, C]
        n_r = min(cfg.n_road, d_mid.shape[-1])
        d_sel, c = d_mid.topk(n_r, dim=-1, largest=False)                         # [B, A, R]
        r_mask = d_sel < cfg.obs_radius                                           # [B, A, R]
        seg = torch.gather(road_idx, 2, c)                                   # [B, A, R]
        rel_mid = torch.gather(rel_mid, 2, c.unsqueeze(-1).expand(-1, -1, -1, 2))  # [B, A, R, 2]
        static = gather_rows(self.seg_static, seg)                                # [B, A, R, 3 + types]
        dir_ego = to_local_xy(static[..., 0:2], torch.zeros_like(self.pos), self.yaw)  # [B, A, R, 2]
        road = torch.cat([rel_mid / cfg.obs_radius, dir_ego, static[..., 2:]], -1)  # [B, A, R, ROAD_DIM]
        road = road * r_mask.unsqueeze(-1)
        pad = cfg.n_road - n_r
        road = torch.nn.functional.pad(road, (0, 0, 0, pad))                   # [B, A, n_road, ROAD_DIM]
        r_mask = torch.nn.functional.pad(r_mask, (0, pad))                     # [B, A, n_road]
        return dict(ego=ego, partners=partners, partner_mask=p_mask, road=road, road_mask=r_mask)

    # ---- what the metrics need ---------------------------------------------------------------
    def rollout_future(self):
        """The executed future for wosac_metrics.score_rollouts: pos [B, A, 80, 2], z [B, A, 80],
        yaw [B, A, 80].
        z is frozen at its step-10 value (the toy world is flat; WOSAC only uses z for ADE)."""
        z = self.s.z[:, :, NOW:NOW + 1].expand(-1, -1, T - NOW - 1)               # [B, A, 80]
        return self.traj_pos[:, :, NOW + 1:], z, self.traj_yaw[:, :, NOW + 1:]
