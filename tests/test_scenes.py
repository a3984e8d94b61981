"""The Scenes contract: batching, the one atomic save, and the pose algebra of local frames."""
import json
import math

import torch

from scenes import apply_local, collate, load_scenes, save_atomic, save_scenes, to_local, to_local_xy, wrap_angle
from toy_scenes import make_toy_scenes


def test_collate_select_repeat_and_save_round_trip(tmp_path):
    a, b = make_toy_scenes(1, seed=3), make_toy_scenes(1, seed=4)
    both = collate([a, b])                                          # padded to the larger A and S
    assert both.B == 2 and both.A == max(a.A, b.A)
    assert torch.equal(both.select([1]).pos[0, :b.A], b.pos[0])
    assert not both.select([0]).valid[0, a.A:].any()                # padding agents are never valid
    rep = both.repeat(3)
    assert rep.B == 6 and rep.scene_id[:3] == [a.scene_id[0]] * 3
    save_scenes(both, tmp_path / "s.pt")
    back = load_scenes(tmp_path / "s.pt")
    assert all(torch.equal(v, getattr(back, k)) for k, v in both.tensors().items())
    assert back.scene_id == both.scene_id and not list(tmp_path.glob("*.tmp"))


def test_save_atomic_json_and_torch(tmp_path):
    save_atomic({"x": [1, 2]}, tmp_path / "sub" / "log.json")
    assert json.loads((tmp_path / "sub" / "log.json").read_text()) == {"x": [1, 2]}
    save_atomic({"t": torch.arange(3)}, tmp_path / "ck.pt")
    assert torch.equal(torch.load(tmp_path / "ck.pt", weights_only=True)["t"], torch.arange(3))
    assert not list(tmp_path.rglob("*.tmp"))


def test_to_local_xy_is_the_inverse_rotation():
    xy = torch.tensor([[[1.0, 3.0]]])                               # [1, 1, 2]
    out = to_local_xy(xy, torch.tensor([[1.0, 2.0]]), torch.tensor([math.pi / 2]))  # [1, 1, 2]
    assert torch.allclose(out, torch.tensor([[[1.0, 0.0]]]), atol=1e-6)   # 1 m straight ahead
    pose = torch.tensor([0.5, -1.0, 0.3])
    world = apply_local(pose, torch.tensor([[2.0, 1.0, 0.1]]))      # [1, 3]
    assert torch.allclose(to_local(pose, world), torch.tensor([[2.0, 1.0, 0.1]]), atol=1e-6)


def test_pose_algebra():
    g = torch.Generator().manual_seed(0)
    pose = torch.randn(5, 3, generator=g) * 3                       # [5, 3]
    local = torch.randn(5, 4, 3, generator=g)                       # [5, 4, 3]
    world = apply_local(pose, local)                                # [5, 4, 3]
    back = to_local(pose, world)                                    # [5, 4, 3]
    assert torch.allclose(back[..., :2], local[..., :2], atol=1e-5)
    assert torch.allclose(wrap_angle(back[..., 2] - local[..., 2]), torch.zeros(5, 4), atol=1e-5)
    assert world[..., 2].abs().max() <= math.pi
    # a unit step forward from a pose facing +y moves +y
    out = apply_local(torch.tensor([1.0, 2.0, math.pi / 2]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[1.0, 3.0, math.pi / 2]]), atol=1e-6)


def test_apply_local_composes_rotation():
    pose = torch.tensor([1.0, 2.0, math.pi / 2])
    local = torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0]])
    out = apply_local(pose, local)
    assert torch.allclose(out[0], torch.tensor([1.0, 3.0, math.pi / 2 + 0.1]), atol=1e-6)
    assert torch.allclose(out[1, :2], torch.tensor([0.0, 2.0]), atol=1e-6)
