"""Known answers for the shared geometry (geometry.py, WOSAC 3.2 / 3.4): rounded-box distances,
oriented road-edge distances, and the exactness of the pruned searches against brute force."""
import math

import numpy as np
import pytest
import torch

import geometry
import wosac_metrics as wm
from scenes import NOW
# the hand-built scene builders, shared with the metric tests
from test_wosac_metrics import edge, lane, line, make_scene, straight_road


# ---- 3.2 rounded boxes -------------------------------------------------------------------
def test_box_corners_are_ccw_from_front_left():
    c = geometry.box_corners(torch.tensor([1.0, 2.0]), torch.tensor(math.pi / 2), torch.tensor(4.0),
                             torch.tensor(2.0))
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
    d = wm._buggy_lane_distance(q[..., None, :2], a[:, None, None, :, :2],
                                b[:, None, None, :, :2])                                     # [1, 30, 9, S]
    chosen = d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, d.amin(-1), atol=1e-5)


def test_box_road_edge_distance_broadcasts_candidates_and_tables():
    scene = straight_road(n_agents=4)
    table = geometry.road_edge_table(scene)
    pos, z, yaw = scene.pos[:, :, NOW], scene.z[:, :, NOW], scene.yaw[:, :, NOW]       # [1, A]
    full = geometry.box_road_edge_distance(pos, z, yaw, scene.size, table)                   # table [B, E]
    mid = 0.5 * (table["a"][..., :2] + table["b"][..., :2])                             # [1, E, 2]
    near = (pos.unsqueeze(2) - mid.unsqueeze(1)).norm(dim=-1).topk(16, largest=False).indices  # [1, A, 16]
    cand = {k: geometry.gather_rows(v, near) for k, v in table.items()}                 # [1, A, 16, ...]
    assert torch.allclose(geometry.box_road_edge_distance(pos, z, yaw, scene.size, cand), full)
    assert (full < 0).all()                                                            # lanes are on-road
