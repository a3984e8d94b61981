"""The presets (presets.py): the paper preset builds a reference of the papers' size (>= 3M
parameters, ~50x the ~65k policy) that trains, `--preset paper --quick` runs the reference stage end
to end on a CPU, and a run of one preset never uses another preset's reference."""
import json
from dataclasses import replace

import pytest
import torch

import bench
import ppo_anchor as PA
import presets
import reference_model as RM
import scenes as S
import train
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes


def test_paper_reference_has_the_papers_size_and_one_step_lowers_its_loss():
    cfg = presets.reference_config("paper", quick=False)
    scenes = S.trim(make_toy_scenes(1, seed=5))[0]
    tok = MotionTokenizer.fit(scenes, TokenizerConfig(K=cfg.K, steps_per_token=cfg.steps_per_token, seed=0))
    torch.manual_seed(0)
    model = RM.ReferenceModel(presets.model_config(cfg), tok.table)
    spacer = PA.SpacerConfig()
    policy = PA.LateFusionPolicy(tok.K, spacer.embed, spacer.hidden, spacer.type_heads)
    assert model.n_params >= 3_000_000                                   # SPACeR's reference: 3.2M
    assert 60_000 <= PA.count_parameters(policy) <= 70_000              # SPACeR's policy: about 65k
    assert model.n_params / PA.count_parameters(policy) > 40             # the paper: 49x smaller
    assert presets.model_config(presets.reference_config("paper", quick=True)) == presets.model_config(cfg)

    enc = tok.encode(scenes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.eval()                                        # no dropout: the losses before and after compare
    before, _ = RM.bc_loss(model, scenes, enc, cfg.label_smoothing)
    opt.zero_grad()
    before.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    with torch.no_grad():
        after, _ = RM.bc_loss(model, scenes, enc, cfg.label_smoothing)
    assert torch.isfinite(grad_norm) and grad_norm > 0
    assert after < before


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="--preset.*'huge'"):
        presets.reference_config("huge", quick=False)
    assert train.main(["--stage", "reference", "--preset", "huge"]) == 2


def test_each_preset_has_its_own_runs_folder():
    assert train.parse_args(["--stage", "spacer"]).runs == "runs"
    assert train.parse_args(["--stage", "spacer", "--preset", "paper"]).runs == "runs/paper"
    assert train.parse_args(["--stage", "r1", "--preset", "paper", "--runs", "elsewhere"]).runs == "elsewhere"


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """`train.py --stage reference --preset paper --quick`, end to end (toy data in a temporary cache)."""
    runs, data = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("toy_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(presets, "PAPER_QUICK", dict(presets.PAPER_QUICK, cache_dir=str(data)))
        assert train.main(["--stage", "reference", "--preset", "paper", "--quick", "--device", "cpu",
                           "--runs", str(runs)]) == 0
    return runs


def test_paper_quick_runs_the_reference_stage_end_to_end(paper_run):
    out = paper_run / "reference"
    log = json.loads((out / "log.json").read_text())
    assert log["n_params"] >= 3_000_000 and log["config"]["preset"] == "paper"
    assert set(log["eval"]["results"]) == {"constant velocity", "BC", "CAT-K"}
    model, tok, cfg = RM.load_reference(out / "catk.pt")
    assert (cfg.D, cfg.layers, cfg.map_neighbours, tok.K) == (128, 6, 64, 200)


@pytest.mark.parametrize("stage", [["spacer"], ["spacer", "--anchor", "ppo"], ["r1"], ["eval"],
                                   ["reference", "--resume"]])
def test_a_run_of_another_preset_refuses_the_reference_naming_the_file(paper_run, stage):
    before = sorted(p.name for p in paper_run.rglob("*"))
    with pytest.raises(SystemExit, match=r"reference.(bc|catk)\.pt: a reference of --preset paper.*--preset "
                                         r"tutorial"):
        train.main(["--stage", *stage, "--quick", "--device", "cpu", "--runs", str(paper_run)])
    assert sorted(p.name for p in paper_run.rglob("*")) == before   # nothing written, nothing removed


def test_a_tutorial_checkpoint_without_a_preset_name_is_a_tutorial_one(tmp_path):
    """Checkpoints written before presets existed hold no name: they are the tutorial's."""
    old = {k: v for k, v in vars(presets.quick_config()).items() if k != "preset"}
    cfg = presets.ReferenceStageConfig(**old)
    assert train.same_preset(cfg, tmp_path / "bc.pt", "tutorial") is cfg
    with pytest.raises(SystemExit, match="bc.pt: a reference of --preset tutorial"):
        train.same_preset(replace(cfg), tmp_path / "bc.pt", "paper")


def test_bench_sizes_reports_both_references_side_by_side():
    """bench.py --only sizes at a tiny batch: its documented keys, and ratios that are the quotients of
    the figures beside them (speed is measured there, never asserted here)."""
    fig = bench.bench_sizes(make_toy_scenes(2, seed=777), torch.device("cpu"), scenes=1, R=2, repeats=1,
                              bc_scenes=1)
    for preset in presets.PRESETS:
        ref_rate = fig[f"sizes_{preset}_reference_rollout_scenarios_per_s"]
        policy_rate = fig["sizes_policy_rollout_scenarios_per_s"]
        assert fig[f"sizes_speedup_vs_{preset}"] == pytest.approx(policy_rate / ref_rate)
        assert fig[f"sizes_smaller_vs_{preset}"] == pytest.approx(
            fig[f"sizes_{preset}_reference_params"] / fig["sizes_policy_params"])
        assert f"sizes_{preset}_reference_params" in bench.__doc__
    assert fig["sizes_paper_reference_params"] >= 3_000_000 > fig["sizes_tutorial_reference_params"]
    assert {key for key, _, _ in bench.ROWS} >= {k for k in fig if not k.endswith("_cpu")}
