"""The Scenes contract: batching, the one atomic save, and the pose algebra of local frames."""
import json
import math

import pytest
import torch

from scenes import (apply_local, checksum_path, collate, load_scenes, read_file, save_atomic, save_scenes,
                    to_local, to_local_xy, wrap_angle)
from toy_scenes import make_toy_scenes, toy_dataset


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


# ----- read_file: every checkpoint, log and cache read gets a named error -----
def corrupt(tmp_path, kind: str):
    """A file of each broken kind; the .pt ones start from a real save_atomic (with its checksum)."""
    pt, js = tmp_path / "ck.pt", tmp_path / "log.json"
    save_atomic(dict(w=torch.arange(1000.0), step=3), pt)
    good = pt.read_bytes()
    if kind == "zero-byte":
        pt.write_bytes(b"")
    elif kind == "truncated":
        pt.write_bytes(good[: len(good) // 2])
        checksum_path(pt).unlink()                    # without the sidecar, torch itself fails to read it
    elif kind == "random-bytes":
        pt.write_bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8).numpy().tobytes())
        checksum_path(pt).unlink()
    elif kind == "bit-flip":                          # loads fine with torch; only the checksum sees it
        i = good.index(torch.arange(1000.0)[500:501].numpy().tobytes())
        pt.write_bytes(good[:i] + bytes([good[i] ^ 1]) + good[i + 1:])
        assert torch.load(pt, weights_only=True)["w"][500] != 500.0
    elif kind == "json-garbage":
        js.write_text('{"bc": [1, 2')
        return js
    elif kind == "json-list":
        js.write_text("[1, 2]")
        return js
    elif kind == "missing":
        pt.unlink()
    return pt


@pytest.mark.parametrize("kind, message", [
    ("zero-byte", "empty file"), ("truncated", "cannot be read as a torch file"),
    ("random-bytes", "cannot be read as a torch file"), ("bit-flip", "no longer match the checksum"),
    ("json-garbage", "not valid JSON"), ("json-list", "holds a list, expected"), ("missing", "not found")])
def test_read_file_names_the_file_what_it_expected_and_the_fix(tmp_path, kind, message):
    path = corrupt(tmp_path, kind)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        read_file(path, "a test checkpoint", "delete it and rerun")
    text = str(e.value)
    assert str(path) in text and "a test checkpoint" in text and "delete it and rerun" in text
    assert "weights_only=False" not in text and "weights_only" not in text  # never advise an unsafe load
    assert isinstance(e.value, FileNotFoundError) == (kind == "missing")


def test_read_file_checks_keys_and_reads_a_good_file(tmp_path):
    save_atomic(dict(w=torch.ones(2), step=3), tmp_path / "ck.pt")
    assert read_file(tmp_path / "ck.pt", "x", "y", keys=("w", "step"))["step"] == 3
    with pytest.raises(ValueError, match=r"lacks \['cfg'\], expected a policy; rerun"):
        read_file(tmp_path / "ck.pt", "a policy", "rerun", keys=("w", "cfg"))
    save_atomic(dict(a=1), tmp_path / "log.json")
    assert read_file(tmp_path / "log.json", "a log", "delete it") == {"a": 1}


def test_a_corrupt_toy_cache_is_rebuilt_with_a_note(tmp_path, capsys):
    fresh = toy_dataset("test", 2, seed=3, cache_dir=tmp_path)
    (path,) = tmp_path.glob("toy_test_*.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cached scenes"):
        load_scenes(path)
    again = toy_dataset("test", 2, seed=3, cache_dir=tmp_path)
    assert f"rebuilding the cache, the file on disk is unusable: {path}" in capsys.readouterr().out
    assert torch.equal(again.pos, fresh.pos) and load_scenes(path).scene_id == fresh.scene_id
