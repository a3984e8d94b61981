"""Tests of the centralized next-token reference model (reference_model.py) and its train.py stage."""
import json
from dataclasses import replace

import pytest
import torch

import presets
import reference_model as RM
import scenes as S
from scenes import NOW
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes

TINY = RM.ReferenceConfig(K=32, D=32, heads=2, layers=2, dropout=0.0, window=4, map_neighbours=6,
                          agent_neighbours=4)


def first_agents(scenes, k):
    """The first k agents of every scene (keeps the tests fast)."""
    t = scenes.tensors()
    for name in S.AGENT_FIELDS:
        t[name] = t[name][:, :k]
    return S.Scenes(**t, scene_id=list(scenes.scene_id))


@pytest.fixture(scope="module")
def toy():
    """A handful of toy scenes (8 agents each) and a small tokenizer fitted on them."""
    scenes = first_agents(make_toy_scenes(3, seed=123), 8)
    tok = MotionTokenizer.fit(scenes, TokenizerConfig(K=TINY.K, steps_per_token=TINY.steps_per_token))
    return scenes, tok


def tiny_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return RM.ReferenceModel(replace(TINY, **kw), tok.table)


def test_map_tokens_cut_polylines_into_pieces():
    """Known answer: a 10 m straight lane of 1 m segments gives two 5 m map tokens; a road edge of
    2 m segments going up is cut where a segment starts past 5 m (pieces of 6 m and 2 m), and
    never shares a token with the lane."""
    import numpy as np
    lane = np.stack([np.arange(11.0), np.zeros(11), np.zeros(11)], -1)            # [11, 3]
    edge = np.stack([np.full(5, 20.0), np.arange(5.0) * 2, np.zeros(5)], -1)      # [5, 3] 4 segments of 2 m
    seg = S.polylines_to_segments([lane, edge], [S.LANE, S.ROAD_EDGE], [2, 15])
    A = 1
    agents = dict(pos=np.zeros((A, S.T, 2)), z=np.zeros((A, S.T)), yaw=np.zeros((A, S.T)),
                  vel=np.zeros((A, S.T, 2)), valid=np.ones((A, S.T), bool), size=np.ones((A, 3)),
                  agent_type=np.zeros(A, int), controlled=np.ones(A, bool), eval_mask=np.ones(A, bool))
    scene = S.scene_from_numpy("known", agents, seg)
    mt = RM.map_tokens(scene, 5.0)
    assert mt["valid"].tolist() == [[True, True, True, True]]
    pose = mt["pose"][0]                                                          # [M, 3]
    expected = torch.tensor([[2.5, 0.0, 0.0], [7.5, 0.0, 0.0],
                             [20.0, 3.0, torch.pi / 2], [20.0, 7.0, torch.pi / 2]])              # [M, 3]
    assert torch.allclose(pose, expected, atol=1e-5), pose
    assert torch.allclose(mt["length"][0], torch.tensor([5.0, 5.0, 6.0, 2.0]))
    assert mt["type"][0].tolist() == [S.LANE, S.LANE, S.ROAD_EDGE, S.ROAD_EDGE]


def test_overfits_a_handful_of_scenes(toy):
    """BC on 3 scenes: the loss falls far below its start and the token accuracy rises."""
    scenes, tok = toy
    enc = tok.encode(scenes)
    model = tiny_model(tok, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, accs = [], []
    for _ in range(40):
        loss, acc = RM.bc_loss(model, scenes, enc, smoothing=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(acc.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert accs[-1] > accs[0] + 0.2, (accs[0], accs[-1])


def test_cached_rollout_equals_teacher_forced_pass(toy):
    """The step-by-step rollout with its KV cache gives the same distributions as one causal pass
    over the executed tokens; and a token changes only later steps' distributions (causality)."""
    scenes, tok = toy
    model = tiny_model(tok).eval()
    gen = torch.Generator().manual_seed(0)
    out = RM.closed_loop(model, tok, scenes, top_k=5, generator=gen, return_logits=True)
    with torch.no_grad():
        full = model(scenes, out["tokens"])                                   # [B, A, N, K]
    ok = out["tokens"]["pose_valid"][:, :, :-1]                               # [B, A, N]
    assert torch.allclose(full[ok], out["logits"][ok], atol=1e-4), (full[ok] - out["logits"][ok]).abs().max()
    # the SPACeR query rebuilds the poses from the ids alone and agrees too
    with torch.no_grad():
        lp = RM.log_p_ref(model, tok, scenes, out["tokens"]["ids"], out["tokens"]["id_valid"])
    assert torch.allclose(lp[ok], out["logits"].log_softmax(-1)[ok], atol=1e-4)
    # causality: change every agent's token at step n; steps <= n are unchanged, later ones move
    n = tok.n0 + 3
    tokens = {k: v.clone() for k, v in out["tokens"].items()}
    tokens["ids"][:, :, n] = (tokens["ids"][:, :, n] + 7) % tok.K
    with torch.no_grad():
        changed = model(scenes, tokens)
    assert torch.allclose(changed[:, :, :n + 1], full[:, :, :n + 1], atol=1e-5)
    assert (changed[:, :, n + 1] - full[:, :, n + 1])[ok[:, :, n + 1]].abs().max() > 1e-3


def test_checkpoint_round_trip(toy, tmp_path):
    scenes, tok = toy
    model = tiny_model(tok, seed=3).eval()
    enc = tok.encode(scenes)
    RM.save_checkpoint(tmp_path / "ref.pt", model, tok, epoch=1)
    loaded, tok2, cfg = RM.load_reference(tmp_path / "ref.pt")
    assert cfg == model.cfg and torch.equal(tok2.table, tok.table)
    with torch.no_grad():
        assert torch.equal(model(scenes, enc), loaded(scenes, enc))
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: not found .*--stage reference"):
        RM.load_reference(tmp_path / "missing.pt")
    # a checkpoint whose weights have another shape than its config says, then a truncated one
    d = torch.load(tmp_path / "ref.pt", weights_only=True)
    d["model"] = {k: torch.cat([v, v]) if v.dim() else v for k, v in d["model"].items()}  # [2 x, ...] each
    S.save_atomic(d, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt: not a reference checkpoint of this code \(RuntimeError: "
                                         r".*size mismatch.*--stage reference"):
        RM.load_reference(tmp_path / "wide.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ref.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut\.pt: cannot be read as a torch file .*expected a reference"):
        RM.load_reference(tmp_path / "cut.pt")


def test_rollout_shapes_determinism_and_log_replay(toy):
    scenes, tok = toy
    model = tiny_model(tok)
    s = S.Scenes(**scenes.tensors(), scene_id=list(scenes.scene_id))
    live = s.valid[:, :, NOW]                                                 # [B, A]
    # make the first live agent of every scene log-only: it must replay its log exactly
    first = torch.zeros_like(live)
    first[torch.arange(s.B), live.float().argmax(1)] = True
    s.controlled = s.controlled & ~first
    R = 3
    run = lambda seed: RM.rollout(model, tok, s, R=R, top_k=5, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    B, A, N = s.B, s.A, tok.N
    assert (a["traj"].shape == (B, R, A, 80, 3) and a["z"].shape == (B, R, A, 80)
            and a["ids"].shape == (B, R, A, N))
    assert torch.equal(a["traj"], b["traj"]) and torch.equal(a["ids"], b["ids"])
    assert not torch.equal(a["traj"], c["traj"])
    assert model.training  # rollout restores the mode it found
    log = torch.cat([s.pos, s.yaw[..., None]], -1)[:, None, :, NOW + 1:]     # [B, 1, A, 80, 3]
    log = log.expand(-1, R, -1, -1, -1)                                       # [B, R, A, 80, 3]
    keep = first[:, None].expand(-1, R, -1)                                   # [B, R, A]
    assert torch.equal(a["traj"][keep], log[keep])
    enc_ids = tok.encode(s)["ids"][:, None].expand(-1, R, -1, -1)             # [B, R, A, N]
    assert torch.equal(a["ids"][keep], enc_ids[keep])
    # controlled agents start from their log pose at step 10 and move by their tokens
    ctrl = (s.controlled & live)[:, None].expand(-1, R, -1)                   # [B, R, A]
    start = torch.cat([s.pos[:, :, NOW], s.yaw[:, :, NOW, None]], -1)[:, None]  # [B, 1, A, 3]
    step1 = tok.step_pose(start.expand(-1, R, -1, -1), a["ids"][..., tok.n0],
                          s.agent_type[:, None].expand(-1, R, -1))                # [B, R, A, spt, 3]
    assert torch.allclose(a["traj"][:, :, :, :tok.steps_per_token][ctrl], step1[ctrl], atol=1e-5)


def test_catk_choice_is_closest_among_top_k(toy):
    """CAT-K executes the top-k token nearest the logged next box, never a token outside the top-k,
    and the most likely token where there is no logged box."""
    _, tok = toy
    from scenes import apply_local
    from tokenizer import box_lw, corner_distance, corners_at
    kind = torch.zeros(1, 3, dtype=torch.long)                                # [1, 3] vehicles
    pose = torch.tensor([[[0.0, 0.0, 0.0], [5.0, -2.0, 1.0], [1.0, 1.0, -2.0]]])  # [1, 3, 3]
    j = 17
    target = apply_local(pose, tok.table[0, j, -1].expand(1, 3, 1, 3))[:, :, 0]  # [1, 3, 3] token j's end
    logits = torch.zeros(1, 3, tok.K)
    logits[0, 0, j] = 1.0                        # agent 0: j is in the top-k
    logits[0, 1, 1:6] = 5.0                      # agent 1: j is outside the top-5 = tokens 1..5
    logits[0, 1, j] = -10.0
    logits[0, 2, 3] = 2.0                        # agent 2: no logged box -> most likely token
    ok = torch.tensor([[True, True, False]])
    pick = RM.catk_choice(tok, logits, pose, target, ok, kind, top_k=5)
    cand = apply_local(pose[0, 1], tok.table[0, 1:6, -1])                     # [5, 3]
    lw = box_lw(kind[0, 1])
    nearest = 1 + int(corner_distance(corners_at(cand, lw), corners_at(target[0, 1], lw)).argmin())
    assert pick.tolist() == [[j, nearest, 3]]


def test_catk_targets_lead_back_to_the_log(toy):
    """CAT-K: recovery targets are the best match from the rolled-out pose, and the loss trains."""
    scenes, tok = toy
    model = tiny_model(tok)
    out = RM.closed_loop(model.eval(), tok, scenes, top_k=8, catk=True)
    n = tok.n0 + 2
    pose_n = out["tokens"]["pose"][:, :, n]
    log_next = torch.cat([scenes.pos, scenes.yaw[..., None]], -1)[:, :, (n + 1) * tok.steps_per_token]
    assert torch.equal(out["targets"][:, :, n], tok.match(pose_n, log_next, scenes.agent_type))
    assert torch.equal(out["target_valid"][:, :, n],
                       scenes.controlled & scenes.valid[:, :, NOW]
                       & scenes.valid[:, :, (n + 1) * tok.steps_per_token])
    model.train()
    loss, acc = RM.catk_loss(model, tok, scenes, top_k=8)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.head.parameters())


def test_resume_continues_from_the_saved_epoch(tmp_path, monkeypatch):
    """Interrupt after BC epoch 1, resume: BC epoch 2 and CAT-K run, the log keeps both epochs."""
    import train
    cfg = replace(presets.quick_config(), n_train=4, n_val=2, n_test=1, K=24, bc_epochs=2, catk_epochs=1,
                  batch_size=2, eval_R=2, cache_dir=str(tmp_path / "data"))
    monkeypatch.setattr(presets, "quick_config", lambda: cfg)
    real_save = RM.save_checkpoint

    def save_then_stop(path, *a, **kw):
        real_save(path, *a, **kw)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(RM, "save_checkpoint", save_then_stop)
    args = ["--stage", "reference", "--quick", "--device", "cpu", "--runs", str(tmp_path / "runs")]
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    out = tmp_path / "runs" / "reference"
    assert torch.load(out / "bc.pt", weights_only=True)["epoch"] == 1
    assert [e["epoch"] for e in json.loads((out / "log.json").read_text())["bc"]] == [1]
    monkeypatch.setattr(RM, "save_checkpoint", real_save)
    assert train.main(args + ["--resume"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert [e["epoch"] for e in log["bc"]] == [1, 2] and [e["epoch"] for e in log["catk"]] == [1]
    assert torch.load(out / "bc.pt", weights_only=True)["epoch"] == 2
    assert set(log["eval"]["results"]) == {"constant velocity", "BC", "CAT-K"}


def test_unknown_stage_exits_2():
    import train
    assert train.main(["--stage", "bogus"]) == 2


def test_logits_equal_per_agent_type_layers(toy):
    """The batched head (one matmul against all 3 types, then a gather) gives each agent exactly the
    logits of its own type's output layer, as gathering a [K, D] weight per agent did."""
    scenes, tok = toy
    model = tiny_model(tok)
    torch.nn.init.normal_(model.head_b)
    h = torch.randn(scenes.B, scenes.A, 5, TINY.D)                                # [B, A, N', D]
    kind = torch.arange(scenes.B * scenes.A).view(scenes.B, scenes.A) % 3         # [B, A] every type
    w, b = model.head_w[kind], model.head_b[kind]                                 # [B, A, K, D], [B, A, K]
    expected = torch.einsum("band,bakd->bank", model.head(h), w) + b[:, :, None]  # [B, A, N', K]
    assert torch.allclose(model.logits(h, kind), expected, atol=1e-5)
