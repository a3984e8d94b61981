"""The eval stage on toy scenes: every method judged the same way, missing ones listed as missing."""
import json

import dataclasses

import pytest
import torch

import evaluate as E
from env import EnvConfig, MultiAgentEnv
from evaluate import log_replay_events
from scenes import NOW, T
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes
from womd import find_womd_examples, load_womd_dir


def test_log_replay_reaches_every_goal_and_scores_near_perfect_min_ade():
    scenes = make_toy_scenes(2, seed=5)
    log = lambda s, R: tuple(x[:, None].expand(-1, R, *x.shape[1:]) for x in
                             (s.pos[:, :, NOW + 1:], s.z[:, :, NOW + 1:], s.yaw[:, :, NOW + 1:]))
    m = E.score_method(log, scenes, R=2, batch=1)
    scored = scenes.eval_mask & scenes.valid[:, :, NOW]
    # the goal is the last valid logged position: replaying the log reaches it unless the agent's
    # last valid step is at or before step 10
    last_after_now = scenes.valid[:, :, NOW + 1:].any(-1)
    expect = (scored & last_after_now).sum() / scored.sum()
    assert abs(m["goal_rate"] - float(expect)) < 1e-6
    assert m["min_ade"] < 1e-4 and m["collision_rate"] == 0.0 and m["offroad_rate"] == 0.0
    assert m["n_scenes"] == 2 and m["rollouts"] == 2 and m["scenarios_per_s"] > 0


def test_run_eval_lists_missing_checkpoints_and_ranks_the_ceiling_above_the_floor(tmp_path):
    toy = make_toy_scenes(2, seed=6)
    res = E.run_eval(tmp_path, "cpu", R=4, toy=toy, womd=False)
    table = res["suites"]["toy"]
    assert [name for name, _, _ in E.METHODS] == list(table)
    for name, rel, _ in E.METHODS:
        if rel is not None:           # no checkpoints were trained in tmp_path: each is listed as missing
            assert isinstance(table[name], str) and "no checkpoint" in table[name]
    assert table["human driver"]["realism_meta"] > table["constant velocity"]["realism_meta"]
    md = (tmp_path / "eval" / "results.md").read_text()
    assert md.count("missing: no checkpoint") == sum(rel is not None for _, rel, _ in E.METHODS)
    assert (tmp_path / "eval" / "rollouts_toy.png").stat().st_size > 0
    assert (tmp_path / "eval" / "rollout_toy_human_driver.gif").stat().st_size > 0   # the best one present
    # a second run keeps the unchanged scores instead of rolling out again
    again = E.run_eval(tmp_path, "cpu", R=4, toy=toy, womd=False)
    assert again["suites"]["toy"]["human driver"] == table["human driver"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["R"] == 4


def test_human_driver_outscores_constant_velocity_and_random_tokens():
    """The realism ceiling on toy scenes: the driver that wrote the logs, re-run with new seeds,
    scores above constant velocity and above agents that pick uniformly random motion tokens."""
    scenes = make_toy_scenes(3, seed=7)
    tok = MotionTokenizer.fit(make_toy_scenes(4, seed=8), TokenizerConfig(K=32, steps_per_token=2))
    gen = torch.Generator().manual_seed(0)

    def random_tokens(s, R):
        worlds = s.repeat(R)
        env = MultiAgentEnv(worlds, EnvConfig(mode="token"), token_table=tok.table)
        env.reset()
        for _ in range(40):                                                   # 80 steps of 0.2 s tokens
            env.step(torch.randint(0, 32, (worlds.B, worlds.A), generator=gen))  # [B*R, A]
        return tuple(x.unflatten(0, (s.B, R)) for x in env.rollout_future())  # [B, R, A, 80, ...]

    R = 4
    human = E.score_method(E.human_driver_rollout, scenes, R, batch=3)["realism_meta"]
    cv = E.score_method(E.constant_velocity, scenes, R, batch=3)["realism_meta"]
    rnd = E.score_method(random_tokens, scenes, R, batch=3)["realism_meta"]
    assert human > cv and human > rnd + 0.2


def test_log_replay_events_match_the_metric_on_clean_and_broken_logs():
    """evaluate.log_replay_events (the core of `python evaluate.py --env-report`): replaying clean toy
    logs through the env flags no collision and no off-road, as the metric finds on the same logs;
    and when a log is broken on purpose (one agent driven into another, one drifting sideways out of
    the road) the env and the metric flag exactly the same agents."""
    scenes = make_toy_scenes(2, seed=0)
    e = log_replay_events(scenes)
    n = int(e["agents"].sum())
    assert n > 0
    rates = {k: e[k].sum().item() / n
             for k in ("env_collision", "env_offroad", "metric_collision", "metric_offroad")}
    assert rates == {"env_collision": 0.0, "env_offroad": 0.0, "metric_collision": 0.0, "metric_offroad": 0.0}

    # break scene 0's log: agent 1 sits 0.5 m behind agent 0 from step 60, agent 2 drifts 40 m left
    pos, yaw = scenes.pos.clone(), scenes.yaw.clone()
    heading = torch.stack([scenes.yaw[0, 0, 60:].cos(), scenes.yaw[0, 0, 60:].sin()], -1)  # [T - 60, 2]
    pos[0, 1, 60:] = scenes.pos[0, 0, 60:] - 0.5 * heading
    yaw[0, 1, 60:] = scenes.yaw[0, 0, 60:]
    drift = torch.linspace(0.0, 40.0, T - 40)                                   # [51] m
    left = torch.stack([-scenes.yaw[0, 2, 40:].sin(), scenes.yaw[0, 2, 40:].cos()], -1)  # [51, 2]
    pos[0, 2, 40:] = scenes.pos[0, 2, 40:] + drift[:, None] * left
    broken = dataclasses.replace(scenes, pos=pos, yaw=yaw)
    e = log_replay_events(broken)
    assert e["metric_collision"][0, :2].all() and e["metric_offroad"][0, 2]
    assert torch.equal(e["env_collision"], e["metric_collision"])
    assert torch.equal(e["env_offroad"], e["metric_offroad"])


@pytest.mark.skipif(find_womd_examples() is None,
                    reason="WOMD example scenes not found "
                           "(set WOMD_EXAMPLES or provide ../shared/data/womd_examples)")
def test_log_replay_on_real_scenes_flags_what_the_metric_flags():
    """Real logs do contain collisions and off-road boxes (parked cars on the kerb): the env must
    flag exactly the agents the metric flags, including agents with gaps in their logs (the road
    pool is refreshed when they reappear) and ignoring objects absent at step 10 (not sim agents)."""
    e = log_replay_events(load_womd_dir(find_womd_examples()))
    assert e["metric_offroad"].any() and e["metric_collision"].any()
    assert torch.equal(e["env_collision"], e["metric_collision"])
    assert torch.equal(e["env_offroad"], e["metric_offroad"])


def test_paired_difference_known_answer():
    """Differences 1, 2, 3: mean 2, std 1, 95 % half-width t(2) * 1 / sqrt(3) with t(2) = 4.303."""
    d = E.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0) and d["n"] == 3
    half = 4.303 / 3 ** 0.5
    assert d["lo"] == pytest.approx(2.0 - half) and d["hi"] == pytest.approx(2.0 + half)
    assert d["per_seed"] == pytest.approx([1.0, 2.0, 3.0])


def test_paired_table_uses_only_seeds_with_both_rows():
    evals = [dict(a=dict(m=0.5), b=dict(m=0.4)), dict(a=dict(m=0.7), b=dict(m=0.4)), dict(a=dict(m=0.9))]
    line = E.paired_table(evals, (("a", "b"),), ("m",)).splitlines()[-1]
    assert line.startswith("| a - b | 2 |") and "+0.2000" in line       # seeds 0 and 1 only: mean 0.2


def test_rft_curves_read_every_default_seed(tmp_path):
    for name, reward in (("seed0", [0.5, 0.6]), ("seed1", [0.4, 0.45]), ("seed0_lr1e-05", [0.1])):
        hist = [dict(reward=r, kl_exact=0.01 * i, entropy=4.0) for i, r in enumerate(reward)]
        (tmp_path / "r1" / name).mkdir(parents=True)
        (tmp_path / "r1" / name / "log.json").write_text(json.dumps(dict(rft_mpo=hist)))
    curves = E.rft_curves(tmp_path)
    assert curves["MPO: realism reward per RFT step"] == {"seed0": [0.5, 0.6], "seed1": [0.4, 0.45]}
    assert curves["MPO: KL(pi || pi_SFT-1) per RFT step"]["seed1"] == [0.0, 0.01]


def test_spacer_seed_tables_pair_the_per_seed_logs(tmp_path):
    """Table 1 over seeds is computed from the per-seed logs: run names group by their flags
    (`_seed<S>` stripped, no suffix = seed 0), unfinished runs are left out, and SPACeR - PPO is
    paired seed by seed."""
    realism = {"spacer": [0.70, 0.72, 0.75], "ppo": [0.60, 0.66, 0.66], "hr-ppo": [0.65, 0.70, None]}
    for name, values in realism.items():
        for seed, r in enumerate(values):
            folder = tmp_path / (name + (f"_seed{seed}" if seed else ""))
            folder.mkdir()
            log = {} if r is None else dict(eval=dict(realism_meta=r))
            (folder / "log.json").write_text(json.dumps(log))
    groups = E.spacer_seeds(tmp_path)
    assert groups["ppo"] == {0: dict(realism_meta=0.60), 1: dict(realism_meta=0.66), 2: dict(realism_meta=0.66)}
    assert sorted(groups["hr-ppo"]) == [0, 1]                             # seed 2 has no eval yet
    text = E.spacer_seed_tables(tmp_path, keys=("realism_meta",))
    d = E.paired_difference([0.70, 0.72, 0.75], [0.60, 0.66, 0.66])
    assert f"| spacer - ppo | 3 | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] |" in text
    assert "| spacer - hr-ppo | 2 | +0.0350" in text                      # seeds 0 and 1 only
    assert "| spacer | 3 | 0.7233 +- 0.0252 |" in text
    assert E.spacer_seed_tables(tmp_path / "spacer") == ""                # no run: no table
