"""Toy scenes (toy_scenes.py): determinism, the contract on every layout, clean logs, the failure
check, road-edge orientation and the dataset cache (the driver itself: test_human_driver.py)."""
import pytest
import torch

import geometry
from conftest import min_box_distance
from scenes import CROSSWALK, LANE, NOW, ROAD_EDGE, T
from toy_scenes import ToyConfig, make_toy_scenes, toy_dataset, toy_log_failures

LAYOUTS = ToyConfig().layouts


@pytest.fixture(scope="module")
def toy():
    return make_toy_scenes(len(LAYOUTS), seed=1)   # one scene per layout


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
    assert torch.equal(toy.valid, real.unsqueeze(-1).expand(-1, -1, T))  # all 91 steps valid, padding never
    assert torch.equal(toy.controlled, real) and torch.equal(toy.eval_mask, real)
    assert torch.allclose(toy.goal[real], toy.pos[:, :, -1][real])
    counts = [int((toy.agent_type[real] == k).sum()) for k in range(3)]
    assert counts[0] > 0.5 * sum(counts) and counts[1] > 0 and counts[2] > 0   # mixed, mostly vehicles
    assert real.sum(1).min() >= 5
    # velocity is the backward difference of position (WOMD convention)
    backward = (toy.pos[:, :, 1:] - toy.pos[:, :, :-1]) / 0.1                # [B, A, T-1, 2]
    assert torch.allclose(toy.vel[:, :, 1:][real], backward[real], atol=1e-3)
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
    assert all(has(CROSSWALK)[b] for b, s in enumerate(toy.scene_id)
               if s.split("-")[1] in ("straight", "fourway", "tjunction"))


def test_logs_have_no_collision_offroad_or_nan(toy):
    assert torch.isfinite(toy.pos).all() and torch.isfinite(toy.yaw).all() and torch.isfinite(toy.vel).all()
    assert not toy_log_failures(toy).any()
    # the exact official geometry, every box against every road-edge segment
    assert (min_box_distance(toy, toy.pos, toy.yaw)[toy.valid[:, :, 0]] > 0).all()
    table = geometry.road_edge_table(toy)
    for b in range(toy.B):
        size = toy.size[b].unsqueeze(1).expand(-1, T, 3)                   # [A, T, 3]
        d = geometry.box_road_edge_distance(toy.pos[b], toy.z[b], toy.yaw[b], size,
                                            {k: v[b] for k, v in table.items()})  # [A, T]
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
        inner = geometry.signed_distance_to_edges(torch.cat([mid - 0.5 * right, z], -1), e)  # [E]
        outer = geometry.signed_distance_to_edges(torch.cat([mid + 0.5 * right, z], -1), e)  # [E]
        assert (inner < 0).all(), toy.scene_id[b]
        assert (outer > 0).float().mean() > 0.97
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
