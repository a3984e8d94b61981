"""Tests of the real-scene loader (scenes.py, section "Real WOMD scenes").

A tiny hand-made scene checks every rule with known answers and feeds the broken-file tests, so
those run everywhere; the checks on the 8 real scenes skip when the examples folder is absent.
"""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as E
import tokenizer
from scenes import CROSSWALK, LANE, NOW, OTHER, ROAD_EDGE, T, TL_STATES
from toy_scenes import make_toy_scenes
from womd import find_womd_examples, load_womd_dir, load_womd_json, missing_womd_examples

EXAMPLES = find_womd_examples()
needs_examples = pytest.mark.skipif(
    EXAMPLES is None,
    reason="WOMD example scenes not found (set WOMD_EXAMPLES or provide ../shared/data/womd_examples)")
TL_FILE = "tfrecord-00000-of-00150_2a173b334be3d32c.json"
SENT = -10000.0


# --------------------------------------------------------------------------------------------
# A tiny hand-made scene in the GPUDrive schema
# --------------------------------------------------------------------------------------------
def _object(kind, xy0, valid, expert=False, z=10.0):
    """Moves +1 m in x per step (10 m/s) from xy0; sentinels where invalid."""
    pos, vel, head = [], [], []
    for t in range(T):
        if valid[t]:
            pos.append({"x": xy0[0] + t, "y": xy0[1], "z": z})
            vel.append({"x": 10.0, "y": 0.0})
            head.append(0.0)
        else:
            pos.append({"x": SENT, "y": SENT, "z": SENT})
            vel.append({"x": SENT, "y": SENT})
            head.append(SENT)
    last = max(t for t in range(T) if valid[t])
    return {"position": pos, "width": 2.0, "length": 4.5, "height": 1.5, "heading": head, "velocity": vel,
            "valid": list(valid), "goalPosition": pos[last], "type": kind, "id": len(kind),
            "mark_as_expert": expert}


def _tiny():
    everywhere = [True] * T
    ped_valid = [5 <= t <= 50 for t in range(T)]
    objects = [
        _object("other", (2000.0, 2000.0), everywhere),                 # 0: dropped
        _object("vehicle", (1000.0, 500.0), everywhere, expert=True),   # 1: log replay only
        _object("pedestrian", (1000.0, 520.0), ped_valid, z=11.0),      # 2
        _object("vehicle", (980.0, 480.0), everywhere),                 # 3: the SDC
    ]
    pt = lambda x, y: {"x": x, "y": y, "z": 3.0}
    roads = [
        {"geometry": [pt(1000, 500)], "type": "stop_sign", "map_element_id": 17, "id": 1},
        {"geometry": [pt(990, 490), pt(995, 490), pt(995, 495), pt(990, 495)], "type": "crosswalk",
         "map_element_id": 18, "id": 2},
        {"geometry": [pt(950, 500), pt(1000, 500), pt(1050, 500)], "type": "lane", "map_element_id": 2,
         "id": 7},
        {"geometry": [pt(950, 490), pt(1000, 490), pt(1050, 490)], "type": "road_edge", "map_element_id": 15,
         "id": 8},
        {"geometry": [pt(1000, 450), pt(1000, 550)], "type": "lane", "map_element_id": 2, "id": 9},
    ]
    tl = {
        "9": {"state": ["stop"] * 10, "x": [1000.0 + 0.1 * k for k in range(10)], "y": [480.0] * 10,
              "z": [3.0] * 10, "time_index": list(range(20, 30)), "lane_id": [9] * 10},
        "7": {"state": ["go"] * T, "x": [1020.0] * T, "y": [500.0] * T, "z": [3.0] * T,
              "time_index": list(range(T)), "lane_id": [7] * T},
        "12345": {"state": ["stop"], "x": [0.0], "y": [0.0], "z": [0.0], "time_index": [0],
                  "lane_id": [12345]},
    }
    meta = {"sdc_track_index": 3, "objects_of_interest": [],
            "tracks_to_predict": [{"track_index": 0, "difficulty": 1}, {"track_index": 2, "difficulty": 1}]}
    return {"name": "tiny.json", "scenario_id": "tiny", "objects": objects, "roads": roads, "tl_states": tl,
            "metadata": meta}


def _write(tmp_path, d, name="scene.json"):
    p = tmp_path / name
    p.write_text(d if isinstance(d, str) else json.dumps(d))
    return p


ORIGIN = np.array([(1010 + 1010 + 990) / 3, (500 + 520 + 480) / 3])  # valid agents at NOW (not 'other')


def test_tiny_scene_known_answers(tmp_path):
    s = load_womd_json(_write(tmp_path, _tiny()))
    assert s.B == 1 and s.A == 3 and s.scene_id == ["tiny"]                      # 'other' dropped
    assert s.agent_type[0].tolist() == [0, 1, 0]
    assert s.controlled[0].tolist() == [False, True, True]                         # expert is log-only
    assert s.eval_mask[0].tolist() == [False, True, True]                          # SDC + remapped track 2
    # centred: the file's position minus the origin; z untouched (same frame as the map)
    assert np.allclose(s.pos[0, 1, NOW].numpy(), np.array([1000 + NOW, 520]) - ORIGIN, atol=1e-3)
    assert s.pos[0, :, NOW].mean(0).abs().max() < 1e-3
    assert s.z[0, 1, 20] == 11.0 and s.seg_start[0, 0, 2] == 3.0
    # sentinels of the pedestrian's unobserved steps are zeros, and it is unobserved there
    assert s.valid[0, 1].tolist() == [5 <= t <= 50 for t in range(T)]
    for x in (s.pos[0, 1, :5], s.vel[0, 1, 51:], s.yaw[0, 1, :5], s.z[0, 1, 51:]):
        assert (x == 0).all()
    assert np.allclose(s.goal[0, 1].numpy(), np.array([1050, 520]) - ORIGIN, atol=1e-3)  # last valid step 50
    assert s.size[0, 0].tolist() == [4.5, 2.0, 1.5]
    # map: stop sign dropped, crosswalk closed (4 edges), lane 2 + edge 2 + lane 1 segments
    assert s.seg_start.shape[1] == 4 + 2 + 2 + 1
    assert s.seg_type[0].tolist() == [CROSSWALK] * 4 + [LANE] * 2 + [ROAD_EDGE] * 2 + [LANE]
    assert s.seg_poly[0].tolist() == [0] * 4 + [1] * 2 + [2] * 2 + [3]
    assert torch.equal(s.seg_end[0, 3], s.seg_start[0, 0])                        # closing edge
    edge = s.seg_start[0, s.seg_type[0] == ROAD_EDGE, :2].numpy()                  # file order kept
    assert np.allclose(edge, np.array([[950, 490], [1000, 490]]) - ORIGIN, atol=1e-3)
    # signals: the unknown lane 12345 dropped; lane ids -> polyline index after the dropped stop sign
    assert s.tl_lane[0].tolist() == [3, 1]
    expect = [TL_STATES.index("stop") if 20 <= t < 30 else 0 for t in range(T)]
    assert s.tl_state[0, 0].tolist() == expect
    assert (s.tl_state[0, 1] == TL_STATES.index("go")).all()
    assert np.allclose(s.tl_stop[0, 0, :21].numpy(), np.array([1000, 480]) - ORIGIN, atol=1e-3)  # filled
    assert np.allclose(s.tl_stop[0, 0, 25].numpy(), np.array([1000.5, 480]) - ORIGIN, atol=1e-3)


def test_sentinel_on_a_valid_step_is_unobserved(tmp_path):
    d = _tiny()
    d["objects"][3]["position"][60] = {"x": SENT, "y": SENT, "z": SENT}   # valid stays true
    s = load_womd_json(_write(tmp_path, d))
    assert not s.valid[0, 2, 60] and s.valid[0, 2, 59] and (s.pos[0, 2, 60] == 0).all() and s.z[0, 2, 60] == 0


def test_max_agents_keeps_scored_then_nearest(tmp_path):
    p = _write(tmp_path, _tiny())
    two = load_womd_json(p, max_agents=2)
    assert two.A == 2 and two.eval_mask[0].all() and two.agent_type[0].tolist() == [1, 0]
    one = load_womd_json(p, max_agents=1)
    assert one.agent_type[0].tolist() == [0] and one.pos[0, 0, 0, 0] < -20    # the SDC (distance 0)
    with pytest.raises(ValueError, match="max_agents"):
        load_womd_json(p, max_agents=0)


def _set(path, value):
    """A mutation that sets d[path...] = value."""
    def f(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return f


BROKEN = [
    ("missing-objects", lambda d: d.pop("objects"), "objects: missing"),
    ("short-position", lambda d: d["objects"][2]["position"].pop(),
     r"objects\[2\]\.position: expected 91 entries, got 90"),
    ("bad-type", _set(["objects", 1, "type"], "spaceship"),
     r"objects\[1\]\.type: unknown agent type 'spaceship'"),
    ("heading-string", _set(["objects", 3, "heading", 7], "north"),
     r"objects\[3\]\.heading\[7\]: expected a number"),
    ("valid-int", _set(["objects", 1, "valid", 3], 1), r"objects\[1\]\.valid\[3\]: expected true/false"),
    ("size-string", _set(["objects", 3, "width"], "wide"), r"objects\[3\]\.width: expected int or float"),
    ("point-no-y", lambda d: d["roads"][1]["geometry"][2].pop("y"),
     r"roads\[1\]\.geometry\[2\]\.y: expected a number"),
    ("road-type", _set(["roads", 2, "type"], "highway"), r"roads\[2\]\.type: unknown road type"),
    ("sdc-range", _set(["metadata", "sdc_track_index"], 4), r"metadata\.sdc_track_index: 4 is not an index"),
    ("tl-state", _set(["tl_states", "7", "state", 0], "purple"),
     r"tl_states\['7'\]\.state\[0\]: unknown signal state"),
    ("nan", _set(["objects", 2, "velocity", 9, "x"], float("nan")),
     r"objects\[2\]\.velocity\[9\]\.x: non-finite"),
    # ranges: what float32 cannot hold, and what no real scene holds (womd.MAX_COORD, MAX_SIZE)
    ("float32-inf", _set(["objects", 3, "position", 30, "y"], 1e308),
     r"objects\[3\]\.position\[30\]\.y: non-finite value, or too large for float32"),
    ("far-agent", _set(["objects", 3, "position", 20, "x"], 3e38),
     r"objects\[3\]\.position\[20\]\.x: 3e\+38 m"),
    ("far-agent-z", _set(["objects", 1, "position", 40, "z"], -2e5),
     r"objects\[1\]\.position\[40\]\.z: -200000 m"),
    ("fast-agent", _set(["objects", 2, "velocity", 9, "y"], 1e6),
     r"objects\[2\]\.velocity\[9\]\.y: 1e\+06 m/s"),
    ("far-map", _set(["roads", 2, "geometry", 1, "x"], 2e5),
     r"roads\[2\]\.geometry\[1\]\.x: 198997 m from the scene origin"),
    ("far-stop", _set(["tl_states", "7", "x", 5], -1e6), r"tl_states\['7'\]\.x\[5\]: -1.001e\+06 m"),
    ("length-nan", _set(["objects", 3, "length"], float("nan")),
     r"objects\[3\]\.length: nan m; expected a finite"),
    ("width-zero", _set(["objects", 1, "width"], 0),
     r"objects\[1\]\.width: 0\.0 m; expected a finite size > 0"),
    ("height-negative", _set(["objects", 2, "height"], -1.5), r"objects\[2\]\.height: -1\.5 m"),
    ("length-huge", _set(["objects", 3, "length"], 150.0), r"objects\[3\]\.length: 150\.0 m; .* < 100 m"),
    # nothing to simulate
    ("no-valid-agent", lambda d: [o.update(valid=[False] * T) for o in d["objects"][1:]],
     r"objects\[\*\]\.valid: no agent is valid at any step"),
    ("none-valid-now", lambda d: [o["valid"].__setitem__(NOW, False) for o in d["objects"][1:]],
     r"objects\[\*\]\.valid\[10\]: no agent is valid at step 10"),
    ("top-list", lambda d: [d], "top level: expected a JSON object"),
]


@pytest.mark.parametrize("name,mutate,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_names_file_and_field(tmp_path, name, mutate, message):
    d = copy.deepcopy(_tiny())
    out = mutate(d)
    p = _write(tmp_path, out if name == "top-list" else d, f"{name}.json")
    with pytest.raises(ValueError, match=message) as e:
        load_womd_json(p)
    assert str(p) in str(e.value)


def test_truncated_json(tmp_path):
    text = json.dumps(_tiny())
    p = _write(tmp_path, text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_womd_json(p)
    assert str(p) in str(e.value)


def test_dir_and_finder(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no \\*.json"):
        load_womd_dir(tmp_path)
    monkeypatch.setenv("WOMD_EXAMPLES", str(tmp_path))
    assert find_womd_examples() is None                                  # a folder with no scenes
    _write(tmp_path, _tiny(), "b.json"); _write(tmp_path, dict(_tiny(), scenario_id="first"), "a.json")
    assert find_womd_examples() == tmp_path
    batch = load_womd_dir(tmp_path)
    assert batch.B == 2 and batch.scene_id == ["first", "tiny"]           # sorted by file name


# --------------------------------------------------------------------------------------------
# The 8 real scenes
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def womd():
    files = sorted(EXAMPLES.glob("*.json"))
    return {f.name: (load_womd_json(f), json.loads(f.read_text())) for f in files}


@needs_examples
def test_all_scenes_load_clean(womd):
    assert len(womd) == 8
    for name, (s, raw) in womd.items():
        A, S = s.A, s.seg_start.shape[1]
        assert s.pos.shape == (1, A, T, 2) and s.tl_state.shape[2] == T and s.seg_end.shape == (1, S, 3)
        assert s.scene_id == [raw["scenario_id"]]
        for k, v in s.tensors().items():
            if v.is_floating_point() and v.numel():
                assert torch.isfinite(v).all() and v.abs().max() <= 1e4, (name, k)   # no sentinel, centred
        m = s.valid[0]                                                                # [A, T]
        assert s.pos[0, m[:, NOW], NOW].mean(0).abs().max() < 1e-3, name
        for x in (s.pos[0][~m], s.vel[0][~m], s.yaw[0][~m], s.z[0][~m]):
            assert (x == 0).all(), name
        assert m.any(1).all() and (s.yaw[0].abs() <= math.pi).all()
        last = T - 1 - m.flip(1).float().argmax(1)                                    # [A]
        assert torch.equal(s.goal[0], s.pos[0, torch.arange(A), last]), name
        assert (s.seg_type[0] == ROAD_EDGE).sum() > 0, name


@needs_examples
def test_eval_mask_is_sdc_and_tracks_to_predict(womd):
    for name, (s, raw) in womd.items():
        meta = raw["metadata"]
        want = {meta["sdc_track_index"]} | {t["track_index"] for t in meta["tracks_to_predict"]}
        assert set(torch.nonzero(s.eval_mask[0]).flatten().tolist()) == want, name   # no type dropped here
        assert s.eval_mask[0, meta["sdc_track_index"]]


@needs_examples
@pytest.mark.parametrize("stem,objects,types,valid_now,expert,edges", [
    ("6d2a107f2e8390a", 18, (18, 0, 0), 7, 0, 44),
    ("b065dcb23730589b", 49, (47, 1, 1), 25, 0, 40),
    ("efc5cbe01b4a526f", 62, (58, 3, 1), 35, 1, 19),   # the expert is valid at NOW: 34 controlled
])
def test_counts_match_format_table(womd, stem, objects, types, valid_now, expert, edges):
    (s, raw), = [v for k, v in womd.items() if stem in k]
    assert s.A == objects
    assert torch.bincount(s.agent_type[0], minlength=3).tolist() == list(types)
    assert int(s.valid[0, :, NOW].sum()) == valid_now
    assert int(s.controlled[0].sum()) == valid_now - expert
    assert len(set(s.seg_poly[0, s.seg_type[0] == ROAD_EDGE].tolist())) == edges


@needs_examples
def test_road_edges_keep_file_order(womd):
    s, raw = womd[TL_FILE]
    first_edge = next(r for r in raw["roads"] if r["type"] == "road_edge")
    pts = np.array([[p["x"], p["y"]] for p in first_edge["geometry"]])          # [P, 2]
    poly = int(s.seg_poly[0, s.seg_type[0] == ROAD_EDGE][0])
    segs = s.seg_poly[0] == poly
    origin = pts[0] - s.seg_start[0, segs][0, :2].numpy().astype(np.float64)
    assert np.allclose(s.seg_start[0, segs, :2].numpy() + origin, pts[:-1], atol=0.05)
    assert np.allclose(s.seg_end[0, segs, :2].numpy() + origin, pts[1:], atol=0.05)


@needs_examples
def test_traffic_light_scene(womd):
    s, raw = womd[TL_FILE]
    assert s.tl_lane.shape[1] == 12 and s.tl_state.shape == (1, 12, T) and s.tl_stop.shape == (1, 12, T, 2)
    assert len(set(s.tl_lane[0].tolist())) == 12
    assert (s.seg_type[0, torch.isin(s.seg_poly[0], s.tl_lane[0])] == LANE).all()
    # each signal's polyline is the lane with that id: compare first points through the same origin
    roads = {r["id"]: r for r in raw["roads"]}
    edge0 = next(r for r in raw["roads"] if len(r["geometry"]) >= 2)
    origin = np.array([edge0["geometry"][0]["x"], edge0["geometry"][0]["y"]]) - s.seg_start[0, 0, :2].numpy()
    for l, key in enumerate(raw["tl_states"]):
        g = roads[int(key)]["geometry"][0]
        first = s.seg_start[0, s.seg_poly[0] == s.tl_lane[0, l]][0, :2].numpy()
        assert np.allclose(first + origin, [g["x"], g["y"]], atol=0.05), key
        sig = raw["tl_states"][key]
        t0 = sig["time_index"][0]
        assert s.tl_state[0, l, t0:].tolist() == [TL_STATES.index(n) for n in sig["state"]]
        assert (s.tl_state[0, l, :t0] == 0).all()                                   # missing -> unknown
        assert np.allclose(s.tl_stop[0, l, NOW].numpy() + origin, [sig["x"][0], sig["y"][0]], atol=0.05)
    assert (s.tl_state[0] == TL_STATES.index("stop")).any()


@needs_examples
def test_load_dir_with_max_agents(womd):
    full = {k: v[0] for k, v in womd.items()}
    batch = load_womd_dir(EXAMPLES, max_agents=16)
    assert batch.B == 8 and batch.A == 16 and batch.scene_id == [full[k].scene_id[0] for k in sorted(full)]
    for b, k in enumerate(sorted(full)):
        s = full[k]
        assert int(batch.eval_mask[b].sum()) == int(s.eval_mask.sum())             # scored agents kept
        n_keep = min(16, s.A)
        assert int(batch.valid[b].any(1).sum()) == n_keep                           # padding never valid
        if s.A > 16:  # kept controlled agents are the ones nearest the SDC
            sdc = json.loads((EXAMPLES / k).read_text())["metadata"]["sdc_track_index"]
            d = (s.pos[0, :, NOW] - s.pos[0, sdc, NOW]).norm(dim=-1)                # [A]
            ctrl = s.controlled[0] & ~s.eval_mask[0]
            kept = batch.controlled[b] & ~batch.eval_mask[b]                        # [A]
            kept_d = (batch.pos[b, :, NOW] - s.pos[0, sdc, NOW]).norm(dim=-1)[kept]
            dropped = d[ctrl].sort().values[len(kept_d):]
            if len(kept_d) and len(dropped):
                assert kept_d.max() <= dropped.min() + 1e-4


def test_missing_folder_is_named_not_skipped_silently(tmp_path, monkeypatch, capsys):
    """Before: load_womd_dir said 'no *.json scene files' for a folder that does not exist, and the
    eval stage and the tokenizer CLI did not say which folder they had checked."""
    gone = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere: the folder does not exist"):
        load_womd_dir(gone)
    monkeypatch.setenv("WOMD_EXAMPLES", str(gone))
    assert missing_womd_examples() == f"{gone} ($WOMD_EXAMPLES) does not exist"
    with pytest.raises(SystemExit, match=f"no WOMD example scenes: {gone}"):
        tokenizer.load_source("womd", 4)
    monkeypatch.setenv("WOMD_EXAMPLES", str(tmp_path))                      # a folder with no scenes
    assert missing_womd_examples() == f"{tmp_path} ($WOMD_EXAMPLES) holds no *.json scenes"
    toy = make_toy_scenes(1, seed=6)
    res = E.run_eval(tmp_path / "runs", "cpu", R=2, toy=toy, womd=True)
    assert list(res["suites"]) == ["toy"]
    out = capsys.readouterr().out
    assert f"the WOMD suite is skipped: {tmp_path} ($WOMD_EXAMPLES) holds no *.json scenes" in out
