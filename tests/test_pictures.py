"""The pictures: which scene is shown, which events are marked, and that the figures are written."""
import dataclasses
import math

import pytest
import torch
from PIL import Image

import pictures
from scenes import NOW, T
from toy_scenes import make_toy_scenes
from wosac_metrics import log_as_rollouts


@pytest.fixture(scope="module")
def toy():
    """Four toy scenes shared by the tests of this file (generating them is the slow part)."""
    return make_toy_scenes(4, seed=1)


def _apart(scenes):
    """Every agent parked alone: agent i of every scene at (100 i, 0), heading east, all scored
    vehicles. No pair is within 15 m, so no scene has a crossing pair yet."""
    B, A = scenes.B, scenes.A
    x = 100.0 * torch.arange(A, dtype=torch.float32)                      # [A]
    pos = torch.stack([x, torch.zeros(A)], -1)[None, :, None].expand(B, A, T, 2).clone()  # [B, A, T, 2]
    return dataclasses.replace(scenes, pos=pos, yaw=torch.zeros(B, A, T),
                               valid=torch.ones(B, A, T, dtype=torch.bool),
                               eval_mask=torch.ones(B, A, dtype=torch.bool),
                               agent_type=torch.zeros(B, A, dtype=torch.long))


def test_busiest_scene_counts_vehicles_crossing_not_following_meeting_or_walking(toy):
    s = _apart(toy)
    pos, yaw, typ, scored = s.pos.clone(), s.yaw.clone(), s.agent_type.clone(), s.eval_mask.clone()
    # scene 0: agent 1 follows agent 0 5 m behind, agent 3 meets agent 2 head-on 4 m to the side
    pos[0, 1] = pos[0, 0] - torch.tensor([5.0, 0.0])
    pos[0, 3] = pos[0, 2] + torch.tensor([0.0, 4.0])
    yaw[0, 3] = math.pi
    # scene 1: two crossing pairs (0 x 1 and 2 x 3), each 6 m apart at right angles
    for i, j in ((0, 1), (2, 3)):
        pos[1, j] = pos[1, i] + torch.tensor([6.0, 0.0])
        yaw[1, j] = math.pi / 2
    # scene 2: the same two crossings, but one is a pedestrian and the other is not scored
    pos[2], yaw[2] = pos[1], yaw[1]
    typ[2, 1] = 1
    scored[2, 3] = False
    # scene 3: one crossing, only at step 30 (a logged future step on the 5-step grid)
    pos[3, 1, 30] = pos[3, 0, 30] + torch.tensor([0.0, 8.0])
    yaw[3, 1, 30] = -math.pi / 2
    s = dataclasses.replace(s, pos=pos, yaw=yaw, agent_type=typ, eval_mask=scored)
    assert pictures.crossing_pairs(s).tolist() == [0, 2, 0, 1]
    assert pictures.busiest_scene(s) == 1
    # no crossing anywhere: the scene with more scored agents wins, then the first one
    flat = _apart(toy.select([0, 1, 2]))
    fewer = flat.eval_mask.clone()
    fewer[0, 0] = False
    assert pictures.busiest_scene(dataclasses.replace(flat, eval_mask=fewer)) == 1
    assert pictures.busiest_scene(flat) == 0


def test_first_events_find_the_first_contact_and_the_first_off_road_step(toy):
    scenes = toy.select([0])
    pos, z, yaw = log_as_rollouts(scenes)                                 # [1, 1, A, 80, ...]
    log_valid = scenes.valid[:, None, :, NOW + 1:]                         # [1, 1, A, 80]
    clean = pictures.first_events(scenes, pos, z, yaw, log_valid)
    assert (clean["collision"] == -1).all() and (clean["offroad"] == -1).all()   # toy logs are clean
    # from future step 30 agent 1 sits 0.5 m behind agent 0; from step 50 agent 2 drifts 40 m left
    pos, yaw = pos.clone(), yaw.clone()
    heading = torch.stack([yaw[0, 0, 0, 30:].cos(), yaw[0, 0, 0, 30:].sin()], -1)  # [50, 2]
    pos[0, 0, 1, 30:] = pos[0, 0, 0, 30:] - 0.5 * heading
    yaw[0, 0, 1, 30:] = yaw[0, 0, 0, 30:]
    left = torch.stack([-yaw[0, 0, 2, 50:].sin(), yaw[0, 0, 2, 50:].cos()], -1)  # [30, 2]
    pos[0, 0, 2, 50:] += torch.linspace(0.0, 40.0, 30)[:, None] * left
    ev = pictures.first_events(scenes, pos, z, yaw, log_valid)
    assert ev["collision"][0, 0, :2].tolist() == [30, 30]
    assert ev["offroad"][0, 0, 2] > 50
    others = torch.ones(scenes.A, dtype=torch.bool)
    others[:3] = False
    assert (ev["collision"][0, 0, others] == -1).all() and (ev["offroad"][0, 0, others] == -1).all()


def test_crop_is_one_square_around_the_log(toy):
    scenes = toy.select([2])
    (x0, y0), side = pictures.crop(scenes, 0)
    sim = scenes.valid[0, :, NOW]
    now = scenes.pos[0, sim, NOW]                                          # [n, 2]
    centre = now.median(0).values
    assert x0 < centre[0] < x0 + side and y0 < centre[1] < y0 + side
    assert side < 250.0                                                    # a crop, not the whole map


def test_plot_rollouts_has_the_log_and_one_panel_per_method_and_the_gif_is_written(toy, tmp_path):
    scenes = toy
    b = pictures.busiest_scene(scenes)
    one = scenes.select([b])
    pos, z, yaw = (x[0, 0] for x in log_as_rollouts(one))                  # [A, 80, 2], [A, 80] x2
    frozen = (one.pos[0, :, NOW, None].expand_as(pos), z, one.yaw[0, :, NOW, None].expand_as(yaw))
    rollouts = {"replay": (pos, z, yaw), "frozen": frozen}
    titles = pictures.plot_rollouts(tmp_path / "r.png", scenes, rollouts, b=b)
    assert [t.split("\n")[0] for t in titles] == ["log", "replay", "frozen"]
    n = int((one.eval_mask & one.valid[:, :, NOW]).sum())
    assert titles[0].endswith(f"0/{n} collide, 0/{n} off-road")
    assert "ADE 0.0 m" in titles[1]                                        # the log replayed has no error
    assert Image.open(tmp_path / "r.png").size[0] > 0
    pictures.animate_rollout(tmp_path / "r.gif", one, pos[None, None], z[None, None], yaw[None, None],
                             every=16, name="replay")
    assert Image.open(tmp_path / "r.gif").n_frames == 5
