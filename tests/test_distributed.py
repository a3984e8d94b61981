"""Data parallelism under torchrun (distributed.py), on CPU with gloo and 2 processes started by the
test (`python -m torch.distributed.run --nproc_per_node 2`): a distributed gradient step equals the
single-process step on the same global batch; a 2-process reference stage writes one set of files;
the sharded, gathered evaluation equals the single-process scores."""
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import distributed as D
import evaluate as E
import presets
import reference_model as RM
import scenes as S
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes

REPO = Path(__file__).resolve().parents[1]
CFG = dict(K=24, D=16, heads=2, layers=1, window=4, map_neighbours=4, agent_neighbours=3, dropout=0.0)
BATCH = [3, 0, 5, 1]                  # the global batch: 2 scenes per rank, different token counts
EVAL = dict(eval_R=2, eval_worlds=2, eval_top_k=8, eval_temperature=1.0, eval_R_scenes=3)


def torchrun(script: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def setting(seed: int = 0) -> tuple:
    """The toy scenes, tokenizer and freshly initialised model both sides start from."""
    torch.manual_seed(seed)
    scenes = make_toy_scenes(6, seed=3)
    tok = MotionTokenizer.fit(scenes, TokenizerConfig(K=CFG["K"], steps_per_token=2, seed=0))
    model = RM.ReferenceModel(RM.ReferenceConfig(steps_per_token=2, **CFG), tok.table)
    return scenes, tok, model


def one_step(model, tok, scenes, enc, phase: str) -> None:
    """One train_phase step (BC or CAT-K) on the global batch BATCH: this rank's shard under torchrun.
    The gradient is all-reduced before the clip, so the clip sees the global gradient's norm."""
    ddp = D.wrap(model)
    # plain SGD: Adam divides by |gradient|, which turns the float noise of a gradient that is zero
    # in exact arithmetic (an attention key bias) into a full step
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    s, tk = S.batch_of(scenes, enc, "cpu", D.shard(torch.tensor(BATCH)))
    if phase == "bc":
        loss, _ = RM.bc_loss(ddp, s, tk, 0.1, **D.token_mean())
    else:
        loss, _ = RM.catk_loss(model, tok, s, 8, tk, ddp, **D.token_mean())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def scores(model, tok, scenes) -> dict:
    cfg = replace(presets.quick_config(), **{k: v for k, v in EVAL.items() if k != "eval_R_scenes"})
    return E.evaluate_model(model, tok, scenes.select(slice(0, EVAL["eval_R_scenes"])), cfg, seed=7)


WORKER = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import distributed as D
import test_distributed as T
D.setup("cpu")
assert D.active() and D.world_size() == 2
out = {{}}
scenes, tok, model = T.setting()
enc = tok.encode_split(scenes)
for phase in ("bc", "catk"):
    T.one_step(model, tok, scenes, enc, phase)
    out[phase] = {{k: v.tolist() for k, v in model.state_dict().items()}}
model.eval()
out["eval"] = T.scores(model, tok, scenes)
if D.is_writer():
    json.dump(out, open(sys.argv[1], "w"))
D.cleanup()
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Both ranks' run of WORKER: the weights after a BC step, then a CAT-K step, and the scores."""
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    torchrun(script, str(tmp / "out.json"))
    return json.loads((tmp / "out.json").read_text())


def test_shard_is_the_identity_in_one_process_and_the_helpers_are_no_ops():
    idx = torch.tensor([4, 2, 7])
    assert not D.active() and D.rank() == 0 and D.world_size() == 1 and D.is_writer()
    assert D.shard(idx) is idx and D.token_mean() == {} and D.all_sum(2.5) == 2.5
    assert D.gather({"a": 1}) == [{"a": 1}] and D.wrap(idx) is idx


def test_shards_are_disjoint_equal_and_padded_by_repeating(monkeypatch):
    """The DistributedSampler rule on one batch: 5 indices over 2 ranks -> 3 + 3, the first repeated."""
    idx = torch.tensor([10, 11, 12, 13, 14])
    monkeypatch.setattr(D, "world_size", lambda: 2)
    parts = []
    for r in range(2):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        parts.append(D.shard(idx).tolist())
    assert parts == [[10, 12, 14], [11, 13, 10]]
    monkeypatch.setattr(D, "rank", lambda: 1)
    assert D.shard([1, 2, 3, 4]) == [2, 4]


@pytest.mark.parametrize("phase", ["bc", "catk"])
def test_a_distributed_step_equals_the_single_process_step_on_the_global_batch(two_ranks, phase):
    scenes, tok, model = setting()
    enc = tok.encode_split(scenes)
    one_step(model, tok, scenes, enc, "bc")
    if phase == "catk":                          # the worker took the CAT-K step after its BC step
        one_step(model, tok, scenes, enc, "catk")
    start = setting()[2].state_dict()
    moved = 0
    for k, v in model.state_dict().items():
        theirs = torch.tensor(two_ranks[phase][k], dtype=v.dtype)
        assert torch.allclose(v, theirs, rtol=1e-4, atol=1e-6), (phase, k, (v - theirs).abs().max())
        moved += int(not torch.equal(v, start[k]))
    assert moved > 5                             # the step did change the weights


def test_gathered_evaluation_equals_the_single_process_scores(two_ranks):
    scenes, tok, model = setting()
    enc = tok.encode_split(scenes)
    for phase in ("bc", "catk"):
        one_step(model, tok, scenes, enc, phase)
    mine = scores(model.eval(), tok, scenes)      # 3 scenes, one per chunk: rank 0 two, rank 1 one
    for k, v in mine.items():
        if k not in ("scenarios_per_s", "rollout_s"):   # timings
            assert two_ranks["eval"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


CHILD = """
import sys
from dataclasses import replace
import torch
torch.set_num_threads(1)
import presets
import train
cfg = replace(presets.quick_config(), **{tiny!r}, cache_dir={data!r})
presets.quick_config = lambda: cfg
sys.exit(train.main(sys.argv[1:]))
"""


def test_two_process_reference_stage_writes_one_set_of_files(tmp_path):
    tiny = dict(n_train=4, n_val=2, n_test=2, K=24, bc_epochs=2, catk_epochs=1, batch_size=2, eval_R=2,
                eval_worlds=2)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tiny=tiny, data=str(tmp_path / "data")))
    runs = tmp_path / "runs"
    done = torchrun(script, "--stage", "reference", "--quick", "--device", "cpu", "--runs", str(runs))
    files = sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*") if p.is_file())
    assert files == ["reference/bc.pt", "reference/bc.pt.sha256", "reference/catk.pt",
                     "reference/catk.pt.sha256", "reference/log.json"]     # one of each: rank 0 wrote
    log = json.loads((runs / "reference" / "log.json").read_text())
    assert [e["epoch"] for e in log["bc"]] == [1, 2] and [e["epoch"] for e in log["catk"]] == [1]
    assert set(log["eval"]["results"]) == {"constant velocity", "BC", "CAT-K"}
    assert log["eval"]["n_test"] == 2
    assert done.stdout.count("held-out toy test scenes") == 1     # rank 1 prints nothing
    assert torch.load(runs / "reference" / "catk.pt", weights_only=True)["epoch"] == 1
    resumed = torchrun(script, "--stage", "reference", "--quick", "--device", "cpu", "--runs", str(runs),
                       "--resume")
    assert "is complete" in resumed.stdout
