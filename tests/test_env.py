"""The simulator: dynamics, token execution, events, rewards, observations (hand-built scenes)."""
import math

import numpy as np
import pytest
import torch

import geometry
from env import EGO_DIM, PARTNER_DIM, ROAD_DIM, EnvConfig, MultiAgentEnv, bicycle_step
from scenes import LANE, ROAD_EDGE, T, collate, polylines_to_segments, scene_from_numpy


def straight_road_scene(agents_xyv, yaw=None, controlled=None, length=4.5, width=2.0, name="road"):
    """A 200 m straight road, y in [-6, 6], edges oriented with the road on their left.
    agents_xyv: list of (x, y, vx) at step 0, driving at constant velocity in the log."""
    xs = np.linspace(-100, 100, 101)
    # walking +x the road (+y) is on the left of `lower`; walking -x the road (-y) is on the left of `upper`
    lower = np.stack([xs, np.full_like(xs, -6.0), np.zeros_like(xs)], 1)         # [101, 3]
    upper = np.stack([xs[::-1], np.full_like(xs, 6.0), np.zeros_like(xs)], 1)    # [101, 3]
    lane = np.stack([xs, np.full_like(xs, -1.75), np.zeros_like(xs)], 1)
    seg = polylines_to_segments([lower, upper, lane], [ROAD_EDGE, ROAD_EDGE, LANE], [15, 15, 2])
    A = len(agents_xyv)
    t = np.arange(T) * 0.1
    pos = np.zeros((A, T, 2), np.float32)
    vel = np.zeros((A, T, 2), np.float32)
    for i, (x, y, vx) in enumerate(agents_xyv):
        pos[i, :, 0], pos[i, :, 1], vel[i, :, 0] = x + vx * t, y, vx
    agents = dict(pos=pos, z=np.zeros((A, T)), yaw=np.zeros((A, T)) if yaw is None else yaw, vel=vel,
                  valid=np.ones((A, T), bool), size=np.tile([length, width, 1.5], (A, 1)),
                  agent_type=np.zeros(A, np.int64),
                  controlled=np.ones(A, bool) if controlled is None else np.asarray(controlled),
                  eval_mask=np.ones(A, bool))
    return scene_from_numpy(name, agents, seg)


def straight_table(K=5, spt=2):
    """A tiny token table: token k moves k m/s forward (token 0 = zero motion), per type."""
    v = torch.arange(K, dtype=torch.float32)                                       # [K]
    steps = torch.arange(1, spt + 1, dtype=torch.float32) * 0.1                     # [spt]
    local = torch.zeros(K, spt, 3)
    local[..., 0] = v[:, None] * steps[None]
    return local.unsqueeze(0).repeat(3, 1, 1, 1)                                    # [3, K, spt, 3]


def test_bicycle_straight_and_turning():
    pos, yaw, speed = torch.zeros(1, 2), torch.zeros(1), torch.full((1,), 10.0)
    p, y, v = bicycle_step(pos, yaw, speed, torch.zeros(1), torch.zeros(1), torch.full((1,), 4.0))
    assert torch.allclose(p, torch.tensor([[1.0, 0.0]])) and y.item() == 0 and v.item() == 10
    p, y, v = bicycle_step(pos, yaw, speed, torch.full((1,), 2.0), torch.full((1,), 0.2),
                           torch.full((1,), 4.0))
    assert y.item() > 0 and p[0, 1] > 0 and math.isclose(v.item(), 10.2, rel_tol=1e-6)
    # no reversing
    _, _, v = bicycle_step(pos, yaw, torch.full((1,), 0.1), torch.full((1,), -6.0), torch.zeros(1),
                           torch.full((1,), 4.0))
    assert v.item() == 0.0



def test_token_mode_executes_token_exactly_and_replays_uncontrolled():
    scene = straight_road_scene([(-50, -1.75, 10.0), (-20, -1.75, 5.0)], controlled=[True, False])
    env = MultiAgentEnv(scene, EnvConfig(mode="token"), token_table=straight_table())
    env.reset()
    x0 = env.pos[0, 0, 0].item()
    for n in range(40):
        env.step(torch.tensor([[3, 0]]))
    assert env.t == T - 1
    # 3 m/s for 8 s
    assert math.isclose(env.pos[0, 0, 0].item() - x0, 24.0, abs_tol=1e-3)
    # the uncontrolled agent replays its log exactly, whatever action it was given
    assert torch.equal(env.traj_pos[0, 1], scene.pos[0, 1])
    fut_pos, fut_z, fut_yaw = env.rollout_future()
    assert fut_pos.shape == (1, 2, 80, 2) and fut_z.shape == (1, 2, 80) and fut_yaw.shape == (1, 2, 80)
    with pytest.raises(RuntimeError):
        env.step(torch.tensor([[3, 0]]))


def test_collision_offroad_and_goal_rewards():
    cfg = EnvConfig(mode="token", w_goal=1.0, w_coll=0.75, w_off=0.75)
    # agent 0 stands still, agent 1 (controlled) drives into it; log: both static
    scene = straight_road_scene([(0, -1.75, 0.0), (-10, -1.75, 0.0)])
    env = MultiAgentEnv(scene, cfg, token_table=straight_table(K=12))
    env.reset()
    total = torch.zeros(1, 2)
    hit = False
    for n in range(10):
        _, r, info = env.step(torch.tensor([[0, 11]]))
        total += r
        hit |= bool(info["collided"][0, 1])
    assert hit, "driving 11 m/s into a standing car must collide"
    assert total[0, 1] < -0.7 and total[0, 0] < -0.7  # both are penalised while in contact
    # the env's collision flag is exactly the metric's rounded-box distance < 0
    d = geometry.object_distance_matrix(env.pos, env.yaw, scene.size[..., 0], scene.size[..., 1], env.active)
    assert torch.equal(env.collided, (d.min(-1).values < 0) & env.active)

    # off-road: drive sideways out of the road with a token that moves +y
    table = straight_table()
    table[:, 4, :, 0], table[:, 4, :, 1] = 0.0, torch.tensor([0.5, 1.0])
    scene = straight_road_scene([(0, 3.0, 0.0)])
    env = MultiAgentEnv(scene, cfg, token_table=table)
    env.reset()
    flags = []
    for n in range(4):
        _, r, info = env.step(torch.tensor([[4]]))
        flags.append(bool(info["offroad"][0, 0]))
        full = geometry.box_road_edge_distance(env.pos, env.z, env.yaw, scene.size,
                                               geometry.road_edge_table(scene))
        assert bool(info["offroad"][0, 0]) == bool(full[0, 0] > 0)
    assert flags[0] is False and flags[-1] is True  # starts on the road, ends beyond y = 6

    # goal: the goal is the log's last position; driving there pays w_goal once
    scene = straight_road_scene([(0, -1.75, 1.0)])   # goal at x = 9
    env = MultiAgentEnv(scene, cfg, token_table=straight_table())
    env.reset()
    rewards = torch.stack([env.step(torch.tensor([[1]]))[1][0, 0] for _ in range(40)])
    assert rewards.sum().item() == pytest.approx(1.0) and (rewards > 0).sum() == 1


def goal_scene_rollout(at_goal: str):
    """Agent 0 (controlled, from x = 1 at step 10, goal x = 9) drives 1 m per token toward a car
    standing at x = 15; agent 2 (controlled, goal far ahead) follows from x = -7 at 1.2 m per token
    and runs into agent 0 once it has stopped."""
    scene = straight_road_scene([(0, -1.75, 1.0), (15, -1.75, 0.0), (-10, -1.75, 3.0)],
                                controlled=[True, False, True])
    env = MultiAgentEnv(scene, EnvConfig(mode="token", at_goal=at_goal), token_table=straight_table(K=12))
    env.reset()
    out = dict(r=[], done=[], collided=[], ids=[])
    for n in range(40):
        _, r, info = env.step(torch.tensor([[5, 0, 6]]))
        for k, v in (("r", r), ("done", info["agent_done"]), ("collided", info["collided"]),
                     ("ids", info["actions"])):
            out[k].append(v[0].clone())
    return env, {k: torch.stack(v) for k, v in out.items()}                      # [40, A]


def test_agent_done_at_its_goal_is_parked_and_earns_nothing_after_it():
    """GPUDrive's setting (SPACeR trains in it): the agent that reaches its goal is done. Before the
    fix it drove on past its goal into the standing car and collected collision penalties; now it is
    paid w_goal once, parks (holding its pose exactly, executing the zero-motion token, still
    recorded at every step) and earns nothing after, even when another agent runs into it."""
    env, out = goal_scene_rollout("stop")
    first = int(out["done"][:, 0].float().argmax())                              # the action that reached it
    assert 6 <= first <= 8 and bool(out["done"][first:, 0].all()) and not bool(out["done"][:first, 0].any())
    assert out["r"][first, 0].item() == pytest.approx(1.0)
    assert torch.equal(out["r"][first + 1:, 0], torch.zeros(40 - first - 1))     # nothing after the goal
    assert bool(out["collided"][first + 1:, 0].any()), "agent 2 must run into the parked agent 0"
    assert out["r"][:, 2].min().item() < 0                                       # ... and pay for it
    assert bool((out["ids"][first + 1:, 0] == 0).all()) and bool((out["ids"][:first + 1, 0] == 5).all())
    pos, _, _ = env.rollout_future()                                             # [1, A, 80, 2]
    t_park = 2 * (first + 1)                                                     # future index: last move
    assert torch.equal(pos[0, 0, t_park:], pos[0, 0, t_park - 1:t_park].expand(80 - t_park, 2))
    assert (pos[0, 0, -1] - env.s.goal[0, 0]).norm().item() < 2.0
    assert not bool(out["done"][:, 1].any())                                     # log replay is never done
    # "continue" (the human driver's setting): the same agent drives on and pays penalties
    env, out = goal_scene_rollout("continue")
    assert not bool(out["done"].any()) and out["r"][:, 0].sum().item() < 1.0 - 0.7
    with pytest.raises(ValueError, match="at_goal must be stop or continue"):
        MultiAgentEnv(env.s, EnvConfig(at_goal="park"), token_table=straight_table())
    no_zero = straight_table() + 0.1                                             # no zero-motion token
    with pytest.raises(ValueError, match="zero-motion token"):
        MultiAgentEnv(env.s, EnvConfig(at_goal="stop"), token_table=no_zero)


def test_offroad_with_pools_matches_full_metric_on_a_long_drive():
    """The per-agent edge candidates (rebuilt after each 1 m move) must give the same flags as all edges."""
    cfg = EnvConfig(mode="bicycle", edge_margin=1.0, refresh_every=5)
    scene = straight_road_scene([(-90, -1.75, 20.0), (-60, 2.0, 15.0)])
    env = MultiAgentEnv(scene, cfg)
    env.reset()
    table = geometry.road_edge_table(scene)
    g = torch.Generator().manual_seed(0)
    n_act = len(cfg.accel_grid) * len(cfg.steer_grid)
    for _ in range(80):
        _, _, info = env.step(torch.randint(0, n_act, (1, 2), generator=g))
        full = geometry.box_road_edge_distance(env.pos, env.z, env.yaw, scene.size, table) > 0
        assert torch.equal(info["offroad"], full & env.active)


def test_observations_are_ego_centric_and_masked():
    # agent 1 is 20 m ahead, agent 2 is 80 m ahead (beyond the 50 m radius)
    scene = straight_road_scene([(0, -1.75, 5.0), (20, -1.75, 5.0), (80, -1.75, 5.0)])
    env = MultiAgentEnv(scene, EnvConfig(mode="token", n_partners=4, n_road=16), token_table=straight_table())
    obs = env.reset()
    assert obs["ego"].shape == (1, 3, EGO_DIM)
    assert obs["partners"].shape == (1, 3, 4, PARTNER_DIM)  # fixed width, padded
    assert obs["road"].shape == (1, 3, 16, ROAD_DIM)
    ego0 = obs["partners"][0, 0]
    assert obs["partner_mask"][0, 0].tolist() == [True, False, False, False]
    assert ego0[0, 0].item() == pytest.approx(20 / 50) and abs(ego0[0, 1].item()) < 1e-6
    assert (obs["partners"][0, 0, 1] == 0).all()
    # speed feature and normalisation stay in a sane range
    assert obs["ego"][0, 0, 0].item() == pytest.approx(5 / 30, rel=1e-4)
    assert obs["ego"].abs().max() <= 1.5 and obs["road"].abs().max() <= 1.5


def test_batched_worlds_are_independent():
    a = straight_road_scene([(0, -1.75, 5.0), (20, -1.75, 5.0)], name="a")
    b = straight_road_scene([(-30, -1.75, 8.0)], name="b")
    both = collate([a, b])
    table = straight_table()
    env = MultiAgentEnv(both, EnvConfig(), token_table=table)
    env.reset()
    env_a = MultiAgentEnv(a, EnvConfig(), token_table=table)
    env_a.reset()
    for _ in range(10):
        env.step(torch.tensor([[2, 3], [4, 1]]))
        env_a.step(torch.tensor([[2, 3]]))
    assert torch.allclose(env.traj_pos[0], env_a.traj_pos[0])
    assert not env.active[1, 1]  # padding agent never becomes active


