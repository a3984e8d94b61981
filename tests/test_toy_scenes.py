"""Toy scenes and the stochastic human driver: determinism, contract, clean logs, road-edge
orientation, the driver's stochasticity and its car-following / crosswalk behaviour."""
import numpy as np
import pytest
import torch

import geometry
from env import bicycle_step
from human_driver import HumanDriver
from scenes import CROSSWALK, EDGE_CODE, LANE, NOW, ROAD_EDGE, SURFACE_STREET_LANE, T, polylines_to_segments, scene_from_numpy
from toy_scenes import ToyConfig, make_toy_scenes, toy_dataset, toy_log_failures

LAYOUTS = ToyConfig().layouts


@pytest.fixture(scope="module")
def toy():
    return make_toy_scenes(len(LAYOUTS), seed=1)   # one scene per layout


def drive(scenes, seed, start=NOW, steps=T - 1 - NOW, active=None):
    """Closed-loop driver rollout from the log at `start`: pos [B, A, steps+1, 2], yaw, speed [B, A, steps+1]."""
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


def min_box_distance(scenes, pos, yaw):
    """Smallest rounded-box distance of each agent to any other over the steps: [B, A]."""
    yt = yaw.transpose(1, 2)                                              # [B, T', A]
    L, W = (scenes.size[:, None, :, k].expand_as(yt) for k in (0, 1))
    v = scenes.valid[:, :, :1].expand_as(yaw).transpose(1, 2)             # [B, T', A]
    return geometry.object_distance_matrix(pos.transpose(1, 2), yt, L, W, v).amin(dim=(1, 3))


# ---- generation ----------------------------------------------------------------------------
def test_deterministic_from_seed(toy):
    again = make_toy_scenes(len(LAYOUTS), seed=1)
    for k, v in toy.tensors().items():
        assert torch.equal(v, getattr(again, k)), k
    other = make_toy_scenes(len(LAYOUTS), seed=2)
    assert not torch.equal(toy.seg_start[:, :50], other.seg_start[:, :50])
    assert not torch.equal(toy.pos[:, :5], other.pos[:, :5])


def test_contract_and_layouts(toy):
    B, A = toy.B, toy.A
    assert sorted(s.split("-")[1] for s in toy.scene_id) == sorted(LAYOUTS)
    assert toy.pos.shape == (B, A, T, 2) and toy.vel.shape == (B, A, T, 2) and toy.yaw.shape == (B, A, T)
    assert toy.size.shape == (B, A, 3) and toy.style.shape == (B, A, 4) and toy.route.shape[:2] == (B, A)
    assert A <= 32 and toy.z.abs().max() == 0
    real = toy.valid[:, :, NOW]                                           # [B, A]
    assert torch.equal(toy.valid, real.unsqueeze(-1).expand(-1, -1, T))  # valid for all 91 steps, padding never
    assert torch.equal(toy.controlled, real) and torch.equal(toy.eval_mask, real)
    assert torch.allclose(toy.goal[real], toy.pos[:, :, -1][real])
    counts = [int((toy.agent_type[real] == k).sum()) for k in range(3)]
    assert counts[0] > 0.5 * sum(counts) and counts[1] > 0 and counts[2] > 0   # mixed, mostly vehicles
    assert real.sum(1).min() >= 5
    # velocity is the backward difference of position (WOMD convention)
    assert torch.allclose(toy.vel[:, :, 1:][real], ((toy.pos[:, :, 1:] - toy.pos[:, :, :-1]) / 0.1)[real], atol=1e-3)
    # routes: a valid prefix at ~1 m spacing starting near the agent; styles are positive
    rv = toy.route_valid[real]                                            # [N, P]
    assert torch.equal(rv, rv.cumsum(1) == torch.arange(1, rv.shape[1] + 1))
    step = (toy.route[:, :, 1:] - toy.route[:, :, :-1]).norm(dim=-1)[toy.route_valid[:, :, 1:]]
    assert step.max() < 1.01 and step.min() > 0.5
    assert ((toy.route[:, :, 0] - toy.pos[:, :, 0]).norm(dim=-1)[real] < 40).all()
    assert (toy.style[real] > 0).all()
    # map: lanes, road edges, crosswalks, segments of about 1-2 m
    seg = (toy.seg_end - toy.seg_start)[..., :2].norm(dim=-1)[toy.seg_valid]
    assert seg.max() < 2.01 and seg.median() > 1.0
    has = lambda k: ((toy.seg_type == k) & toy.seg_valid).any(1)           # [B]
    assert has(LANE).all() and has(ROAD_EDGE).all()
    assert all(has(CROSSWALK)[b] for b, s in enumerate(toy.scene_id) if s.split("-")[1] in ("straight", "fourway", "tjunction"))


def test_logs_have_no_collision_offroad_or_nan(toy):
    assert torch.isfinite(toy.pos).all() and torch.isfinite(toy.yaw).all() and torch.isfinite(toy.vel).all()
    assert not toy_log_failures(toy).any()
    # the exact official geometry, every box against every road-edge segment
    assert (min_box_distance(toy, toy.pos, toy.yaw)[toy.valid[:, :, 0]] > 0).all()
    table = geometry.road_edge_table(toy)
    for b in range(toy.B):
        d = geometry.box_road_edge_distance(toy.pos[b], toy.z[b], toy.yaw[b], toy.size[b].unsqueeze(1).expand(-1, T, 3),
                                      {k: v[b] for k, v in table.items()})        # [A, T]
        assert (d[toy.valid[b]] < 0).all(), toy.scene_id[b]


def test_failure_check_catches_bad_logs(toy):
    bad = toy.select([0, 1, 2])
    real = bad.valid[:, :, NOW]
    i, j = [int(a) for a in real[0].nonzero()[:2, 0]]
    bad.pos[0, j, 40:50] = bad.pos[0, i, 40:50]                           # scene 0: two boxes overlap
    k = int(real[1].nonzero()[0, 0])
    bad.pos[1, k, 60] += 100.0                                            # scene 1: far off the road
    assert toy_log_failures(bad).tolist() == [True, True, False]


def test_road_edges_have_the_road_on_their_left(toy):
    table = geometry.road_edge_table(toy)
    lane = (toy.seg_type == LANE) & toy.seg_valid                          # [B, S]
    for b in range(toy.B):
        e = {k: v[b] for k, v in table.items()}
        pts = toy.seg_start[b][lane[b]]                                    # [Q, 3] lane centre points
        assert (geometry.signed_distance_to_edges(pts, e) < -1.0).all(), toy.scene_id[b]
        ok = e["valid"]
        a, bb = e["a"][ok], e["b"][ok]                                     # [E, 3]
        d = (bb - a)[:, :2] / (bb - a)[:, :2].norm(dim=-1, keepdim=True)   # [E, 2]
        right = torch.stack([d[:, 1], -d[:, 0]], -1)                       # [E, 2] away from the road
        mid = 0.5 * (a + bb)[:, :2]                                        # [E, 2]
        z = torch.zeros(len(a), 1)
        assert (geometry.signed_distance_to_edges(torch.cat([mid - 0.5 * right, z], -1), e) < 0).all(), toy.scene_id[b]
        assert (geometry.signed_distance_to_edges(torch.cat([mid + 0.5 * right, z], -1), e) > 0).float().mean() > 0.97
        # 5 m beyond the outer edge (the one furthest from the scene's middle) is off-road
        far = (mid + 5.0 * right)[(mid + 5.0 * right).norm(dim=-1).argmax()]  # [2]
        assert geometry.signed_distance_to_edges(torch.cat([far, torch.zeros(1)]).unsqueeze(0), e)[0] > 4.0


def test_toy_dataset_cache(tmp_path):
    cfg = ToyConfig(layouts=("straight", "tjunction"), max_agents=10)
    a = toy_dataset("train", 2, seed=0, cache_dir=tmp_path, cfg=cfg)
    files = list(tmp_path.glob("toy_train_n2_s0_*.pt"))
    assert len(files) == 1
    b = toy_dataset("train", 2, seed=0, cache_dir=tmp_path, cfg=cfg)      # loaded, not rebuilt
    assert all(torch.equal(v, getattr(b, k)) for k, v in a.tensors().items())
    v = toy_dataset("val", 2, seed=0, cache_dir=tmp_path, cfg=cfg)
    assert not torch.equal(a.seg_start[:, :20], v.seg_start[:, :20])     # splits use other seeds
    with pytest.raises(ValueError, match="split"):
        toy_dataset("dev", 2, cache_dir=tmp_path, cfg=cfg)


# ---- the driver ----------------------------------------------------------------------------
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
              vel=np.repeat(vel[:, None], T, 1), valid=np.ones((A, T), bool), size=np.array([a["size"] for a in agents]),
              agent_type=np.array([a["type"] for a in agents]), controlled=np.ones(A, bool), eval_mask=np.ones(A, bool))
    return scene_from_numpy("hand", ag, segs, route=route, route_valid=rv, style=np.array([a["style"] for a in agents]))


def line(a, b, step=1.0):
    n = int(np.ceil(np.hypot(b[0] - a[0], b[1] - a[1]) / step))
    return np.linspace(a, b, n + 1)


CAR = dict(size=[4.5, 2.0, 1.5], type=0)
PED = dict(size=[0.8, 0.8, 1.7], type=1)


def test_idm_follower_stops_behind_a_stopped_leader():
    route = line((-60.0, 0.0), (200.0, 0.0))
    leader = dict(CAR, route=route, pos=np.array([50.0, 0.0]), yaw=0.0, speed=0.0, style=[0.01, 1.5, 2.0, 2.0])
    follower = dict(CAR, route=route, pos=np.array([-40.0, 0.0]), yaw=0.0, speed=12.0, style=[12.0, 1.5, 2.0, 2.0])
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
    ped = dict(PED, route=ped_route, pos=np.array([ped_wait_x + 1.0, -5.0]), yaw=0.0, speed=1.3, style=[1.3, 0.8, 0.5, 1.5])
    car = dict(CAR, route=line((car_start_x - 10.0, 0.0), (150.0, 0.0)), pos=np.array([car_start_x, 0.0]), yaw=0.0,
               speed=car_speed, style=[car_speed, 1.5, 2.0, 2.5])
    sc = straight_scene([ped, car])
    pos, yaw, speed = drive(sc, seed=0, steps=150)
    ped_in_lane = (pos[0, 0, :, 1].abs() < 2.0).nonzero()[:, 0]           # steps the pedestrian is in the lane
    car_past = (pos[0, 1, :, 0] > 4.0).nonzero()[:, 0]                    # steps the car's rear has passed x = 0 ... roughly
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
    bike = dict(size=[1.8, 0.7, 1.7], type=2, route=route - np.array([0.0, 0.5]), pos=np.array([0.0, -0.5]), yaw=0.0,
                speed=4.0, style=[4.0, 1.5, 1.5, 2.0])
    runs = straight_scene([car, bike], lane_ys=(0.0, 3.6)).repeat(8)      # 8 noise samples
    pos, yaw, speed = drive(runs, seed=0, steps=150)
    y = pos[:, 0, :, 1]                                                   # [8, steps] the car's lateral position
    changed = y.amax(-1) > 3.0
    assert changed.sum() >= 6                                             # most runs overtake through the left lane
    assert (pos[:, 0, -1, 0] > pos[:, 1, -1, 0] + 5.0).sum() >= 5         # and pass the cyclist within 15 s
    assert (y.amax(-1) < 4.5).all() and (y.amin(-1) > -1.0).all()         # never beyond the two lanes
    assert (min_box_distance(runs, pos, yaw) > 0.3).all()
