"""Known answers for the WOSAC metrics (wosac_metrics.py) on hand-built geometry, plus invariants,
the exactness of the pruned searches against brute force, and a run on the real WOMD scenes."""
import math
import resource

import numpy as np
import pytest
import torch

import geometry
import scenes as sc
import wosac_metrics as wm
from womd import find_womd_examples, load_womd_dir

T, NOW, DT = sc.T, sc.NOW, sc.DT
STEPS = np.arange(T)


# ---- tiny scene builders ---------------------------------------------------------------------
def line(x0, y0, vx=0.0, vy=0.0):
    """Positions [T, 2] of constant-velocity motion, at (x0, y0) at step NOW."""
    s = (STEPS - NOW) * DT
    return np.stack([x0 + vx * s, y0 + vy * s], -1).astype(np.float32)


def edge(points, code=15):
    return (np.asarray([(p[0], p[1], p[2] if len(p) > 2 else 0.0) for p in points], np.float32), sc.ROAD_EDGE, code)


def lane(points):
    return (np.asarray([(p[0], p[1], 0.0) for p in points], np.float32), sc.LANE, sc.SURFACE_STREET_LANE)


def make_scene(agents, polylines=(), tl=None, scene_id="test"):
    """agents: dicts with pos [T, 2] and optional yaw [T] (default: 0), size (L, W, H), type, valid [T],
    z [T], eval. polylines: (points [P, 3], type, code) tuples."""
    A = len(agents)
    pos = np.stack([a["pos"] for a in agents]).astype(np.float32)                   # [A, T, 2]
    yaw = np.stack([np.broadcast_to(np.asarray(a.get("yaw", 0.0), np.float32), (T,)) for a in agents])  # [A, T]
    valid = np.stack([np.asarray(a.get("valid", np.ones(T, bool))) for a in agents])  # [A, T]
    z = np.stack([np.broadcast_to(np.asarray(a.get("z", 0.8), np.float32), (T,)) for a in agents])  # [A, T]
    agents_np = dict(
        pos=pos, z=z, yaw=yaw, vel=np.gradient(pos, axis=1) / DT, valid=valid,
        size=np.asarray([a.get("size", (4.0, 2.0, 1.6)) for a in agents], np.float32),
        agent_type=np.asarray([a.get("type", 0) for a in agents], np.int64),
        controlled=valid[:, NOW].copy(), eval_mask=np.asarray([a.get("eval", True) for a in agents]) & valid[:, NOW])
    if polylines:
        segs = sc.polylines_to_segments([p for p, _, _ in polylines], [t for _, t, _ in polylines], [c for _, _, c in polylines])
    else:
        segs = sc.polylines_to_segments([], [], [])
    return sc.scene_from_numpy(scene_id, agents_np, segs, tl)


def features(scene):
    """trajectory_features of the log itself: dict of [A, 80] (B = R = 1 squeezed)."""
    f = wm.trajectory_features(scene, scene.pos[:, None], scene.z[:, None], scene.yaw[:, None], scene.valid[:, None])
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


# ---- 3.2 rounded boxes -------------------------------------------------------------------
def test_box_corners_are_ccw_from_front_left():
    c = geometry.box_corners(torch.tensor([1.0, 2.0]), torch.tensor(math.pi / 2), torch.tensor(4.0), torch.tensor(2.0))
    # heading +y: front-left is (-1, +2) from the centre, then rear-left, rear-right, front-right
    expected = torch.tensor([[0.0, 4.0], [0.0, 0.0], [2.0, 0.0], [2.0, 4.0]])
    assert torch.allclose(c, expected, atol=1e-6)
    x, y = c[:, 0], c[:, 1]
    area = 0.5 * (x * y.roll(-1) - x.roll(-1) * y).sum()          # shoelace: > 0 for CCW
    assert area.item() == pytest.approx(8.0)


def _pair(p2, yaw2, size1=(4.0, 2.0), size2=(4.0, 2.0), valid=(True, True)):
    pos = torch.tensor([[0.0, 0.0], list(p2)])
    yaw = torch.tensor([0.0, yaw2])
    L = torch.tensor([size1[0], size2[0]]); W = torch.tensor([size1[1], size2[1]])
    return geometry.object_distance_matrix(pos, yaw, L, W, torch.tensor(valid))


def test_rounded_box_distance_known_answers():
    # 4 x 2 boxes: rounding radius s = 0.7 * 2 / 2 = 0.7, cores 2.6 x 0.6
    d = _pair((6.0, 0.0), 0.0)                       # facing sides: the plain gap 6 - 2 - 2
    assert d[0, 1].item() == pytest.approx(2.0, abs=1e-5)
    assert d[1, 0].item() == pytest.approx(2.0, abs=1e-5)
    assert d[0, 0].item() == geometry.BIG and d[1, 1].item() == geometry.BIG
    d = _pair((5.0, 0.0), math.pi / 2)               # rotated: 5 - 2 - 1
    assert d[0, 1].item() == pytest.approx(2.0, abs=1e-5)
    d = _pair((6.0, 4.0), 0.0)                       # corner to corner: core gap (3.4, 3.4), minus 2 s
    assert d[0, 1].item() == pytest.approx(math.hypot(3.4, 3.4) - 1.4, abs=1e-5)
    assert d[0, 1].item() > math.hypot(2.0, 2.0)     # rounded corners are farther than sharp ones
    d = _pair((3.0, 0.0), 0.0)                       # overlap: core gap 0.4 - 1.4
    assert d[0, 1].item() == pytest.approx(-1.0, abs=1e-5) and (d[0] < 0).any()
    d = _pair((0.0, 0.0), 0.0)                       # identical boxes: 2 m sideways separates them
    assert d[0, 1].item() == pytest.approx(-2.0, abs=1e-5)
    d = _pair((3.0, 0.0), 0.0, valid=(True, False))  # an invalid box is never near
    assert d[0, 1].item() == geometry.BIG


def _core_perimeter(cx, cy, yaw, L, W, n=600):
    """Points along the perimeter of a box's core (the box shrunk by the rounding radius s)."""
    s = geometry.CORNER_ROUNDING * min(L, W) / 2
    l, w = L / 2 - s, W / 2 - s
    corners = np.array([[l, w], [-l, w], [-l, -w], [l, -w], [l, w]])
    f = np.linspace(0, 1, n // 4, endpoint=False)[:, None]
    pts = np.concatenate([a + f * (b - a) for a, b in zip(corners[:-1], corners[1:])])
    c, si = np.cos(yaw), np.sin(yaw)
    return pts @ np.array([[c, si], [-si, c]]) + np.array([cx, cy]), s


def test_rounded_box_distance_matches_sampled_boundaries():
    rng = np.random.default_rng(0)
    for _ in range(30):
        L1, W1, L2, W2 = rng.uniform(0.5, 6, 4)
        p2 = rng.uniform(-10, 10, 2)
        yaw2 = rng.uniform(-np.pi, np.pi)
        d = _pair(tuple(p2), float(yaw2), (L1, W1), (L2, W2))[0, 1].item()
        (a, s1), (b, s2) = _core_perimeter(0, 0, 0, L1, W1), _core_perimeter(p2[0], p2[1], yaw2, L2, W2)
        core_gap = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min()
        if core_gap > 0.05:                               # disjoint cores: distance minus both radii
            assert d == pytest.approx(core_gap - s1 - s2, abs=0.02)


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
    ok = features(make_scene([ego, dict(pos=line(20, 2.1, vx=5.0), yaw=math.radians(8))]))["time_to_collision"][0]
    assert ok[0].item() < wm.MAX_TTC
    skew = features(make_scene([ego, dict(pos=line(20, 2.1, vx=5.0), yaw=math.radians(12))]))["time_to_collision"][0]
    assert (skew == wm.MAX_TTC).all()
    big = features(make_scene([ego, dict(pos=line(20, 1.8, vx=5.0), yaw=math.radians(20))]))["time_to_collision"][0]
    assert big[0].item() < wm.MAX_TTC                    # overlap -0.82 m: 20 deg is fine


def test_time_to_collision_yaw_difference_is_not_wrapped():
    # both head west: +179 deg and -179 deg differ by 2 deg, but the official |h_j - h_i| is 358 deg
    ego = dict(pos=line(0, 0, vx=-10.0), yaw=math.radians(179.0))
    ahead = dict(pos=line(-20, 0, vx=-5.0), yaw=math.radians(-179.0))
    assert (features(make_scene([ego, ahead]))["time_to_collision"][0] == wm.MAX_TTC).all()
    same = dict(pos=line(-20, 0, vx=-5.0), yaw=math.radians(179.0))
    assert features(make_scene([ego, same]))["time_to_collision"][0][0].item() < wm.MAX_TTC


# ---- 3.4 signed distance to road edges ---------------------------------------------------
def _box_edge(scene, x, y, yaw=0.0, size=(4.0, 2.0, 1.6), z=0.8):
    table = geometry.road_edge_table(scene)
    return geometry.box_road_edge_distance(torch.tensor([[x, y]]), torch.tensor([z]), torch.tensor([yaw]),
                                     torch.tensor([size]), table).item()


def test_road_edge_sign_and_distance_by_hand():
    east = make_scene([dict(pos=line(0, 5))], [edge([(-10, 0), (0, 0), (10, 0)])])   # road at y > 0
    assert _box_edge(east, 0, 5) == pytest.approx(-4.0, abs=1e-5)     # on-road: nearest corner 4 m
    assert _box_edge(east, 0, -5) == pytest.approx(6.0, abs=1e-5)     # off-road: most off-road corner
    assert _box_edge(east, 0, 0.5) == pytest.approx(0.5, abs=1e-5)    # straddling the edge
    west = make_scene([dict(pos=line(0, 5))], [edge([(10, 0), (0, 0), (-10, 0)])])   # reversed
    assert _box_edge(west, 0, 5) == pytest.approx(6.0, abs=1e-5)
    assert _box_edge(west, 0, -5) == pytest.approx(-4.0, abs=1e-5)
    # the value is 2D even though the segment is picked in z-stretched 3D
    assert _box_edge(east, 0, 5, z=3.0) == pytest.approx(-4.0, abs=1e-5)


def test_road_edge_vertex_rule_convex_and_concave():
    q = torch.tensor([[1.0, 1.0, 0.0]])
    # acute left turn: the road is the thin wedge between the segments (locally convex); (1, 1)
    # is outside it. The first segment alone would call it on-road; the rule says off-road.
    convex = make_scene([dict(pos=line(0, 0))], [edge([(-10, 0), (0, 0), (-10, 5)])])
    d = geometry.signed_distance_to_edges(q, geometry.road_edge_table(convex))
    assert d.item() == pytest.approx(math.sqrt(2), abs=1e-5)
    # the same wedge walked the other way: the road is everything outside it (concave vertex)
    concave = make_scene([dict(pos=line(0, 0))], [edge([(-10, 5), (0, 0), (-10, 0)])])
    d = geometry.signed_distance_to_edges(q, geometry.road_edge_table(concave))
    assert d.item() == pytest.approx(-math.sqrt(2), abs=1e-5)


def test_road_edge_cyclic_polygon_wraps():
    square = [(0, 0), (10, 0), (10, 10), (0, 10), (0, 0)]                           # CCW: road inside
    scene = make_scene([dict(pos=line(5, 5))], [edge(square)])
    table = geometry.road_edge_table(scene)
    assert table["prev_ok"][0, 0] and torch.equal(table["prev_a"][0, 0], table["a"][0, 3])
    pts = torch.tensor([[5.0, 5.0, 0.0], [-1.0, -1.0, 0.0], [0.5, 0.5, 0.0], [11.0, 5.0, 0.0]])
    d = geometry.signed_distance_to_edges(pts, table)
    assert torch.allclose(d, torch.tensor([-5.0, math.sqrt(2), -0.5, 1.0]), atol=1e-5)
    # a cyclic edge shorter than the scene's longest edge does not wrap (official padding quirk)
    longer = edge([(50 + i, 0) for i in range(8)])
    table2 = geometry.road_edge_table(make_scene([dict(pos=line(5, 5))], [edge(square), longer]))
    assert not table2["prev_ok"][0, 0]


def test_road_edge_no_edges_is_large_negative():
    scene = make_scene([dict(pos=line(0, 0))])
    assert _box_edge(scene, 0, 0) == -geometry.BIG


def _random_edge_scene(seed):
    """Wavy oriented edges at two heights (an overpass) plus a closed loop."""
    rng = np.random.default_rng(seed)
    polys = []
    for k in range(5):
        xs = np.arange(-60, 60, rng.uniform(0.5, 3.0))
        y0, z0 = rng.uniform(-30, 30), (6.0 if k == 4 else 0.0)
        pts = [(x, y0 + 3 * np.sin(0.05 * x + k), z0 + 0.02 * x) for x in xs]
        polys.append(edge(pts if k % 2 else pts[::-1]))
    ang = np.linspace(0, 2 * np.pi, 40)
    polys.append(edge([(40 + 8 * np.cos(a), 8 * np.sin(a), 0.0) for a in ang]))
    return make_scene([dict(pos=line(0, 0))], polys)


def test_pruned_road_edge_search_equals_brute_force():
    for seed in range(3):
        scene = _random_edge_scene(seed)
        table = geometry.road_edge_table(scene)
        g = torch.Generator().manual_seed(seed)
        Q = 8 * 40
        pos = torch.rand(1, Q, 2, generator=g) * 160 - 80                  # some far off the map
        pos[:, :80] = pos[:, :80] * 0.2 + torch.cumsum(torch.randn(1, 80, 2, generator=g), 1)  # a track
        z = torch.rand(1, Q, generator=g) * 8                             # between the two levels
        yaw = torch.rand(1, Q, generator=g) * 6.28 - 3.14
        size = torch.rand(1, Q, 3, generator=g) * 4 + 0.5
        brute = geometry.box_road_edge_distance(pos, z, yaw, size, table)       # [1, Q] all edges
        for G, track in ((1, 1), (4, 8), (8, 4)):
            wm_G = geometry.EDGE_GROUP
            try:
                geometry.EDGE_GROUP = G
                pruned = geometry.road_edge_distance_many(pos, z, yaw, size, table, track=track)
            finally:
                geometry.EDGE_GROUP = wm_G
            assert torch.allclose(pruned, brute, atol=1e-4), (seed, G, track)


def test_pruned_lane_search_equals_brute_force():
    # the traffic-light lane search minimises the buggy ||(p - a) + t (b - a)||; pruned == brute force
    rng = np.random.default_rng(7)
    polys = [lane([(x, y0 + 2 * np.sin(0.1 * x)) for x in np.arange(-50, 50, rng.uniform(0.5, 2.0))])
             for y0 in rng.uniform(-20, 20, 6)]
    scene = make_scene([dict(pos=line(0, 0))], polys)
    a, b = scene.seg_start * torch.tensor([1.0, 1.0, 0.0]), scene.seg_end * torch.tensor([1.0, 1.0, 0.0])
    q = torch.zeros(1, 30, 9, 3)
    q[..., :2] = torch.cumsum(torch.randn(1, 30, 9, 2, generator=torch.Generator().manual_seed(0)), 2) * 0.5
    q[..., :2] += torch.rand(1, 30, 1, 2, generator=torch.Generator().manual_seed(1)) * 120 - 60
    idx = geometry.nearest_segments(q, a, b, scene.seg_valid, buggy=True)                   # [1, 30, 9]
    d = wm._buggy_lane_distance(q[..., None, :2], a[:, None, None, :, :2], b[:, None, None, :, :2])  # [1, 30, 9, S]
    chosen = d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, d.amin(-1), atol=1e-5)


def test_box_road_edge_distance_broadcasts_candidates_and_tables():
    scene = straight_road(n_agents=4)
    table = geometry.road_edge_table(scene)
    pos, z, yaw = scene.pos[:, :, NOW], scene.z[:, :, NOW], scene.yaw[:, :, NOW]       # [1, A]
    full = geometry.box_road_edge_distance(pos, z, yaw, scene.size, table)                   # table [B, E]
    mid = 0.5 * (table["a"][..., :2] + table["b"][..., :2])                             # [1, E, 2]
    near = (pos.unsqueeze(2) - mid.unsqueeze(1)).norm(dim=-1).topk(16, largest=False).indices  # [1, A, 16]
    cand = {k: geometry.gather_rows(v, near) for k, v in table.items()}                            # [1, A, 16, ...]
    assert torch.allclose(geometry.box_road_edge_distance(pos, z, yaw, scene.size, cand), full)
    assert (full < 0).all()                                                            # lanes are on-road


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
    flags = wm.bernoulli_log_likelihood(torch.tensor([[True, False]]), torch.tensor([[[True, True], [False, True]]]))
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
    d = geometry.object_distance_matrix(p, y, scene.size[0, :, 0], scene.size[0, :, 1], scene.valid[0, :, NOW + 1:].T)
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
