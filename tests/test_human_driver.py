"""The toy human driver (human_driver.py): stochastic but true to the logs it wrote, and the
behaviours its docstring promises on hand-built scenes (IDM following, yielding, lane changes)."""
import numpy as np
import pytest
import torch

from conftest import min_box_distance
from env import bicycle_step
from human_driver import HumanDriver
from scenes import (EDGE_CODE, LANE, NOW, ROAD_EDGE, SURFACE_STREET_LANE, T, polylines_to_segments,
                    scene_from_numpy)
from toy_scenes import ToyConfig, make_toy_scenes


@pytest.fixture(scope="module")
def toy():
    return make_toy_scenes(len(ToyConfig().layouts), seed=1)   # one scene per layout


def drive(scenes, seed, start=NOW, steps=T - 1 - NOW, active=None):
    """Closed-loop driver rollout from the log at `start`: pos [B, A, steps+1, 2], yaw, speed
    [B, A, steps+1]."""
    drv = HumanDriver(scenes, generator=torch.Generator().manual_seed(seed))
    pos, yaw = scenes.pos[:, :, start].clone(), scenes.yaw[:, :, start].clone()
    speed = scenes.vel[:, :, start].norm(dim=-1)
    active = scenes.valid[:, :, start] if active is None else active
    P, Y, V = [pos], [yaw], [speed]
    for t in range(start, start + steps):
        accel, steer = drv.act(pos, yaw, speed, active, t)
        pos, yaw, speed = bicycle_step(pos, yaw, speed, accel, steer, scenes.size[..., 0])
        P.append(pos), Y.append(yaw), V.append(speed)
    return torch.stack(P, 2), torch.stack(Y, 2), torch.stack(V, 2)


def test_driver_is_stochastic_but_true_to_the_log(toy):
    p1, y1, v1 = drive(toy, seed=1)
    p1b, _, _ = drive(toy, seed=1)
    p2, y2, v2 = drive(toy, seed=2)
    real = toy.valid[:, :, NOW]
    assert torch.equal(p1, p1b)                                           # same seed, same rollout
    assert (p1[:, :, -1] - p2[:, :, -1]).norm(dim=-1)[real].max() > 0.5  # other seed, other rollout
    log_speed = toy.vel[:, :, NOW:].norm(dim=-1)[real].mean()
    for p, y, v in ((p1, y1, v1), (p2, y2, v2)):
        assert abs(v[real].mean() - log_speed) < 0.1 * log_speed
        ade = (p - toy.pos[:, :, NOW:]).norm(dim=-1)[real].mean()
        assert ade < 3.0
        assert (min_box_distance(toy, p, y)[real] > 0).float().mean() > 0.97


def straight_scene(agents, lane_ys=(0.0,)):
    """A hand-built scene on a straight road along x with eastbound lanes at lane_ys and road edges
    6 m beyond them; agents are dicts with route [P, 2], pos, yaw, speed, size, type, style.
    Every step holds the start (drive() starts from step NOW)."""
    xs = np.linspace(-100.0, 300.0, 201)
    flat = lambda y, x=xs: np.stack([x, np.full_like(x, y), np.zeros_like(x)], 1)  # [P, 3]
    polys = [flat(y) for y in lane_ys] + [flat(min(lane_ys) - 6.0), flat(max(lane_ys) + 6.0, xs[::-1])]
    types = [LANE] * len(lane_ys) + [ROAD_EDGE] * 2
    segs = polylines_to_segments(polys, types, [SURFACE_STREET_LANE] * len(lane_ys) + [EDGE_CODE] * 2)
    A = len(agents)
    P = max(len(a["route"]) for a in agents)
    route, rv = np.zeros((A, P, 2)), np.zeros((A, P), bool)
    for k, a in enumerate(agents):
        route[k, :len(a["route"])], rv[k, :len(a["route"])] = a["route"], True
    pos = np.stack([a["pos"] for a in agents])                             # [A, 2]
    yaw = np.array([a["yaw"] for a in agents])                             # [A]
    vel = np.stack([np.cos(yaw), np.sin(yaw)], 1) * np.array([a["speed"] for a in agents])[:, None]  # [A, 2]
    ag = dict(pos=np.repeat(pos[:, None], T, 1), z=np.zeros((A, T)), yaw=np.repeat(yaw[:, None], T, 1),
              vel=np.repeat(vel[:, None], T, 1), valid=np.ones((A, T), bool),
              size=np.array([a["size"] for a in agents]), agent_type=np.array([a["type"] for a in agents]),
              controlled=np.ones(A, bool), eval_mask=np.ones(A, bool))
    style = np.array([a["style"] for a in agents])                         # [A, 4]
    return scene_from_numpy("hand", ag, segs, route=route, route_valid=rv, style=style)


def line(a, b, step=1.0):
    n = int(np.ceil(np.hypot(b[0] - a[0], b[1] - a[1]) / step))
    return np.linspace(a, b, n + 1)


CAR = dict(size=[4.5, 2.0, 1.5], type=0)
PED = dict(size=[0.8, 0.8, 1.7], type=1)


def test_idm_follower_stops_behind_a_stopped_leader():
    route = line((-60.0, 0.0), (200.0, 0.0))
    leader = dict(CAR, route=route, pos=np.array([50.0, 0.0]), yaw=0.0, speed=0.0,
                  style=[0.01, 1.5, 2.0, 2.0])
    follower = dict(CAR, route=route, pos=np.array([-40.0, 0.0]), yaw=0.0, speed=12.0,
                    style=[12.0, 1.5, 2.0, 2.0])
    sc = straight_scene([leader, follower])
    pos, yaw, speed = drive(sc, seed=0, steps=200)
    gap = pos[0, 0, :, 0] - pos[0, 1, :, 0] - 4.5                         # bumper to bumper
    assert speed[0, 1, -1] < 0.2 and (pos[0, 0, -1, 0] - 50.0).abs() < 0.5
    assert 1.0 < gap[-1] < 4.0                                            # stopped about s0 = 2 m behind
    assert (min_box_distance(sc, pos, yaw)[0] > 0.5).all()
    assert pos[0, 1, :, 1].abs().max() < 0.3                              # and kept its lane


def crossing(ped_wait_x, car_start_x, car_speed):
    """A pedestrian about to cross a one-lane road at x = 0 from y = -5, and a car coming along x."""
    ped_route = np.concatenate([line((ped_wait_x, -5.0), (0.0, -5.0))[:-1], line((0.0, -5.0), (0.0, 8.0)),
                                line((0.0, 8.0), (10.0, 8.0))[1:]])
    ped = dict(PED, route=ped_route, pos=np.array([ped_wait_x + 1.0, -5.0]), yaw=0.0, speed=1.3,
               style=[1.3, 0.8, 0.5, 1.5])
    car = dict(CAR, route=line((car_start_x - 10.0, 0.0), (150.0, 0.0)), pos=np.array([car_start_x, 0.0]),
               yaw=0.0, speed=car_speed, style=[car_speed, 1.5, 2.0, 2.5])
    sc = straight_scene([ped, car])
    pos, yaw, speed = drive(sc, seed=0, steps=150)
    ped_in_lane = (pos[0, 0, :, 1].abs() < 2.0).nonzero()[:, 0]           # steps the pedestrian is in lane
    car_past = (pos[0, 1, :, 0] > 4.0).nonzero()[:, 0]                    # steps the car's rear is past x = 0
    return pos, yaw, speed, sc, ped_in_lane, car_past


def test_vehicle_yields_to_pedestrian_on_crosswalk():
    # the car is 45 m away at 10 m/s: it can stop, so the pedestrian has priority
    pos, yaw, speed, sc, ped_in, car_past = crossing(-4.0, -45.0, 10.0)
    assert len(ped_in) > 0 and len(car_past) > 0
    assert ped_in[-1] < car_past[0]                                       # the pedestrian crossed first
    assert speed[0, 1].min() < 2.0                                        # the car (nearly) stopped for it
    assert (min_box_distance(sc, pos, yaw)[0] > 0.5).all()


def test_pedestrian_waits_for_vehicle_that_cannot_stop():
    # the car is 12 m away at 12 m/s: it cannot stop, so the pedestrian waits at the kerb
    pos, yaw, speed, sc, ped_in, car_past = crossing(-2.0, -12.0, 12.0)
    assert len(ped_in) > 0 and len(car_past) > 0
    assert ped_in[0] > car_past[0]                                        # the car passed first
    assert speed[0, 1].min() > 8.0                                        # without braking hard
    assert (min_box_distance(sc, pos, yaw)[0] > 0.5).all()


def test_vehicle_changes_lane_to_pass_a_slow_cyclist():
    # two eastbound lanes, y = 0 (the car's route) and y = 3.6; a cyclist at 4 m/s 30 m ahead
    route = line((-60.0, 0.0), (300.0, 0.0))
    car = dict(CAR, route=route, pos=np.array([-30.0, 0.0]), yaw=0.0, speed=10.0, style=[12.0, 1.2, 2.0, 2.0])
    bike = dict(size=[1.8, 0.7, 1.7], type=2, route=route - np.array([0.0, 0.5]), pos=np.array([0.0, -0.5]),
                yaw=0.0, speed=4.0, style=[4.0, 1.5, 1.5, 2.0])
    runs = straight_scene([car, bike], lane_ys=(0.0, 3.6)).repeat(8)      # 8 noise samples
    pos, yaw, speed = drive(runs, seed=0, steps=150)
    y = pos[:, 0, :, 1]                                                   # [8, steps] the car's lateral pos
    changed = y.amax(-1) > 3.0
    assert changed.sum() >= 6                                             # most overtake in the left lane
    assert (pos[:, 0, -1, 0] > pos[:, 1, -1, 0] + 5.0).sum() >= 5         # and pass the cyclist within 15 s
    assert (y.amax(-1) < 4.5).all() and (y.amin(-1) > -1.0).all()         # never beyond the two lanes
    assert (min_box_distance(runs, pos, yaw) > 0.3).all()
