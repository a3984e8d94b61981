"""Motion tokenizer: k-disks vocabulary, rolling-match encoding, decoding (tokenizer.py)."""
import io
import math

import numpy as np
import pytest
import torch

import env
from scenes import NOW, T, apply_local, collate, scene_from_numpy, wrap_angle
from tokenizer import (MotionTokenizer, TokenizerConfig, log_poses, reconstruct, reconstruction_error,
                       remove_heading_flips)
from womd import find_womd_examples, load_womd_dir

# per type: initial speed range (m/s), largest lateral acceleration (m/s^2), largest curvature (1/m)
SPEED = {0: (0.0, 25.0), 1: (0.3, 2.0), 2: (2.0, 8.0)}
A_LAT = {0: 3.0, 1: 1.0, 2: 2.0}
KAPPA = {0: 0.2, 1: 1.0, 2: 0.3}


def smooth_tracks(rng, kind: int, n: int):
    """n noise-free agents of one type: speed changing with a piecewise-constant acceleration,
    curvature a constant plus a slow sinusoid, capped by the lateral acceleration: [n, T, 3]."""
    sub, dt = 10, 0.01                                              # integrate at 100 Hz
    t = np.arange((T - 1) * sub) * dt                               # [L]
    acc = rng.uniform(-1.5, 1.0, (n, 5))[:, (t // 2).astype(int)] * (1.0 if kind == 0 else 0.3)  # [n, L]
    v = np.clip(rng.uniform(*SPEED[kind], n)[:, None] + np.cumsum(acc, 1) * dt, 0, None)  # [n, L]
    a, b, w = rng.uniform(-1, 1, (3, n, 1))                         # [n, 1] each
    cap = np.minimum(KAPPA[kind], A_LAT[kind] / np.maximum(v, 0.5) ** 2)  # [n, L]
    kappa = np.clip(KAPPA[kind] * 0.5 * (a + b * np.sin((0.6 + 0.4 * w) * t)), -cap, cap)  # [n, L]
    yaw = rng.uniform(-math.pi, math.pi, (n, 1)) + np.cumsum(v * kappa, 1) * dt  # [n, L]
    yaw = np.concatenate([yaw[:, :1] - v[:, :1] * kappa[:, :1] * dt, yaw], 1)  # [n, L + 1]
    step = np.stack([np.cos(yaw[:, :-1]), np.sin(yaw[:, :-1])], -1) * v[..., None] * dt  # [n, L, 2]
    xy = np.concatenate([np.zeros((n, 1, 2)), np.cumsum(step, 1)], 1) + rng.uniform(-50, 50, (n, 1, 2))
    return np.concatenate([xy, yaw[..., None]], -1)[:, ::sub]       # [n, T, 3]


def synthetic_scene(seed: int, n_per_type=(24, 12, 8)):
    """Smooth tracks for each type, then 4 more vehicles: one stopped, one appearing late (step 23),
    one vanishing (after step 61), one with a gap (steps 30..44 missing). Agent 0 has a one-step
    180-degree heading flip, as trackers sometimes report."""
    rng = np.random.default_rng(seed)
    tracks = [smooth_tracks(rng, k, n) for k, n in enumerate(n_per_type)]
    kinds = np.concatenate([np.full(n, k) for k, n in enumerate(n_per_type)])  # [A0]
    poses = np.concatenate(tracks + [smooth_tracks(rng, 0, 4)])        # [A, T, 3]
    poses[-4] = poses[-4, :1]                                       # stopped (same pose all along)
    A = len(poses)
    kinds = np.concatenate([kinds, np.zeros(4, np.int64)])          # [A]
    valid = np.ones((A, T), bool)
    valid[-3, :23] = False                                          # appears late
    valid[-2, 62:] = False                                          # vanishes
    valid[-1, 30:45] = False                                        # gap, then reappears
    poses[0, 50, 2] = wrap_angle(poses[0, 50, 2] + math.pi)         # a tracker heading flip
    poses[..., 2] = wrap_angle(poses[..., 2])
    poses = np.where(valid[..., None], poses, 0.0)
    sizes = np.array([[4.5, 1.9, 1.5], [0.8, 0.8, 1.8], [1.9, 0.8, 1.8]])[kinds]  # [A, 3]
    agents = dict(pos=poses[..., :2], z=np.zeros((A, T)), yaw=poses[..., 2], vel=np.zeros((A, T, 2)),
                  valid=valid, size=sizes, agent_type=kinds, controlled=valid[:, NOW],
                  eval_mask=valid[:, NOW])
    empty = dict(seg_start=np.zeros((0, 3)), seg_end=np.zeros((0, 3)), **{k: np.zeros(0, np.int64) for k in
                 ("seg_type", "seg_code", "seg_poly", "seg_prev", "seg_next")})
    return scene_from_numpy(f"synthetic{seed}", agents, empty)


@pytest.fixture(scope="module")
def train():
    return collate([synthetic_scene(s) for s in range(4)])


@pytest.fixture(scope="module")
def test_scenes():
    return collate([synthetic_scene(s) for s in (100, 101)])


@pytest.fixture(scope="module")
def tok(train):
    return MotionTokenizer.fit(train, TokenizerConfig(K=200, steps_per_token=2))



def test_vocabulary_shape_zero_token_and_distinct(tok):
    assert tok.table.shape == (3, 200, 2, 3) and tok.K == 200 and tok.steps_per_token == 2
    assert torch.equal(tok.table[:, 0], torch.zeros(3, 2, 3))      # id 0 is exactly standing still
    for c in range(3):  # exactly K distinct tokens even for the cyclists' few segments
        assert len(torch.unique(tok.table[c].reshape(200, -1), dim=0)) == 200


def test_encode_decode_synthetic(tok, train, test_scenes):
    fitted = reconstruction_error(tok, train)                       # the scenes it was fitted on
    assert fitted["vehicle"]["pos_mean"] < 0.05 and fitted["vehicle"]["yaw_mean"] < 0.01
    assert fitted["pedestrian"]["pos_mean"] < 0.05 and fitted["cyclist"]["pos_mean"] < 0.05
    held_out = reconstruction_error(tok, test_scenes)               # other seeds, same distribution
    assert held_out["vehicle"]["pos_mean"] < 0.06
    assert held_out["pedestrian"]["pos_mean"] < 0.05 and held_out["cyclist"]["pos_mean"] < 0.05
    # no drift: the end of the future is about as accurate as its beginning
    for r in (fitted, held_out):
        v = r["vehicle"]
        assert v["late_future"] < 2 * v["early_future"] + 0.02 and v["last_future"] < 0.1


def test_rolling_matching_does_not_drift_unlike_open_loop(tok, train):
    scenes = train.select([0])
    enc = tok.encode(scenes, anchor_now=False)
    log = log_poses(scenes)[:, :, ::2]                              # [1, A, N + 1, 3]
    # open loop: each token matched from the *logged* pose, then chained from the start
    open_ids = torch.stack([tok.match(log[:, :, n], log[:, :, n + 1], scenes.agent_type)
                            for n in range(tok.N)], -1)             # [1, A, N]
    full = scenes.valid.all(-1) & (scenes.agent_type == 0)          # [1, A] always-valid vehicles
    start = log[:, :, 0]                                            # [1, A, 3]
    end_err = lambda ids: (tok.decode(start, ids, scenes.agent_type)[:, :, -1, :2]
                           - log[:, :, -1, :2]).norm(dim=-1)[full]
    rolling, open_loop = end_err(enc["ids"]), end_err(open_ids)     # [A']
    assert rolling.max() < 0.3                                      # after 9 s
    assert rolling.mean() < 0.2 * open_loop.mean()


def test_jittered_fitting_copies_prevent_drift_on_smooth_logs(tok, train):
    # noise-free logs hold no small corrective motions; without the jittered copies the matched
    # pose slips off the log and the error grows over the scene
    bare = MotionTokenizer.fit(train, TokenizerConfig(K=200, steps_per_token=2, jitter=(0.0, 0.0)))
    without, with_ = reconstruction_error(bare, train)["vehicle"], reconstruction_error(tok, train)["vehicle"]
    assert without["late_future"] > 4 * without["early_future"]
    assert without["late_future"] > 4 * with_["late_future"]


def test_decode_equals_repeated_step_pose_and_matched_poses(tok, test_scenes):
    enc = tok.encode(test_scenes, anchor_now=False)
    kind = test_scenes.agent_type
    dec = tok.decode(enc["pose"][:, :, 0], enc["ids"], kind)        # [B, A, N * spt, 3]
    assert dec.shape == (2, test_scenes.A, 90, 3)
    pose, steps = enc["pose"][:, :, 0], []
    for n in range(tok.N):  # what the simulator's token mode does, one token at a time
        local = tok.motion_table[kind, enc["ids"][..., n]]          # [B, A, spt, 3]
        steps.append(apply_local(pose, local))
        pose = steps[-1][..., -1, :]
    assert torch.allclose(dec, torch.cat(steps, -2), atol=1e-5)
    # for agents valid all along, the decoded boundaries are the matched poses of encode
    full = test_scenes.valid.all(-1)                                # [B, A]
    assert torch.allclose(dec[:, :, 1::2][full], enc["pose"][:, :, 1:][full], atol=1e-4)


def test_simulator_apply_local_reproduces_decode(tok, test_scenes):
    enc = tok.encode(test_scenes, anchor_now=False)
    kind = test_scenes.agent_type
    pose, steps = enc["pose"][:, :, 0], []
    for n in range(tok.N):
        steps.append(env.apply_local(pose, tok.motion_table[kind, enc["ids"][..., n]]))  # [B, A, spt, 3]
        pose = steps[-1][..., -1, :]
    assert torch.allclose(torch.cat(steps, -2), tok.decode(enc["pose"][:, :, 0], enc["ids"], kind), atol=1e-5)


def test_stopped_agent_is_token_zero_and_exact(tok, test_scenes):
    enc = tok.encode(test_scenes)
    stopped = 24 + 12 + 8                                           # index of the stopped vehicle
    assert (enc["ids"][:, stopped] == 0).all() and enc["id_valid"][:, stopped].all()
    rec, _ = reconstruct(tok, enc, test_scenes.agent_type)          # [B, A, T - 1, 3]
    assert torch.equal(rec[:, stopped, :, :2], test_scenes.pos[:, stopped, 1:])


def test_late_vanishing_and_gap_agents(tok, test_scenes):
    enc = tok.encode(test_scenes)
    A = 24 + 12 + 8 + 4
    late, gone, gap = A - 3, A - 2, A - 1
    log = log_poses(test_scenes)                                    # [B, A, T, 3]
    # appears at step 23: first valid boundary is step 24 (n = 12); earlier ids invalid and 0
    assert not enc["id_valid"][:, late, :12].any() and (enc["ids"][:, late, :12] == 0).all()
    assert enc["id_valid"][:, late, 12:].all() and not enc["pose_valid"][:, late, :12].any()
    assert torch.equal(enc["pose"][:, late, 12], log[:, late, 24])  # starts at the logged pose
    # valid through step 61: last boundary 60 (n = 30); ids after are invalid
    assert enc["id_valid"][:, gone, :30].all() and not enc["id_valid"][:, gone, 30:].any()
    assert (enc["ids"][:, gone, 30:] == 0).all()
    # missing 30..44: tokens touching boundaries 30..44 invalid; re-anchored at step 46 (n = 23)
    assert not enc["id_valid"][:, gap, 14:23].any() and enc["id_valid"][:, gap, 23:].all()
    assert torch.equal(enc["pose"][:, gap, 23], log[:, gap, 46])
    # only their few valid steps off the token grid (23, 45, 61) go uncovered
    r = reconstruction_error(tok, test_scenes.select([0]))
    assert r["vehicle"]["coverage"] > 0.99


def test_anchor_now_uses_logged_pose(tok, test_scenes):
    enc = tok.encode(test_scenes)
    n0 = NOW // 2
    ok = enc["pose_valid"][:, :, n0]
    assert torch.equal(enc["pose"][:, :, n0][ok], log_poses(test_scenes)[:, :, NOW][ok])


def test_heading_flip_removed():
    yaw = torch.tensor([[[0.1, 0.1, 0.1 + math.pi, 0.12, 0.5]]])    # [1, 1, 5]
    valid = torch.ones(1, 1, 5, dtype=torch.bool)
    out = remove_heading_flips(yaw, valid)
    assert torch.allclose(out, torch.tensor([[[0.1, 0.1, 0.1, 0.12, 0.5]]]))


def test_spt5(train, test_scenes):
    tok5 = MotionTokenizer.fit(train, TokenizerConfig(K=200, steps_per_token=5))
    assert tok5.table.shape == (3, 200, 5, 3) and tok5.N == 18 and tok5.n0 == 2
    enc = tok5.encode(test_scenes)
    assert enc["ids"].shape == (2, test_scenes.A, 18) and enc["pose"].shape == (2, test_scenes.A, 19, 3)
    decoded = tok5.decode(enc["pose"][:, :, 0], enc["ids"], test_scenes.agent_type)
    assert decoded.shape == (2, test_scenes.A, 90, 3)
    v = reconstruction_error(tok5, train)["vehicle"]  # 0.5 s tokens are coarser (SMART uses 2048 of them)
    assert v["pos_mean"] < 0.2 and v["late_future"] < 2 * v["early_future"] + 0.05


def test_state_dict_round_trip_and_mismatch(tok, test_scenes):
    buf = io.BytesIO()
    torch.save(tok.state_dict(), buf)
    buf.seek(0)
    d = torch.load(buf, weights_only=True)
    back = MotionTokenizer.from_state_dict(d, K=200, steps_per_token=2)
    assert torch.equal(back.table, tok.table) and back.cfg == tok.cfg and back.tol_used == tok.tol_used
    assert torch.equal(back.encode(test_scenes)["ids"], tok.encode(test_scenes)["ids"])
    with pytest.raises(ValueError, match="K=200.*K=100"):
        MotionTokenizer.from_state_dict(d, K=100)
    with pytest.raises(ValueError, match="steps_per_token=2.*steps_per_token=5"):
        MotionTokenizer.from_state_dict(d, steps_per_token=5)
    with pytest.raises(ValueError, match="steps_per_token=3"):
        MotionTokenizer.fit(test_scenes, TokenizerConfig(steps_per_token=3))


def test_fit_is_deterministic(train):
    small = train.select([0])
    a = MotionTokenizer.fit(small, TokenizerConfig(K=40, seed=3))
    b = MotionTokenizer.fit(small, TokenizerConfig(K=40, seed=3))
    c = MotionTokenizer.fit(small, TokenizerConfig(K=40, seed=4))
    assert torch.equal(a.table, b.table)
    assert not torch.equal(a.table, c.table)


def test_types_absent_from_the_logs_still_get_k_tokens():
    only_cars = synthetic_scene(7, n_per_type=(6, 0, 0))
    tok = MotionTokenizer.fit(only_cars, TokenizerConfig(K=60))
    for c in range(3):
        assert len(torch.unique(tok.table[c].reshape(60, -1), dim=0)) == 60
    with pytest.raises(ValueError, match="envelope"):
        MotionTokenizer.fit(only_cars, TokenizerConfig(K=8, envelope=8))


def test_fixed_tolerance(train):
    tok = MotionTokenizer.fit(train.select([0]), TokenizerConfig(K=50, tol=(0.1, 0.05, 0.1)))
    assert tok.tol_used == (0.1, 0.05, 0.1) and tok.table.shape == (3, 50, 2, 3)


def test_real_womd_scenes():
    if find_womd_examples() is None:
        pytest.skip("WOMD example scenes not found (set WOMD_EXAMPLES or add ../shared/data/womd_examples)")
    womd = load_womd_dir(find_womd_examples())
    for spt in (2, 5):
        # fitted on the same scenes
        tok = MotionTokenizer.fit(womd, TokenizerConfig(K=200, steps_per_token=spt))
        r = reconstruction_error(tok, womd)
        assert r["vehicle"]["pos_mean"] < 0.05 and r["vehicle"]["pos_p95"] < 0.15
        assert r["pedestrian"]["pos_mean"] < 0.05
        assert r["vehicle"]["last_future"] < 0.1
