"""Speedups of the simulator and the WOSAC scoring change no result: each fast path is compared
with the slower computation it replaced, on toy scenes and (when present) the real WOMD examples."""
import math

import numpy as np
import pytest
import torch

import geometry
import road_edge_search
import wosac_metrics as wm
from env import EnvConfig, MultiAgentEnv
from geometry import BIG, CHUNK, relative_pose, rounded_box_distance, take
from scenes import NOW, ROAD_EDGE, T, polylines_to_segments, scene_from_numpy
from test_geometry import _random_edge_scene
from toy_scenes import make_toy_scenes
from wosac_metrics import MAX_HEADING_DIFF, MAX_HEADING_DIFF_SMALL_OVERLAP, MAX_TTC, SMALL_OVERLAP
from womd import find_womd_examples, load_womd_dir


def womd_or_skip():
    folder = find_womd_examples()
    if folder is None:
        pytest.skip("WOMD example scenes not found ($WOMD_EXAMPLES or ../shared/data/womd_examples)")
    return load_womd_dir(folder)


def old_interaction_features(pos, yaw, valid, size, speed, slots):
    """The pre-speedup _interaction_features (padded [B, N, M, A] pairs, topk pruning), kept verbatim as
    the reference the fast pair-list version must equal bit for bit.

    pos [B, R, A, T, 2], yaw/valid/speed [B, R, A, T] (valid already False for non-sim agents;
    speed: 2D central-difference speed), size [B, A, 3], slots [B, M] -> two [B, R, M, T].
    Every (rollout, step) is independent: they are flattened to N = R T and processed in chunks."""
    B, R, A, Tn = yaw.shape
    M, N = slots.shape[1], R * Tn
    L, W = size[..., 0], size[..., 1]                                     # [B, A]
    Li = take(L, slots, 1)[:, None, :, None]                             # [B, 1, M, 1]
    Wi = take(W, slots, 1)[:, None, :, None]                             # [B, 1, M, 1]
    Lj, Wj = L[:, None, None, :], W[:, None, None, :]                     # [B, 1, 1, A]
    Ri, Rj = 0.5 * torch.sqrt(Li ** 2 + Wi ** 2), 0.5 * torch.sqrt(Lj ** 2 + Wj ** 2)  # half diagonals
    ri, rj = 0.5 * torch.minimum(Li, Wi), 0.5 * torch.minimum(Lj, Wj)    # inscribed radii
    not_self = (slots.unsqueeze(-1) != torch.arange(A, device=pos.device)).unsqueeze(1)  # [B, 1, M, A]
    flat = lambda x: x.transpose(2, 3).reshape(B, N, A, *x.shape[4:])     # [B, R T, A, ...]
    P, H, V, S = flat(pos), flat(yaw), flat(valid), flat(speed)           # [B, N, A, (2)]
    Pi, Hi, Vi, Si = (take(x, slots, 2) for x in (P, H, V, S))           # [B, N, M, (2)]
    dist_out = pos.new_empty(B, N, M)                                     # [B, N, M]
    ttc_out = pos.new_empty(B, N, M)                                      # [B, N, M]
    step = max(1, CHUNK // max(1, B * M * A))
    for n0 in range(0, N, step):
        c_ = slice(n0, min(N, n0 + step))
        x, y, cos_d, sin_d = relative_pose(Pi[:, c_].unsqueeze(-2), Hi[:, c_].unsqueeze(-1),
                                            P[:, c_].unsqueeze(-3), H[:, c_].unsqueeze(-2))  # [B, Nc, M, A]

        # 3.2: rounded-box distance, BIG for self pairs and invalid boxes, min over the others.
        # Exact d_ij is only needed for the pairs that can be the minimum: a rounded box lies
        # between the discs of radius min(L, W)/2 and its half diagonal around its centre, so with
        # centre distance c: c - Ri - Rj <= d_ij <= c - ri - rj.
        ok = Vi[:, c_].unsqueeze(-1) & V[:, c_].unsqueeze(-2) & not_self  # [B, Nc, M, A]
        c = torch.sqrt(x * x + y * y)                                     # [B, Nc, M, A]
        lb = torch.where(ok, c - Ri - Rj, math.inf)                       # [B, Nc, M, A]
        bound = torch.where(ok, c - ri - rj, math.inf).amin(-1, keepdim=True)  # [B, Nc, M, 1]
        maybe = ok & (lb <= bound + 1e-3 * (1.0 + bound.abs()))           # float32 margin
        k = max(1, int(maybe.sum(-1).max()))
        j = torch.where(maybe, lb, math.inf).topk(k, dim=-1, largest=False).indices  # [B, Nc, M, k]
        pick = lambda v: v.expand_as(lb).gather(-1, j)                    # [B, Nc, M, k]
        d = rounded_box_distance(pick(x), pick(y), pick(cos_d), pick(sin_d), Li, Wi,
                                 pick(Lj), pick(Wj))                      # [B, Nc, M, k]
        dist_out[:, c_] = torch.where(pick(maybe), d, BIG).amin(-1)       # [B, Nc, M]

        # 3.3: the box ahead. yaw_diff is NOT wrapped (+179 deg vs -179 deg gives 358 deg: rejected);
        # |cos|, |sin| of it equal those of h_j - h_i, already at hand.
        yaw_diff = (H[:, c_].unsqueeze(-2) - Hi[:, c_].unsqueeze(-1)).abs()  # [B, Nc, M, A]
        ac, as_ = cos_d.abs(), sin_d.abs()                                # [B, Nc, M, A]
        long_off = 0.5 * Lj * ac + 0.5 * Wj * as_                       # [B, Nc, M, A] other's nearest corner
        lat_off = 0.5 * Lj * as_ + 0.5 * Wj * ac                         # [B, Nc, M, A]
        lon = x - 0.5 * Li - long_off                                     # [B, Nc, M, A] ahead of ego's front
        lat = y.abs() - 0.5 * Wi - lat_off                                # [B, Nc, M, A] < 0: overlap
        # ego validity unused
        ahead = (V[:, c_].unsqueeze(-2) & (lon > 0) & (yaw_diff <= MAX_HEADING_DIFF) & (lat < 0)
                 & ((lat < -SMALL_OVERLAP) | (yaw_diff <= MAX_HEADING_DIFF_SMALL_OVERLAP)))  # [B, Nc, M, A]
        masked = lon + (~ahead).to(lon.dtype) * BIG                       # [B, Nc, M, A]
        j = masked.argmin(-1, keepdim=True)                               # [B, Nc, M, 1]
        gap = masked.gather(-1, j).squeeze(-1)                            # [B, Nc, M]
        v_ahead = S[:, c_].unsqueeze(-2).expand_as(masked).gather(-1, j).squeeze(-1)  # [B, Nc, M]
        rel = Si[:, c_] - v_ahead                                         # speed magnitudes, NaN -> 5
        ttc = torch.where(rel > 0, torch.clamp(gap / rel, max=MAX_TTC),
                          torch.full_like(rel, MAX_TTC))                  # [B, Nc, M]
        ttc_out[:, c_] = ttc
    unflat = lambda x: x.view(B, R, Tn, M).transpose(2, 3)                # [B, R, M, T]
    return unflat(dist_out), unflat(ttc_out)


# ==============================================================================================
# 3.5 Traffic-light violation
# ==============================================================================================
def _buggy_lane_distance(p, a, b):
    """The official lane-search 'distance' ||(p - a) + clip(rel_t)(b - a)|| (the `+` is the bug,
    copied for fidelity; a true distance has `-`). p, a, b [..., 2] broadcasting -> [...]."""


def noisy_rollouts(scenes, R, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    pos, z, yaw = wm.log_as_rollouts(scenes, R)                           # [B, R, A, 80, ...]
    return pos + torch.randn(pos.shape, generator=g).cumsum(dim=3) * noise, z, yaw


def interaction_inputs(scenes, R, seed=0):
    """What _features hands _interaction_features for R noisy rollouts: [B, R, A, 80] tensors."""
    pos, z, yaw = noisy_rollouts(scenes, R, seed)
    sim = scenes.valid[:, None, :, NOW:NOW + 1].expand(-1, R, -1, T - NOW - 1)  # [B, R, A, 80]
    pos = torch.where(sim.unsqueeze(-1), pos, torch.zeros_like(pos))
    yaw = torch.where(sim, yaw, torch.zeros_like(yaw))
    speed = (pos[..., 1:, :] - pos[..., :-1, :]).norm(dim=-1) / 0.1       # [B, R, A, 79]
    speed = torch.cat([speed, torch.full_like(speed[..., :1], math.nan)], -1)  # [B, R, A, 80] NaN at the end
    slots, _ = geometry.compact(scenes.eval_mask & scenes.valid[:, :, NOW], at_least=1)
    return pos, yaw, sim, scenes.size, speed, slots


@pytest.mark.parametrize("which", ["toy", "womd"])
def test_interaction_pair_list_equals_padded_version(which):
    scenes = make_toy_scenes(6, seed=3) if which == "toy" else womd_or_skip().select(slice(0, 4))
    args = interaction_inputs(scenes, R=3)
    dist, ttc = wm._interaction_features(*args)
    dist0, ttc0 = old_interaction_features(*args)
    assert torch.equal(dist, dist0) and torch.equal(ttc, ttc0)
    # every slot, not just the scored ones (trajectory_features asks for all agents)
    all_slots = torch.arange(scenes.A).expand(scenes.B, scenes.A)
    a = wm._interaction_features(*args[:5], all_slots)
    b = old_interaction_features(*args[:5], all_slots)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("which", ["toy", "womd"])
def test_road_edge_search_track_equals_one_search_per_box(which):
    """track = TRACK (one pruned search per 16 steps of an agent) vs track = 1 (one per box) vs the
    brute force over every road edge: the same signed distances."""
    scenes = make_toy_scenes(4, seed=5) if which == "toy" else womd_or_skip().select(slice(0, 2))
    pos, z, yaw = noisy_rollouts(scenes, R=2, noise=1.0)                  # [B, R, A, 80, ...]
    B = scenes.B
    size = scenes.size[:, None, :, None].expand(*yaw.shape, 3)            # [B, R, A, 80, 3]
    table = geometry.road_edge_table(scenes)
    q = lambda x: x.reshape(B, -1, *x.shape[4:])                          # [B, R A 80, ...]
    fast = geometry.road_edge_distance_many(q(pos), q(z), q(yaw), q(size), table, track=wm.TRACK)
    one = geometry.road_edge_distance_many(q(pos), q(z), q(yaw), q(size), table, track=1)
    assert torch.equal(fast, one)
    n = 400 if which == "womd" else fast.shape[1]                         # brute force on a sample
    brute = geometry.box_road_edge_distance(q(pos)[:, :n], q(z)[:, :n], q(yaw)[:, :n], q(size)[:, :n], table)
    assert torch.allclose(fast[:, :n], brute, atol=1e-5)


def test_score_rollouts_same_for_any_track():
    scenes = womd_or_skip().select(slice(0, 2))
    pos, z, yaw = noisy_rollouts(scenes, R=2)
    fast = wm.score_rollouts(scenes, pos, z, yaw)
    saved, wm.TRACK = wm.TRACK, 1
    try:
        slow = wm.score_rollouts(scenes, pos, z, yaw)
    finally:
        wm.TRACK = saved
    for k in fast:
        assert torch.equal(fast[k].isnan(), slow[k].isnan()) and torch.allclose(
            fast[k].nan_to_num(), slow[k].nan_to_num(), atol=0, rtol=0), k


def crowded_scene(n=24, seed=0):
    """n cars dropped at random in a 24 m x 24 m box (many overlap), road edges around it."""
    g = np.random.default_rng(seed)
    box = np.array([(-12, -12), (12, -12), (12, 12), (-12, 12), (-12, -12)], np.float64)
    seg = polylines_to_segments([np.concatenate([box, np.zeros((5, 1))], 1)], [ROAD_EDGE], [15])
    xy = g.uniform(-11, 11, (n, 2))
    yaw = g.uniform(-math.pi, math.pi, n)
    agents = dict(pos=np.repeat(xy[:, None], T, 1), z=np.zeros((n, T)), yaw=np.repeat(yaw[:, None], T, 1),
                  vel=np.zeros((n, T, 2)), valid=np.ones((n, T), bool),
                  size=np.stack([g.uniform(3.5, 5.5, n), g.uniform(1.6, 2.2, n), np.full(n, 1.5)], 1),
                  agent_type=np.zeros(n, np.int64), controlled=np.ones(n, bool), eval_mask=np.ones(n, bool))
    return scene_from_numpy(f"crowd{seed}", agents, seg)


def test_env_collisions_within_reach_equal_full_matrix():
    """The env measures only pairs within the sum of half diagonals; the flags must equal those of
    the full [B, A, A] rounded-box matrix at every step, in crowded and in ordinary scenes."""
    from scenes import collate
    for scenes in (collate([crowded_scene(24, s) for s in range(3)]), make_toy_scenes(4, seed=9)):
        env = MultiAgentEnv(scenes, EnvConfig(mode="continuous"))
        env.reset()
        g = torch.Generator().manual_seed(0)
        hits = 0
        for _ in range(30):
            act = (torch.rand(scenes.B, scenes.A, 2, generator=g) * torch.tensor([8.0, 1.0])
                   - torch.tensor([4.0, 0.5]))                                    # [B, A, 2]
            _, _, info = env.step(act)
            d = geometry.object_distance_matrix(env.pos, env.yaw, scenes.size[..., 0], scenes.size[..., 1],
                                                env.active)                      # [B, A, A]
            assert torch.equal(info["collided"], (d.min(-1).values < 0) & env.active)
            hits += int(info["collided"].sum())
        assert hits > 0 or scenes.B == 4


def test_edge_candidates_give_the_whole_tables_distance_bit_for_bit():
    """Boxes that move at most the margin from where their candidate lists were made get exactly
    box_road_edge_distance against the whole table (same segment, same bits), with z varying and
    on the WOMD scenes when present (real maps: sloped, stacked, degenerate segments)."""
    sets = [make_toy_scenes(6, seed=3)]
    if find_womd_examples() is not None:
        sets.append(womd_or_skip())
    g = torch.Generator().manual_seed(0)
    for scenes in sets:
        table = geometry.road_edge_table(scenes)
        parts = geometry.edge_parts(table)
        B, A, E = scenes.B, scenes.A, table["valid"].shape[1]
        size = scenes.size.reshape(-1, 3)                                     # [B A, 3]
        pos0 = scenes.pos[:, :, NOW].reshape(-1, 2) + torch.randn(B * A, 2, generator=g) * 3  # [B A, 2]
        z0 = scenes.z[:, :, NOW].reshape(-1) + torch.randn(B * A, generator=g) * 0.5   # [B A]
        margin = 2.0
        r = 0.5 * size[:, :2].norm(dim=-1) + margin                           # [B A]
        zs = geometry.Z_STRETCH * (z0 - 0.5 * size[:, 2])                     # [B A]
        scene = torch.arange(B).repeat_interleave(A)                          # [B A]
        ids, ok = geometry.edge_candidates(pos0[:, 0], pos0[:, 1], zs, r, parts, scene, E)  # [B A, C]
        assert ids.shape[1] < E or E <= 8                                     # the lists do prune
        # the search in row chunks (bounded memory on real maps) returns the same lists
        small = geometry.edge_candidates(pos0[:, 0], pos0[:, 1], zs, r, parts, scene, E, chunk_elems=3 * E)
        assert torch.equal(small[0], ids) and torch.equal(small[1], ok)
        pool = {k: parts[k][ids] for k in geometry.SEG_PARTS}                 # [B A, C]
        pool["ok"] = ok
        has_edge = table["valid"].any(1).repeat_interleave(A)                 # [B A]
        for _ in range(5):
            # a move of at most the margin in (x, y, stretched z) together
            step = torch.randn(B * A, 3, generator=g)                         # [B A, 3]
            step = step / step.norm(dim=-1, keepdim=True) * margin * torch.rand(B * A, 1, generator=g)
            pos, z = pos0 + step[:, :2], z0 + step[:, 2] / geometry.Z_STRETCH  # [B A, 2], [B A]
            yaw = torch.rand(B * A, generator=g) * 2 * math.pi                # [B A]
            fast = geometry.pooled_box_edge_distance(pos, z, yaw, size, pool, ids, parts, has_edge)  # [B A]
            full = geometry.box_road_edge_distance(pos.view(B, A, 2), z.view(B, A), yaw.view(B, A),
                                                   scenes.size, table)        # [B, A]
            assert torch.equal(fast, full.view(-1))


def test_env_offroad_equals_whole_table_on_the_peer_workload_and_toy_scenes():
    """The env's off-road flags (candidate lists rebuilt per agent after a move of edge_margin)
    equal the whole road-edge table's at every step, on issue 15's intersection (1x and 10x
    segments), on toy scenes with replayed agents and on the WOMD scenes when present (padding
    slots at the origin, far from a real map, must not widen every agent's list to the map)."""
    from bench import peer_workload
    sets = [(peer_workload(6, 32, 1), 4.0), (peer_workload(6, 32, 10), 1.0), (make_toy_scenes(4, seed=5), 2.0)]
    if find_womd_examples() is not None:
        sets.append((womd_or_skip(), 4.0))
    for scenes, margin in sets:
        env = MultiAgentEnv(scenes, EnvConfig(mode="continuous", edge_margin=margin))
        env.reset()
        table = geometry.road_edge_table(scenes)
        # before the fix, 8 WOMD scenes' lists were 4,461 of 5,655 segments wide; present agents need <= 419
        assert env.edge_ids.shape[1] <= max(8, table["valid"].shape[1] // 4)
        g = torch.Generator().manual_seed(1)
        off = 0
        for _ in range(40):
            act = torch.rand(scenes.B, scenes.A, 2, generator=g) * torch.tensor([8.0, 0.8]) - torch.tensor([4.0, 0.4])
            _, _, info = env.step(act)                                        # [B, A, 2] actions above
            full = geometry.box_road_edge_distance(env.pos, env.z, env.yaw, scenes.size, table) > 0  # [B, A]
            assert torch.equal(info["offroad"], full & env.active)
            off += int(info["offroad"].sum())
        assert off > 0


# --------------------------------------------------------------------------------------------
# The PPO policy's fast paths
# --------------------------------------------------------------------------------------------
def test_input_linear_equals_nn_linear_in_value_and_gradients():
    """ppo_anchor.InputLinear only changes the layout of the weight-gradient product: the output and
    every gradient equal nn.Linear's (float tolerance), with the same parameter names."""
    import ppo_anchor as PA
    torch.manual_seed(0)
    fast = PA.InputLinear(10, 64)
    slow = torch.nn.Linear(10, 64)
    slow.load_state_dict(fast.state_dict())
    assert list(fast.state_dict()) == ["weight", "bias"]
    x = torch.randn(8, 64, 10, requires_grad=True)                           # [S, P, d_in]
    g = torch.randn(8, 64, 64)                                                # [S, P, d]
    outs = []
    for layer in (fast, slow):
        x.grad = None
        y = layer(x)                                                          # [S, P, d]
        y.backward(g)
        outs.append((y.detach(), layer.weight.grad, layer.bias.grad, x.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_policy_forward_equals_one_call(monkeypatch):
    """controlled_forward's chunks over the controlled agents give the numbers of one call over all."""
    import ppo_anchor as PA
    from env import EGO_DIM, PARTNER_DIM, ROAD_DIM
    torch.manual_seed(0)
    B, A = 4, 40
    obs = dict(ego=torch.randn(B, A, EGO_DIM), partners=torch.randn(B, A, 16, PARTNER_DIM),
               partner_mask=torch.rand(B, A, 16) < 0.6, road=torch.randn(B, A, 64, ROAD_DIM),
               road_mask=torch.rand(B, A, 64) < 0.9)                              # [B, A, ...]
    obs["partner_mask"][0, :3] = False                                            # empty partner sets
    agent_type = torch.randint(0, 3, (B, A))                                      # [B, A]
    ctrl = torch.rand(B, A) < 0.8                                                 # [B, A]
    policy = PA.LateFusionPolicy(16)
    with torch.no_grad():
        monkeypatch.setattr(PA, "FORWARD_CHUNK", 10 ** 6)
        one = PA.controlled_forward(policy, obs, agent_type, ctrl)
        monkeypatch.setattr(PA, "FORWARD_CHUNK", 7)
        chunked = PA.controlled_forward(policy, obs, agent_type, ctrl)
    assert one[0].shape == (int(ctrl.sum()), 16)
    for a, b in zip(one, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_masked_max_equals_the_max_with_indices_in_value_and_gradient():
    """ppo_anchor.masked_max (amax) equals the max(-2).values version it replaced, value and gradient,
    with empty sets (zeros, no gradient) and duplicated points (ties of identical inputs)."""
    import ppo_anchor as PA

    def old_masked_max(x, mask):
        pooled = x.masked_fill(~mask.unsqueeze(-1), -1e9).max(-2).values     # [..., D]
        return torch.where(mask.any(-1, keepdim=True), pooled, torch.zeros_like(pooled))

    torch.manual_seed(0)
    net = PA.embed_mlp(10, 32)
    x = torch.randn(6, 20, 10)                                                # [S, P, d_in]
    x[:, 5] = x[:, 4]                                                         # duplicated points tie
    mask = torch.rand(6, 20) < 0.7                                            # [S, P]
    mask[:, 4:6] = True
    mask[0] = False                                                           # an empty set
    w = torch.randn(6, 32)                                                    # [S, D]
    grads = []
    for pool in (old_masked_max, PA.masked_max):
        net.zero_grad()
        out = pool(net(x), mask)                                              # [S, D]
        (out * w).sum().backward()
        grads.append((out.detach(), *[p.grad.clone() for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0]) and bool((grads[1][0][0] == 0).all())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- road_edge_search.py: per-box pruning of the road-edge search ------------------------------
def _boxes(scenes, R, noise, seed=0):
    """R noisy rollouts of every agent as [B, Q, ...] boxes, some far off the map."""
    pos, z, yaw = noisy_rollouts(scenes, R=R, seed=seed, noise=noise)     # [B, R, A, 80, ...]
    B = scenes.B
    size = scenes.size[:, None, :, None].expand(*yaw.shape, 3)            # [B, R, A, 80, 3]
    q = lambda x: x.reshape(B, -1, *x.shape[4:]).clone()                  # [B, R A 80, ...]
    pos, z, yaw, size = q(pos), q(z), q(yaw), q(size)
    pos[:, :80] += torch.linspace(0, 300, 80).unsqueeze(-1)               # one agent drives off the map
    return pos, z, yaw, size


@pytest.mark.parametrize("which", ["toy", "womd", "overpass"])
def test_box_pruned_road_edge_search_equals_geometry(which):
    """road_edge_search (per-box second level, group-major tables) picks the very segment of
    geometry.nearest_segments for every corner, so the signed distances are identical; both match
    the brute force over every edge."""
    if which == "overpass":
        scene = _random_edge_scene(1)
        g = torch.Generator().manual_seed(1)
        Q = 16 * 30
        pos = torch.cumsum(torch.randn(1, Q, 2, generator=g), 1) * 2 - 40   # [1, Q, 2] a long track
        z = torch.rand(1, Q, generator=g) * 8                             # between the two levels
        yaw = torch.rand(1, Q, generator=g) * 6.28 - 3.14
        size = torch.rand(1, Q, 3, generator=g) * 4 + 0.5
        table = geometry.road_edge_table(scene)
    else:
        scenes = make_toy_scenes(4, seed=5) if which == "toy" else womd_or_skip().select(slice(1, 2))
        pos, z, yaw, size = _boxes(scenes, R=2 if which == "toy" else 1, noise=1.0)
        table = geometry.road_edge_table(scenes)
    stretch = torch.tensor([1.0, 1.0, geometry.Z_STRETCH])
    corners = geometry._box_bottom_corners(pos, z, yaw, size) * stretch   # [B, Q, 4, 3]
    B, Q = pos.shape[:2]
    for track in (2, wm.TRACK):
        idx = road_edge_search.nearest_edge_per_corner(corners, table["a"] * stretch, table["b"] * stretch,
                                                       table["valid"], track)  # [B, Q, 4]
        ref = geometry.nearest_segments(corners.view(B, Q // track, 4 * track, 3), table["a"] * stretch,
                                        table["b"] * stretch, table["valid"])  # [B, Q / track, 4 track]
        assert torch.equal(idx, ref.view(B, Q, 4)), track
        new = road_edge_search.road_edge_distance(pos, z, yaw, size, table, track=track)
        assert torch.equal(new, geometry.road_edge_distance_many(pos, z, yaw, size, table, track=track))
    n = 400                                                               # brute force on a sample
    brute = geometry.box_road_edge_distance(pos[:, :n], z[:, :n], yaw[:, :n], size[:, :n], table)
    assert torch.allclose(new[:, :n], brute, atol=1e-4)


def test_padding_slots_change_no_scored_feature():
    """_features with slot_ok (padding slots skip the interaction pairs and the road-edge search)
    equals _features without it on every scored slot."""
    scenes = womd_or_skip().select(slice(0, 4))
    pos, z, yaw = noisy_rollouts(scenes, R=2)
    hist = lambda x: x[:, None, :, :NOW + 1].expand(-1, 2, *([-1] * (x.dim() - 1)))
    full = lambda h, f: torch.cat([hist(h), f], dim=3)
    valid = torch.cat([hist(scenes.valid), torch.ones_like(hist(scenes.valid)[..., :1]).expand(
        -1, -1, -1, T - NOW - 1)], dim=3)                                 # [B, R, A, T]
    sim = wm._sim_agent_trajectories(scenes, full(scenes.pos, pos), full(scenes.z, z), full(scenes.yaw, yaw), valid)
    slots, slot_ok = geometry.compact(scenes.eval_mask & scenes.valid[:, :, NOW], at_least=1)
    assert not bool(slot_ok.all())                                        # the test needs padding
    table = geometry.road_edge_table(scenes)
    a = wm._features(scenes, *sim, slots, table, slot_ok)
    b = wm._features(scenes, *sim, slots, table)
    m = slot_ok[:, None, :, None].expand_as(a["valid"])                   # [B, R, M, 80]
    for k in a:
        x, y = a[k][m], b[k][m]
        assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x[~x.isnan()], y[~y.isnan()]), k
