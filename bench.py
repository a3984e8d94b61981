"""Every speed and size figure of the project, measured in one place.

    python bench.py [--device auto|cpu|cuda] [--worlds 256] [--runs runs] [--out runs/bench] [--json PATH]
                    [--only env,metric,rollouts,training,peer,sizes]

Figures (each row of the output names what produced it); every timed figure is measured here,
directly, never read from a log. Wall-clock rates are the median of several repeats; the `*_cpu`
twins divide by CPU seconds of this process instead (user + system), which a shared machine
disturbs less (on an idle machine with 2 threads they are about half the wall rates).
`--json PATH` writes {"device", "threads", "command", "figures": {key: value}} with these stable keys:

- env_step_agent_steps_per_s / env_step_obs_agent_steps_per_s: `MultiAgentEnv.step` in token
  mode over 256 toy worlds, without / with building the observations (valid controlled agents
  counted; env_*_slot_steps_per_s count padded slots, as "1M FPS" claims do);
- scoring_toy_scenes_per_s / scoring_womd_scenes_per_s: `wosac_metrics.score_rollouts` at R = 32
  on 8 toy scenes and, where present, the 8 real WOMD scenes;
- reference_rollout_scenarios_per_s: `reference_model.rollout` of 8 toy scenes x R = 32 with a
  default-size (ReferenceConfig) model; reference_params its parameter count;
- bc_scenes_per_s / catk_scenes_per_s: training steps (forward, backward, AdamW) of `bc_loss` /
  `catk_loss` on batches of 16 toy scenes, default-size model;
- ppo_agent_steps_per_s: `ppo_anchor.train` iterations (rollout, reference pass, PPO update) of
  SPACeR at the default SpacerConfig, the default-size model as the reference; ppo_rollout_share,
  ppo_reference_share, ppo_update_share split its time;
- rft_scored_rollouts_per_s: `r1_finetune.rft_step` at the default R1Config (4 scenes x M = 16);
- peer_step_events_agent_steps_per_s, peer_step_obs_agent_steps_per_s,
  peer_step_events_10x_segments_agent_steps_per_s: the simulator on the workload TorchDriveSim is
  timed on (issue 15, `peer_workload`): 256 worlds x 32 vehicles at a 4-way intersection, bicycle
  actions, 50 steps, median of 5;
- spacer_rollout_scenarios_per_s, spacer_policy_only_scenarios_per_s, spacer_params: a trained
  SPACeR policy's rollouts, when runs/spacer/spacer/policy.pt exists;
- `--only sizes`, SPACeR's "10x faster, 50x smaller" at equal batch (8 toy scenes x R = 32, randomly
  initialised weights: the cost of a step does not depend on them): sizes_policy_rollout_scenarios_per_s
  (the default SpacerConfig policy with its simulator, `ppo_anchor.policy_rollout`),
  sizes_policy_forward_scenarios_per_s (its forward passes alone), sizes_policy_params;
  sizes_tutorial_reference_rollout_scenarios_per_s, sizes_tutorial_reference_params and
  sizes_paper_reference_rollout_scenarios_per_s, sizes_paper_reference_params: `reference_model.rollout`
  of the reference of each preset (presets.py); sizes_speedup_vs_tutorial / sizes_speedup_vs_paper: the
  policy's rollout rate over the reference's (the paper: 9.4; `_cpu`: of the per-CPU-second rates);
  sizes_smaller_vs_tutorial / sizes_smaller_vs_paper: the reference's parameters over the policy's
  (the paper: 49); sizes_tutorial_bc_scenes_per_s / sizes_paper_bc_scenes_per_s: a BC training step
  (forward, backward, AdamW) of each reference on 16 toy scenes, what its epochs cost.
Speed is never asserted in tests; it is measured here.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import ppo_anchor as PA
import presets
import r1_finetune as R1
import reference_model as RM
import scenes as S
import wosac_metrics as wm
from env import EnvConfig, MultiAgentEnv
from evaluate import sync
from scenes import T
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes
from womd import find_womd_examples, load_womd_dir


def timed(fn, device, repeats: int, warmup: int = 1) -> tuple:
    """Median wall seconds and median CPU seconds of `repeats` calls of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def rates(key: str, work: float, wall: float, cpu: float) -> dict:
    """{key: work / wall, key_cpu: work / cpu}."""
    return {key: work / wall, key + "_cpu": work / max(cpu, 1e-9)}


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------
def bench_env(scenes, table, observe: bool, device, repeats: int = 3) -> dict:
    """Agent-steps per second of one full 80-step episode in token mode (median of repeats)."""
    env = MultiAgentEnv(scenes, EnvConfig(mode="token"), token_table=table)
    K, spt = table.shape[1], table.shape[2]
    ids = torch.randint(0, K, (scenes.B, scenes.A), device=device)            # [B, A]

    def episode():
        env.reset()
        for _ in range(80 // spt):
            if observe:
                env.step(ids)
            else:  # events and rewards only: the observation is the policy's cost, not the world's
                env.observe, saved = (lambda: None), env.observe
                env.step(ids)
                env.observe = saved
    wall, cpu = timed(episode, device, repeats)
    n_agents = int(env.controlled.sum())
    name = "env_step_obs" if observe else "env_step"
    return {**rates(f"{name}_agent_steps_per_s", 80 * n_agents, wall, cpu),
            f"{name}_slot_steps_per_s": 80 * scenes.B * scenes.A / wall}


def intersection_map(segments_per_edge: int = 1) -> dict:
    """Issue 15's peer map: two 4-lane roads (lanes 3.5 m, 14 m wide) crossing at the origin, arms
    reaching 100 m; road edges along the cross-shaped outline and the 16 lane centres of the arms,
    each straight piece cut into `segments_per_edge` equal segments."""
    h, L = 7.0, 100.0
    outline = [(L, h), (h, h), (h, L), (-h, L), (-h, h), (-L, h), (-L, -h), (-h, -h), (-h, -L), (h, -L),
               (h, -h), (L, -h), (L, h)]

    def cut(points):
        pts = np.asarray(points, np.float64)                                  # [P, 2]
        f = np.linspace(0, 1, segments_per_edge + 1)[:-1, None]               # [n, 1]
        dense = np.concatenate([p + f * (q - p) for p, q in zip(pts[:-1], pts[1:])] + [pts[-1:]])  # [P', 2]
        return np.concatenate([dense, np.zeros((len(dense), 1))], 1)          # [P', 3]
    lines, types = [cut(outline)], [S.ROAD_EDGE]
    for off in (1.75, 5.25):
        for sgn in (1, -1):
            for rot in range(4):  # each arm: lanes from the box edge out to the arm's end
                c, s_ = math.cos(rot * math.pi / 2), math.sin(rot * math.pi / 2)
                a, b = np.array([h, sgn * off]), np.array([L, sgn * off])
                R = np.array([[c, -s_], [s_, c]])
                lines.append(cut([R @ a, R @ b]))
                types.append(S.LANE)
    return S.polylines_to_segments(lines, types, list(range(len(lines))))


def peer_workload(worlds: int = 256, agents: int = 32, segments_per_edge: int = 1, seed: int = 0,
                  device="cpu") -> S.Scenes:
    """Issue 15's simulator workload (TorchDriveSim 0.2.3 is timed on it): `worlds` copies of the
    intersection, each with `agents` vehicles in random slots of the lane centres 8 m apart
    (right-hand traffic), jittered +-1 m along, +-0.3 m across, +-0.05 rad; speed U(5, 15) m/s,
    length U(4.0, 5.2) m, width U(1.8, 2.1) m. Every vehicle is present and controlled; its "log" is
    its start pose held still (only step 10 is read when every agent is controlled)."""
    g = np.random.default_rng(seed)
    h, L = 7.0, 100.0
    slots = []                                      # (x, y, yaw) of every slot, east arm then rotated
    for off in (1.75, 5.25):
        for sgn, yaw in ((-1, 0.0), (1, math.pi)):  # right-hand: y < 0 drives east (+x), y > 0 west
            for d in np.arange(h + 4.0, L - 4.0 + 1e-6, 8.0):
                slots.append((d, sgn * off, yaw))
    base = np.asarray(slots)                                                  # [Sn, 3]
    all_slots = []
    for rot in range(4):
        c, s_ = math.cos(rot * math.pi / 2), math.sin(rot * math.pi / 2)
        xy = base[:, :2] @ np.array([[c, s_], [-s_, c]])                      # [Sn, 2] rotated
        all_slots.append(np.concatenate([xy, base[:, 2:] + rot * math.pi / 2], 1))
    all_slots = np.concatenate(all_slots)                                     # [4 Sn, 3]
    pick = np.stack([g.choice(len(all_slots), agents, replace=False) for _ in range(worlds)])  # [W, A]
    pose = all_slots[pick]                                                    # [W, A, 3]
    along, across = g.uniform(-1, 1, (worlds, agents)), g.uniform(-0.3, 0.3, (worlds, agents))
    yaw0 = pose[..., 2]
    pose[..., 0] += along * np.cos(yaw0) - across * np.sin(yaw0)
    pose[..., 1] += along * np.sin(yaw0) + across * np.cos(yaw0)
    pose[..., 2] = np.arctan2(np.sin(yaw0), np.cos(yaw0)) + g.uniform(-0.05, 0.05, (worlds, agents))
    speed = g.uniform(5, 15, (worlds, agents))
    size = np.stack([g.uniform(4.0, 5.2, (worlds, agents)), g.uniform(1.8, 2.1, (worlds, agents)),
                     np.full((worlds, agents), 1.5)], -1)                     # [W, A, 3]
    A = agents
    one = dict(pos=np.zeros((A, T, 2)), z=np.zeros((A, T)), yaw=np.zeros((A, T)), vel=np.zeros((A, T, 2)),
               valid=np.ones((A, T), bool), size=np.ones((A, 3)), agent_type=np.zeros(A, int),
               controlled=np.ones(A, bool), eval_mask=np.ones(A, bool))
    sc = S.scene_from_numpy("peer", one, intersection_map(segments_per_edge)).repeat(worlds)
    f = lambda x: torch.as_tensor(x, dtype=torch.float32)
    pos = f(pose[..., :2])[:, :, None].expand(-1, -1, T, -1).contiguous()     # [W, A, T, 2]
    vel = f(np.stack([np.cos(pose[..., 2]), np.sin(pose[..., 2])], -1) * speed[..., None])  # [W, A, 2]
    sc = dataclasses.replace(sc, pos=pos, yaw=f(pose[..., 2])[:, :, None].expand(-1, -1, T).contiguous(),
                             vel=vel[:, :, None].expand(-1, -1, T, -1).contiguous(), size=f(size),
                             goal=f(pose[..., :2]))
    return sc.to(device)


def bench_peer(device, worlds: int = 256, steps: int = 50, repeats: int = 5, seed: int = 0) -> dict:
    """Agent-steps per second of the peer workload: dynamics + collision + off-road, then the same
    with observations, then with every road piece cut into 10x more segments (median of repeats)."""
    out = {}
    for key, seg, observe in (("peer_step_events", 1, False), ("peer_step_obs", 1, True),
                              ("peer_step_events_10x_segments", 10, False)):
        sc = peer_workload(worlds, 32, seg, seed, device)
        env = MultiAgentEnv(sc, EnvConfig(mode="continuous"))
        g = torch.Generator(device=device).manual_seed(seed)
        act = torch.stack([torch.rand(steps, worlds, 32, generator=g, device=device) * 6 - 3,
                           torch.rand(steps, worlds, 32, generator=g, device=device) * 0.4 - 0.2],
                          -1)  # [n, W, A, 2]

        def run():
            saved = env.observe
            if not observe:             # the events-only figures build no observation, the reset's neither
                env.observe = lambda: None
            env.reset()
            for t in range(steps):
                env.step(act[t])
            env.observe = saved
        wall, cpu = timed(run, device, repeats)
        out.update(rates(f"{key}_agent_steps_per_s", steps * worlds * 32, wall, cpu))
    return out


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
def bench_metric(scenes, R: int = 32) -> float:
    return wm.benchmark_scoring(scenes, R=R, repeats=3)


# --------------------------------------------------------------------------------------------
# The reference model and the training loops, at the default sizes
# --------------------------------------------------------------------------------------------
def default_reference(scenes, device, seed: int = 0) -> tuple:
    """A default-size (ReferenceConfig) untrained reference and a tokenizer fitted on `scenes`:
    the same cost per step as a trained one."""
    tok = MotionTokenizer.fit(scenes.to("cpu"), TokenizerConfig(K=RM.ReferenceConfig.K, seed=seed)).to(device)
    torch.manual_seed(seed)
    return RM.ReferenceModel(RM.ReferenceConfig(), tok.table).to(device), tok


def trimmed(scenes):
    return S.trim(scenes)[0]


def bench_training(toy, model, tok, device, batch: int = 16, repeats: int = 3) -> dict:
    """BC, CAT-K, reference rollout, PPO and RFT throughput with the default sizes."""
    out = dict(reference_params=model.n_params)
    sc = trimmed(toy.select(slice(0, batch)))
    enc = tok.encode(sc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step(loss_fn):
        model.train()
        loss, _ = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
    wall, cpu = timed(lambda: train_step(lambda: RM.bc_loss(model, sc, enc)), device, repeats)
    out.update(rates("bc_scenes_per_s", sc.B, wall, cpu))
    wall, cpu = timed(lambda: train_step(lambda: RM.catk_loss(model, tok, sc, top_k=32, enc=enc)), device,
                      max(1, repeats - 1))
    out.update(rates("catk_scenes_per_s", sc.B, wall, cpu))

    eight = trimmed(toy.select(slice(0, 8)))
    gen = torch.Generator(device=device).manual_seed(0)
    wall, cpu = timed(lambda: RM.rollout(model, tok, eight, R=32, generator=gen, batch_worlds=256), device,
                      repeats)
    out.update(rates("reference_rollout_scenarios_per_s", 8 * 32, wall, cpu))

    cfg = R1.R1Config()
    four = trimmed(toy.select(slice(0, cfg.scenes_per_step)))
    enc4 = tok.encode(four)
    sft = R1.frozen_copy(model)
    ropt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    wall, cpu = timed(lambda: R1.rft_step(model, sft, tok, ropt, four, enc4, cfg, 0.6, gen), device,
                      max(1, repeats - 1))
    out.update(rates("rft_scored_rollouts_per_s", four.B * cfg.M, wall, cpu))

    pool = toy.select(slice(0, 32))
    pool_enc = tok.encode(pool)
    pcfg = PA.anchor_config("spacer", iterations=2)
    ref = RM.ReferenceModel(model.cfg, tok.table).to(device).eval()
    ref.load_state_dict(model.state_dict())
    hist = []

    def ppo():
        _, h = PA.train(pcfg, pool, pool_enc, tok.table, tok.n0,
                        log_p_ref=functools.partial(RM.log_p_ref, ref, tok))
        hist[:] = h
    c0 = time.process_time()
    ppo()  # each iteration is timed by train() itself; the first one is the warm-up
    cpu = time.process_time() - c0
    last = hist[-1]
    wall = last["rollout_s"] + last["reference_s"] + last["update_s"]
    steps = sum(h["agent_steps"] for h in hist)
    walls = sum(h["rollout_s"] + h["reference_s"] + h["update_s"] for h in hist)
    out.update(ppo_agent_steps_per_s=last["agent_steps"] / wall, ppo_agent_steps_per_s_cpu=steps / cpu,
               ppo_rollout_share=last["rollout_s"] / wall, ppo_reference_share=last["reference_s"] / wall,
               ppo_update_share=last["update_s"] / wall, ppo_mean_agent_steps_per_s=steps / walls)
    return out


def bench_spacer(runs: Path, scenes, tok_table, device) -> dict:
    """A trained SPACeR policy's rollouts of scenes x 32 (whole loop, and its forward passes alone)."""
    pol_path = runs / "spacer" / "spacer" / "policy.pt"
    if not pol_path.is_file():
        return {}
    policy, cfg = PA.load_policy(pol_path, device)
    if policy.K != tok_table.shape[1]:
        return {}
    timing = {}
    sync(device)
    t0 = time.perf_counter()
    PA.policy_rollout(policy, scenes, 32, tok_table, cfg, timing)
    sync(device)
    wall = time.perf_counter() - t0
    return dict(spacer_rollout_scenarios_per_s=scenes.B * 32 / wall,
                spacer_policy_only_scenarios_per_s=scenes.B * 32 / timing["policy_s"],
                spacer_params=PA.count_parameters(policy))


def bench_sizes(toy, device, scenes: int = 8, R: int = 32, repeats: int = 3, bc_scenes: int = 16) -> dict:
    """Rollouts of `scenes` toy scenes x R by the policy and by the reference of each preset, all at the
    same batch (scenes x R worlds at once), randomly initialised, and a BC step of each reference on
    `bc_scenes` scenes. The paper-size reference takes minutes per rollout on a CPU: there it is timed
    once, without a warm-up."""
    few = trimmed(toy.select(slice(0, scenes))).to(device)
    cfgs = {p: presets.reference_config(p, quick=False) for p in presets.PRESETS}
    toks = {}                                       # one tokenizer per vocabulary size
    for cfg in cfgs.values():
        if (cfg.K, cfg.steps_per_token) not in toks:
            fit = TokenizerConfig(K=cfg.K, steps_per_token=cfg.steps_per_token, seed=0)
            toks[cfg.K, cfg.steps_per_token] = MotionTokenizer.fit(toy.to("cpu"), fit).to(device)
    out, worlds = {}, few.B * R
    for preset, cfg in cfgs.items():
        tok = toks[cfg.K, cfg.steps_per_token]
        torch.manual_seed(0)
        model = RM.ReferenceModel(presets.model_config(cfg), tok.table).to(device).eval()
        gen = torch.Generator(device=device).manual_seed(0)
        slow = preset == "paper" and device.type == "cpu"
        roll = lambda: RM.rollout(model, tok, few, R=R, generator=gen, batch_worlds=worlds)
        wall, cpu = timed(roll, device, 1 if slow else repeats, warmup=0 if slow else 1)
        out.update(rates(f"sizes_{preset}_reference_rollout_scenarios_per_s", worlds, wall, cpu))
        out[f"sizes_{preset}_reference_params"] = model.n_params
        batch = trimmed(toy.select(slice(0, bc_scenes))).to(device)       # what a training epoch costs
        enc, opt = tok.encode(batch), torch.optim.AdamW(model.parameters(), lr=cfg.lr)

        def bc_step():
            loss, _ = RM.bc_loss(model.train(), batch, enc, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        wall, cpu = timed(bc_step, device, 1 if slow else repeats, warmup=0 if slow else 1)
        out.update(rates(f"sizes_{preset}_bc_scenes_per_s", batch.B, wall, cpu))
    spacer = PA.SpacerConfig()
    tok = toks[cfgs["paper"].K, cfgs["paper"].steps_per_token]   # the policy acts in the reference's tokens
    torch.manual_seed(0)
    policy = PA.LateFusionPolicy(tok.K, spacer.embed, spacer.hidden, spacer.type_heads).to(device).eval()
    timing = {}
    wall, cpu = timed(lambda: PA.policy_rollout(policy, few, R, tok.table, spacer, timing), device, repeats)
    out.update(rates("sizes_policy_rollout_scenarios_per_s", worlds, wall, cpu))
    out["sizes_policy_forward_scenarios_per_s"] = worlds * (repeats + 1) / timing["policy_s"]  # warm-up too
    out["sizes_policy_params"] = n_policy = PA.count_parameters(policy)
    for preset in cfgs:
        for rate in ("", "_cpu"):                   # wall, and per CPU-second (steadier on a shared machine)
            policy_rate = out[f"sizes_policy_rollout_scenarios_per_s{rate}"]
            ref_rate = out[f"sizes_{preset}_reference_rollout_scenarios_per_s{rate}"]
            out[f"sizes_speedup_vs_{preset}{rate}"] = policy_rate / ref_rate
        out[f"sizes_smaller_vs_{preset}"] = out[f"sizes_{preset}_reference_params"] / n_policy
    return out


ROWS = [  # (key, row label, format)
    ("env_step_agent_steps_per_s", "env token step, {worlds} toy worlds", "{:,.0f} agent-steps/s"),
    ("env_step_obs_agent_steps_per_s", "env token step + observations, {worlds} toy worlds",
     "{:,.0f} agent-steps/s"),
    ("peer_step_events_agent_steps_per_s", "peer workload: 256 x 32 vehicles, step + events",
     "{:,.0f} agent-steps/s"),
    ("peer_step_obs_agent_steps_per_s", "peer workload: step + events + observations",
     "{:,.0f} agent-steps/s"),
    ("peer_step_events_10x_segments_agent_steps_per_s", "peer workload, 10x road segments: step + events",
     "{:,.0f} agent-steps/s"),
    ("scoring_toy_scenes_per_s", "WOSAC scoring, 8 toy scenes, R = 32", "{:.2f} scenes/s"),
    ("scoring_womd_scenes_per_s", "WOSAC scoring, 8 real WOMD scenes, R = 32", "{:.2f} scenes/s"),
    ("reference_rollout_scenarios_per_s", "reference rollout, 8 scenes x 32 (default size)",
     "{:.1f} scenarios/s"),
    ("bc_scenes_per_s", "training, reference BC (16 scenes per step)", "{:.1f} scenes/s"),
    ("catk_scenes_per_s", "training, reference CAT-K (16 scenes per step)", "{:.2f} scenes/s"),
    ("ppo_agent_steps_per_s", "training, SPACeR PPO (default SpacerConfig)", "{:,.0f} agent-steps/s"),
    ("rft_scored_rollouts_per_s", "training, RFT (MPO) step (default R1Config)", "{:.1f} scored rollouts/s"),
    ("spacer_rollout_scenarios_per_s", "spacer policy rollout, 8 scenes x 32", "{:.1f} scenarios/s"),
    # --only sizes: the policy against the reference of each preset, 8 scenes x 32 each, random weights
    ("sizes_policy_rollout_scenarios_per_s", "sizes: policy rollout with its simulator, 8 scenes x 32",
     "{:.1f} scenarios/s"),
    ("sizes_policy_forward_scenarios_per_s", "sizes: the policy's forward passes alone",
     "{:.1f} scenarios/s"),
    ("sizes_tutorial_reference_rollout_scenarios_per_s", "sizes: tutorial reference rollout, 8 scenes x 32",
     "{:.1f} scenarios/s"),
    ("sizes_paper_reference_rollout_scenarios_per_s", "sizes: paper reference rollout, 8 scenes x 32",
     "{:.2f} scenarios/s"),
    ("sizes_tutorial_bc_scenes_per_s", "sizes: tutorial reference BC step, 16 scenes", "{:.2f} scenes/s"),
    ("sizes_paper_bc_scenes_per_s", "sizes: paper reference BC step, 16 scenes", "{:.3f} scenes/s"),
    ("sizes_policy_params", "sizes: policy parameters", "{:,}"),
    ("sizes_tutorial_reference_params", "sizes: tutorial reference parameters", "{:,}"),
    ("sizes_paper_reference_params", "sizes: paper reference parameters", "{:,}"),
    ("sizes_speedup_vs_tutorial", "sizes: policy faster than the tutorial reference", "{:.1f}x"),
    ("sizes_smaller_vs_tutorial", "sizes: policy smaller than the tutorial reference", "{:.1f}x"),
    ("sizes_speedup_vs_paper", "sizes: policy faster than the paper reference (paper: 9.4x)", "{:.1f}x"),
    ("sizes_smaller_vs_paper", "sizes: policy smaller than the paper reference (paper: 49x)", "{:.1f}x"),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--worlds", type=int, default=256, help="toy worlds per env benchmark batch")
    p.add_argument("--runs", default="runs", help="where a trained SPACeR policy may be")
    p.add_argument("--out", default="runs/bench", help="where bench.json and bench.md go")
    p.add_argument("--json", default=None, help="also write the figures, under stable keys, to this file")
    p.add_argument("--only", default="env,metric,rollouts,training,peer,sizes",
                   help="comma-separated parts: env, metric, rollouts, training, peer, sizes")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    parts = set(args.only.split(","))
    unknown = parts - {"env", "metric", "rollouts", "training", "peer", "sizes"}
    if unknown:
        raise SystemExit(f"bench.py --only: unknown parts {sorted(unknown)}")
    cmd = "python bench.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    fig = {}
    toy32 = make_toy_scenes(32, seed=777)
    # the env figure repeats 32 toy scenes: the cost per world is that of distinct scenes of the same size
    toy = toy32.repeat(max(1, args.worlds // 32)).to(device)
    if "env" in parts:
        table = torch.zeros(3, 200, 2, 3, device=device)                      # [3, K, spt, 3]
        table[:, :, 1, 0] = torch.linspace(0, 3, 200, device=device)          # tokens 0..3 m per 0.2 s
        table[:, :, 0, 0] = table[:, :, 1, 0] / 2
        for observe in (False, True):
            fig.update(bench_env(toy, table, observe, device))
    if "peer" in parts:
        fig.update(bench_peer(device))
    if "metric" in parts:
        fig["scoring_toy_scenes_per_s"] = bench_metric(toy32.select(slice(0, 8)).to(device))
        womd_dir = find_womd_examples()
        if womd_dir is not None:
            fig["scoring_womd_scenes_per_s"] = bench_metric(load_womd_dir(womd_dir).to(device))
    if parts & {"rollouts", "training"}:
        model, tok = default_reference(toy32, device)
        if "training" in parts:
            fig.update(bench_training(toy32.to(device), model, tok, device))
        if "rollouts" in parts:
            fig.update(bench_spacer(Path(args.runs), toy32.select(slice(0, 8)).to(device), tok.table, device))
    if "sizes" in parts:
        fig.update(bench_sizes(toy32, device))
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if device.type == 'cuda' else f'{threads} CPU threads'
    md = [f"Device: {device} ({where}); "
          f"command: `{cmd.strip()}`; wall rates are medians, (cpu: per CPU-second of this process)", "",
          "| figure | value | key |", "|---|---|---|"]
    for key, label, f in ROWS:
        if key in fig:
            cpu = f" (cpu: {f.format(fig[key + '_cpu'])})" if key + "_cpu" in fig else ""
            md.append(f"| {label.format(worlds=args.worlds)} | {f.format(fig[key])}{cpu} | `{key}` |")
    if "ppo_rollout_share" in fig:
        md.append(f"| PPO time: rollout / reference pass / update | {fig['ppo_rollout_share']:.0%} / "
                  f"{fig['ppo_reference_share']:.0%} / {fig['ppo_update_share']:.0%} | `ppo_*_share` |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text("\n".join(md) + "\n")
    doc = dict(device=str(device), threads=threads, command=cmd, figures=fig)
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    print("\n".join(md))
    also = f" and {args.json}" if args.json else ""
    print(f"\nwritten to {out / 'bench.md'} and {out / 'bench.json'}{also}")
    return fig


if __name__ == "__main__":
    main()
