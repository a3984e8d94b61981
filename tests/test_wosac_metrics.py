"""Known answers for the WOSAC metrics (wosac_metrics.py) on hand-built scenes, plus invariants,
the exactness of the pruned interaction search, and a run on the real WOMD scenes. The shared
geometry (rounded boxes, road edges, the pruned edge and lane searches): test_geometry.py."""
import math
import resource

import numpy as np
import pytest
import torch

import geometry
import scenes as S
import wosac_metrics as wm
from womd import find_womd_examples, load_womd_dir

T, NOW, DT = S.T, S.NOW, S.DT
STEPS = np.arange(T)


# ---- tiny scene builders ---------------------------------------------------------------------
def line(x0, y0, vx=0.0, vy=0.0):
    """Positions [T, 2] of constant-velocity motion, at (x0, y0) at step NOW."""
    s = (STEPS - NOW) * DT
    return np.stack([x0 + vx * s, y0 + vy * s], -1).astype(np.float32)


def edge(points, code=15):
    xyz = np.asarray([(p[0], p[1], p[2] if len(p) > 2 else 0.0) for p in points], np.float32)  # [P, 3]
    return xyz, S.ROAD_EDGE, code


def lane(points):
    return (np.asarray([(p[0], p[1], 0.0) for p in points], np.float32), S.LANE, S.SURFACE_STREET_LANE)


def make_scene(agents, polylines=(), tl=None, scene_id="test"):
    """agents: dicts with pos [T, 2] and optional yaw [T] (default: 0), size (L, W, H), type, valid [T],
    z [T], eval. polylines: (points [P, 3], type, code) tuples."""
    A = len(agents)
    pos = np.stack([a["pos"] for a in agents]).astype(np.float32)                   # [A, T, 2]
    yaw = np.stack([np.broadcast_to(np.asarray(a.get("yaw", 0.0), np.float32), (T,))
                    for a in agents])                                                 # [A, T]
    valid = np.stack([np.asarray(a.get("valid", np.ones(T, bool))) for a in agents])  # [A, T]
    z = np.stack([np.broadcast_to(np.asarray(a.get("z", 0.8), np.float32), (T,)) for a in agents])  # [A, T]
    agents_np = dict(
        pos=pos, z=z, yaw=yaw, vel=np.gradient(pos, axis=1) / DT, valid=valid,
        size=np.asarray([a.get("size", (4.0, 2.0, 1.6)) for a in agents], np.float32),
        agent_type=np.asarray([a.get("type", 0) for a in agents], np.int64),
        controlled=valid[:, NOW].copy(),
        eval_mask=np.asarray([a.get("eval", True) for a in agents]) & valid[:, NOW])
    if polylines:
        segs = S.polylines_to_segments([p for p, _, _ in polylines], [t for _, t, _ in polylines],
                                        [c for _, _, c in polylines])
    else:
        segs = S.polylines_to_segments([], [], [])
    return S.scene_from_numpy(scene_id, agents_np, segs, tl)


def features(scene):
    """trajectory_features of the log itself: dict of [A, 80] (B = R = 1 squeezed)."""
    f = wm.trajectory_features(scene, scene.pos[:, None], scene.z[:, None], scene.yaw[:, None],
                               scene.valid[:, None])
    return {k: v[0, 0] for k, v in f.items()}


def straight_road(n_agents=6, seed=0, half_len=120.0, spacing=1.0):
    """Two-way 4-lane road along x between oriented edges at y = -7 (eastward) and y = +7
    (westward): the road lies on their left. Vehicles on lanes, with mild speed wobble."""
    rng = np.random.default_rng(seed)
    xs = np.arange(-half_len, half_len + 1e-6, spacing)
    south = edge([(x, -7.0) for x in xs])
    north = edge([(x, 7.0) for x in xs[::-1]])
    agents = []
    for i in range(n_agents):
        y = [-5.25, -1.75, 1.75, 5.25][i % 4]
        sgn = 1.0 if y < 0 else -1.0
        x0 = sgn * (-80.0 + 20.0 * (i // 4)) + rng.uniform(-2, 2)
        v = rng.uniform(6, 10) + np.sin(0.4 * (STEPS - NOW) * DT + i)
        x = x0 + sgn * np.cumsum(v) * DT - sgn * np.cumsum(v)[NOW] * DT
        pos = np.stack([x, np.full(T, y)], -1).astype(np.float32)
        agents.append(dict(pos=pos, yaw=0.0 if sgn > 0 else math.pi))
    return make_scene(agents, [south, north], scene_id=f"road{seed}")


# ---- 3.3 time to collision ---------------------------------------------------------------
def test_time_to_collision_by_hand():
    ego = dict(pos=line(0, 0, vx=10.0))
    slow = dict(pos=line(20, 0, vx=5.0))             # gap 20 - 2 - 2 = 16 m, closing at 5 m/s
    f = features(make_scene([ego, slow]))
    ttc = f["time_to_collision"][0]
    gap0 = 16.0 + (5.0 - 10.0) * DT                   # future index 0 is step 11
    assert ttc[0].item() == pytest.approx(gap0 / 5.0, abs=1e-3)
    assert ttc[20].item() == pytest.approx((16.0 - 5.0 * 21 * DT) / 5.0, abs=1e-3)
    assert ttc[79].item() == wm.MAX_TTC               # NaN speed at the last step -> 5
    assert (f["time_to_collision"][1] == wm.MAX_TTC).all()  # the slow car has nobody ahead


def test_time_to_collision_rejections():
    ego = dict(pos=line(0, 0, vx=10.0))
    cases = {
        "behind": dict(pos=line(-20, 0, vx=5.0)),
        "oncoming": dict(pos=line(20, 0, vx=-5.0), yaw=math.pi),
        "beside": dict(pos=line(20, 2.5, vx=5.0)),    # lateral gap 2.5 - 1 - 1 = 0.5 >= 0
        "faster": dict(pos=line(20, 0, vx=12.0)),
    }
    for name, other in cases.items():
        ttc = features(make_scene([ego, other]))["time_to_collision"][0]
        assert (ttc == wm.MAX_TTC).all(), name
    # a small lateral overlap (between -0.5 m and 0) needs yaw_diff <= 10 deg: at y = 2.1 the
    # overlap is 2.1 - 1 - (2 sin h + cos h): -0.17 m at 8 deg (kept), -0.29 m at 12 deg (dropped)
    ttc_with = lambda other: features(make_scene([ego, other]))["time_to_collision"][0]  # [80]
    ok = ttc_with(dict(pos=line(20, 2.1, vx=5.0), yaw=math.radians(8)))
    assert ok[0].item() < wm.MAX_TTC
    skew = ttc_with(dict(pos=line(20, 2.1, vx=5.0), yaw=math.radians(12)))
    assert (skew == wm.MAX_TTC).all()
    big = ttc_with(dict(pos=line(20, 1.8, vx=5.0), yaw=math.radians(20)))
    assert big[0].item() < wm.MAX_TTC                    # overlap -0.82 m: 20 deg is fine


def test_time_to_collision_yaw_difference_is_not_wrapped():
    # both head west: +179 deg and -179 deg differ by 2 deg, but the official |h_j - h_i| is 358 deg
    ego = dict(pos=line(0, 0, vx=-10.0), yaw=math.radians(179.0))
    ahead = dict(pos=line(-20, 0, vx=-5.0), yaw=math.radians(-179.0))
    assert (features(make_scene([ego, ahead]))["time_to_collision"][0] == wm.MAX_TTC).all()
    same = dict(pos=line(-20, 0, vx=-5.0), yaw=math.radians(179.0))
    assert features(make_scene([ego, same]))["time_to_collision"][0][0].item() < wm.MAX_TTC


# ---- 3.5 traffic lights --------------------------------------------------------------------
def _tl_scene(x_now, vx, state, agent_type=0):
    """An approach lane ending at x = -10 where a signalled lane starts (stop point = its first
    point, as in WOMD); one car on it. Returns (scene, its signal index)."""
    approach = lane([(x, 0.0) for x in range(-60, -9)])                            # -60 .. -10
    signalled = lane([(x, 0.0) for x in range(-10, 31)])                           # -10 .. 30
    edges = [edge([(-60, -4), (30, -4)]), edge([(30, 4), (-60, 4)])]
    states = np.full((1, T), state, np.int64)
    stop = np.tile(np.array([[-10.0, 0.0]], np.float32), (1, T, 1))[None][0]       # [1, T, 2]
    tl = dict(lane=np.array([1]), state=states, stop=stop)                        # polyline 1 = signalled
    car = dict(pos=line(x_now, 0.0, vx=vx), type=agent_type)
    return make_scene([car], [approach, signalled] + edges, tl=tl)


def test_red_light_crossed_vs_not():
    red = features(_tl_scene(-30.5, 10.0, 4))["traffic_light_violation_per_step"][0]
    crossing_step = 31                                 # x: -10.5 at step 30, -9.5 at step 31
    assert red.nonzero().flatten().tolist() == [crossing_step - NOW - 1]
    arrow = features(_tl_scene(-30.5, 10.0, 1))["traffic_light_violation_per_step"][0]  # ARROW_STOP
    assert arrow.any()
    for state in (6, 7, 0):                            # go, flashing stop, unknown: no violation
        assert not features(_tl_scene(-30.5, 10.0, state))["traffic_light_violation_per_step"].any()
    stops = features(_tl_scene(-30.5, 0.5, 4))["traffic_light_violation_per_step"]      # never reaches it
    assert not stops.any()
    # landing exactly on the stop point never counts (strict comparisons on both sides)
    exact = features(_tl_scene(-30.0, 10.0, 4))["traffic_light_violation_per_step"]
    assert not exact.any()


def test_traffic_light_scoring_vehicles_only():
    scene = _tl_scene(-30.5, 10.0, 4)
    sim_pos, sim_z, sim_yaw = wm.log_as_rollouts(scene, 4)
    sim_pos[..., 0] = sim_pos[..., 0].clamp(max=-12.0)  # the rollouts stop before the line
    out = wm.score_rollouts(scene, sim_pos, sim_z, sim_yaw)
    expect = math.log(0.001 / (4 + 0.002))              # the log ran the light, no rollout did
    assert out["traffic_light_violation"].item() == pytest.approx(math.exp(expect), rel=1e-4)
    ped = _tl_scene(-30.5, 10.0, 4, agent_type=1)
    out = wm.score_rollouts(ped, *wm.log_as_rollouts(ped, 4))
    assert out["traffic_light_violation"].item() == pytest.approx((4 + 0.001) / (4 + 0.002), rel=1e-5)
    assert out["traffic_light_rate"].item() == 1.0      # the rate is masked by validity only


# ---- 3.1 kinematics ----------------------------------------------------------------------
def test_kinematic_nan_and_mask_conventions():
    yaw = np.unwrap(np.full(T, 3.1) + 0.02 * (STEPS - NOW)) % (2 * np.pi)      # crosses +pi
    yaw = (yaw + np.pi) % (2 * np.pi) - np.pi
    f = features(make_scene([dict(pos=line(0, 0, vx=8.0), yaw=yaw)]))
    speed, accel = f["linear_speed"][0], f["linear_acceleration"][0]
    assert torch.isnan(speed[79]) and not torch.isnan(speed[:79]).any()
    assert torch.isnan(accel[78:]).all() and not torch.isnan(accel[:78]).any()
    assert torch.isnan(f["angular_acceleration"][0][78:]).all()
    assert speed[0].item() == pytest.approx(8.0, abs=1e-3)                 # index 0 uses step 10
    assert accel[:78].abs().max().item() < 1e-2
    assert torch.allclose(f["angular_speed"][0][:79], torch.tensor(0.2), atol=1e-3)  # wrapped across pi
    v = torch.ones(80, dtype=torch.bool)
    v[40] = False
    speed_valid, accel_valid = wm.kinematic_validity(v)
    assert not speed_valid[0] and not speed_valid[79] and speed_valid[1:79].sum() == 76  # 39, 41 lost
    assert not speed_valid[39] and not speed_valid[41] and speed_valid[40]
    assert accel_valid.nonzero().flatten().tolist() == [i for i in range(2, 78) if i not in (38, 40, 42)]


# ---- 4. estimators -----------------------------------------------------------------------
def test_histogram_bins_and_likelihood():
    x = torch.tensor([-1.0, 0.0, 2.5, 5.0, 24.99, 25.0, 30.0, math.nan])
    assert wm._bin_index(x, 0.0, 25.0, 10).tolist() == [0, 0, 1, 2, 9, 9, 9, 9]  # edges go up
    sim = torch.full((1, 2, 1, 80), 3.0)                  # R = 2, every value in bin 1
    sim[0, 1, 0, 79] = math.nan                           # a NaN goes to the top bin, unmasked
    log = torch.tensor([[[3.0] * 79 + [24.0]]])
    ll = wm.histogram_log_likelihood(log, sim, 0.0, 25.0, 10)
    assert ll[0, 0, 0].item() == pytest.approx(math.log((159 + 0.1) / (160 + 1.0)), rel=1e-5)
    assert ll[0, 0, 79].item() == pytest.approx(math.log((1 + 0.1) / (160 + 1.0)), rel=1e-5)
    flags = wm.bernoulli_log_likelihood(torch.tensor([[True, False]]),
                                        torch.tensor([[[True, True], [False, True]]]))
    assert flags[0, 0].item() == pytest.approx(math.log(1.001 / 2.002), rel=1e-6)
    assert flags[0, 1].item() == pytest.approx(math.log(0.001 / 2.002), rel=1e-6)


# ---- 5. scoring -------------------------------------------------------------------------
def test_log_scores_best_and_degrades_monotonically():
    scene = straight_road(n_agents=6)
    R = 4
    pos, z, yaw = wm.log_as_rollouts(scene, R)
    base = wm.score_rollouts(scene, pos, z, yaw)
    assert base["min_ade"].item() == 0.0 and base["ade"].item() == 0.0
    assert base["collision_rate"].item() == 0.0 and base["offroad_rate"].item() == 0.0
    for k in wm.FEATURES:
        assert 0.0 < base[k].item() <= 1.0
    metas = [base["realism_meta"].item()]
    for scale in (0.9, 0.7, 0.4):                         # slower replays of the same paths
        slow = scene.pos[:, None, :, NOW:NOW + 1] + (pos - scene.pos[:, None, :, NOW:NOW + 1]) * scale
        out = wm.score_rollouts(scene, slow, z, yaw)
        assert out["min_ade"].item() > 0
        metas.append(out["realism_meta"].item())
    assert all(a > b for a, b in zip(metas, metas[1:])), metas
    shifted = pos.clone()
    shifted[..., 1] += 1.5                                # everybody 1.5 m to the left
    assert wm.score_rollouts(scene, shifted, z, yaw)["realism_meta"].item() < metas[0]


def test_meta_metric_weights_and_buckets():
    scene = straight_road(n_agents=5, seed=1)
    pos, z, yaw = wm.log_as_rollouts(scene, 3)
    pos = pos + 0.3 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(0)).cumsum(3)
    for version, (_, w) in wm.CONFIGS.items():
        out = wm.score_rollouts(scene, pos, z, yaw, version=version)
        meta = sum(w[f] * out[f] for f in wm.FEATURES)
        assert torch.allclose(out["realism_meta"], meta)
        kin = sum(out[f] for f in wm.BUCKETS["kinematic"]) / 4        # equal kinematic weights
        assert torch.allclose(out["kinematic"], kin)
    a = wm.score_rollouts(scene, pos, z, yaw, version="2025")
    b = wm.score_rollouts(scene, pos, z, yaw, version="2024")
    assert torch.allclose(a["distance_to_road_edge"], b["distance_to_road_edge"])   # same bins
    means = wm.dataset_means(a)
    assert means["realism_meta"] == pytest.approx(a["realism_meta"].item())


def test_pruned_interactions_equal_distance_matrix():
    rng = np.random.default_rng(3)
    agents = []
    for i in range(10):
        agents.append(dict(pos=line(*rng.uniform(-15, 15, 2), *rng.uniform(-5, 5, 2)),
                           yaw=float(rng.uniform(-3, 3)), size=(*rng.uniform(0.6, 5, 2), 1.5),
                           type=int(rng.integers(0, 3))))
    agents[3]["valid"] = STEPS < 50                        # leaves mid-way
    scene = make_scene(agents)
    f = features(scene)
    p, y = scene.pos[0, :, NOW + 1:].transpose(0, 1), scene.yaw[0, :, NOW + 1:].T   # [80, A, (2)]
    d = geometry.object_distance_matrix(p, y, scene.size[0, :, 0], scene.size[0, :, 1],
                                        scene.valid[0, :, NOW + 1:].T)
    ref = d.amin(-1).T                                     # [A, 80]
    v = scene.valid[0, :, NOW + 1:]
    assert torch.allclose(f["distance_to_nearest_object"][v], ref[v], atol=1e-5)
    assert torch.equal(f["collision_per_step"][v], ref[v] < 0)


def test_scoring_rejects_bad_input():
    scene = make_scene([dict(pos=line(0, 0))], scene_id="no-edges-here")
    with pytest.raises(ValueError, match="no-edges-here"):
        wm.score_rollouts(scene, *wm.log_as_rollouts(scene, 2))
    road = straight_road(n_agents=2)
    pos, z, yaw = wm.log_as_rollouts(road, 2)
    with pytest.raises(ValueError, match="sim_pos|pos must be"):
        wm.score_rollouts(road, pos[..., :79, :], z, yaw)
    with pytest.raises(ValueError, match="version"):
        wm.score_rollouts(road, pos, z, yaw, version="2030")


# ---- real WOMD scenes -----------------------------------------------------------------------
def test_real_womd_scenes_log_against_itself():
    folder = find_womd_examples()
    if folder is None:
        pytest.skip("WOMD example scenes not found ($WOMD_EXAMPLES or ../shared/data/womd_examples)")
    scenes = load_womd_dir(folder)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                     # KiB on Linux
    out = wm.score_rollouts(scenes, *wm.log_as_rollouts(scenes, 2))
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20
    assert scenes.B == 8 and grown_gib < 3.0
    for k, v in out.items():
        assert v.shape == (8,) and torch.isfinite(v).all(), k
    assert (out["min_ade"] == 0).all()
    assert ((out["realism_meta"] > 0.3) & (out["realism_meta"] <= 1.0)).all()


def test_benchmark_scoring_runs():
    rate = wm.benchmark_scoring(straight_road(n_agents=3), R=2, repeats=1)
    assert rate > 0 and math.isfinite(rate)


def test_dataset_means_leave_out_and_count_unscored_scenes():
    """A scene with no scored agent scores NaN; the suite's means are over the other scenes, and the
    result says how many were left out (before: one NaN scene made the whole suite NaN)."""
    per_scene = dict(realism_meta=torch.tensor([0.8, math.nan, 0.6]),
                     min_ade=torch.tensor([1.0, math.nan, 3.0]))
    out = wm.dataset_means(per_scene)
    assert out["realism_meta"] == pytest.approx(0.7) and out["min_ade"] == pytest.approx(2.0)
    assert out["n_scenes_nan"] == 1
    assert wm.dataset_means(dict(realism_meta=torch.ones(2)))["n_scenes_nan"] == 0
