"""Every speed and size figure of the project, measured in one place.

    python bench.py [--device auto|cpu|cuda] [--worlds 64] [--runs runs] [--out runs/bench]

Figures (each row of the output names the command that produced it):
- env throughput: agent-steps per second of `MultiAgentEnv.step` in token mode, with and
  without building the observations ("1M FPS" claims count padded slots; we count valid
  controlled agents, and report the slots too);
- metric scoring: scenes per second of `wosac_metrics.score_rollouts` at R = 32 on toy scenes
  and, where present, the real WOMD scenes;
- reference vs policy rollout: scenarios (one 8 s rollout of one scene) per second at the same
  batch, SPACeR's "10x faster" claim, and their parameter counts, its "50x smaller" claim;
- training throughput per stage, read from the stages' own logs.
Speed is never asserted in tests; it is measured here.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ppo_anchor as PA
import reference_model as RM
import wosac_metrics as wm
from evaluate import sync
from env import EnvConfig, MultiAgentEnv
from toy_scenes import make_toy_scenes
from womd import find_womd_examples, load_womd_dir


def bench_env(scenes, table, observe: bool, device, repeats: int = 2) -> dict:
    """Agent-steps per second of one full 80-step episode in token mode."""
    env = MultiAgentEnv(scenes, EnvConfig(mode="token"), token_table=table)
    K, spt = table.shape[1], table.shape[2]
    best = 0.0
    for _ in range(repeats):
        env.reset()
        ids = torch.randint(0, K, (scenes.B, scenes.A), device=device)        # [B, A]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(80 // spt):
            if observe:
                env.step(ids)
            else:  # events and rewards only: the observation is the policy's cost, not the world's
                env.observe, saved = (lambda: None), env.observe
                env.step(ids)
                env.observe = saved
        sync(device)
        best = max(best, 80 / (time.perf_counter() - t0))
    n_agents = int(env.controlled.sum())
    return dict(steps_per_s=best, agent_steps_per_s=best * n_agents, slot_steps_per_s=best * scenes.B * scenes.A)


def bench_metric(scenes, R: int = 32) -> float:
    return wm.benchmark_scoring(scenes, R=R, repeats=1)


def bench_rollouts(runs: Path, scenes, R: int, device) -> dict:
    """Reference (CAT-K) vs SPACeR policy rollouts of the same scenes x R worlds: scenarios (one
    8 s rollout of one scene) per second, whole closed loop (the policy's includes the simulator
    that makes its observations) and, for the policy, its forward passes alone."""
    out = {}
    ref_path = runs / "reference" / "catk.pt"
    if not ref_path.is_file():
        return out
    model, tok, _ = RM.load_reference(ref_path, device)
    gen = torch.Generator(device=device).manual_seed(0)
    RM.rollout(model, tok, scenes.select([0]), R=2, generator=gen)            # warm-up
    sync(device); t0 = time.perf_counter()
    RM.rollout(model, tok, scenes, R=R, generator=gen, batch_worlds=scenes.B * R)
    sync(device)
    out["reference"] = dict(scenarios_per_s=scenes.B * R / (time.perf_counter() - t0), params=model.n_params)
    pol_path = runs / "spacer" / "spacer" / "policy.pt"
    if pol_path.is_file():
        policy, cfg = PA.load_policy(pol_path, device)
        timing = {}
        sync(device); t0 = time.perf_counter()
        PA.policy_rollout(policy, scenes, R, tok.table, cfg, timing)
        sync(device)
        out["spacer"] = dict(scenarios_per_s=scenes.B * R / (time.perf_counter() - t0),
                             policy_only_scenarios_per_s=scenes.B * R / timing["policy_s"],
                             params=PA.count_parameters(policy))
    return out


def training_speeds(runs: Path) -> list:
    """Training throughput per stage, from the figures each stage logged (rows of (what, value))."""
    def read(p):
        return json.loads(p.read_text()) if p.is_file() else {}
    rows = []
    ref = read(runs / "reference" / "log.json")
    n_train = ref.get("config", {}).get("n_train")
    for phase in ("bc", "catk"):
        ep = ref.get(phase, [])
        if ep and n_train:
            rate = n_train * len(ep) / sum(e["train_s"] for e in ep)
            rows.append((f"training, reference {phase.upper()} ({runs}/reference/log.json)", f"{rate:.1f} scenes/s"))
    for p in sorted((runs / "spacer").glob("*/log.json")):
        d = read(p)
        if "train_sps" in d:
            rows.append((f"training, spacer {p.parent.name} ({p})", f"{d['train_sps']:,.0f} agent-steps/s"))
    for p in sorted((runs / "r1").glob("seed*/log.json")):
        d = read(p)
        h = d.get("rft_mpo", [])
        if h:
            per = d["config"]["scenes_per_step"] * d["config"]["M"]
            sec = sum(e["rollout_s"] + e["score_s"] + e["update_s"] for e in h) / len(h)
            rows.append((f"training, r1 RFT (MPO) {p.parent.name} ({p})",
                         f"{1 / sec:.3f} steps/s ({per / sec:.1f} scored rollouts/s)"))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--worlds", type=int, default=256, help="toy scenes (worlds) per env benchmark batch")
    p.add_argument("--rollout-scenes", type=int, default=8, help="scenes for the rollout comparison (x R = 32)")
    p.add_argument("--runs", default="runs", help="where the stages' checkpoints and logs are")
    p.add_argument("--out", default="runs/bench", help="where bench.json and bench.md go")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cmd = "python bench.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    rows = []
    toy = make_toy_scenes(args.worlds, seed=777).to(device)
    table = torch.zeros(3, 200, 2, 3, device=device)                         # [3, K, spt, 3]
    table[:, :, 1, 0] = torch.linspace(0, 3, 200, device=device)             # tokens 0..3 m per 0.2 s
    table[:, :, 0, 0] = table[:, :, 1, 0] / 2
    for observe in (False, True):
        r = bench_env(toy, table, observe, device)
        rows.append((f"env token step{' + observations' if observe else ''}, {args.worlds} toy worlds",
                     f"{r['agent_steps_per_s']:,.0f} agent-steps/s ({r['slot_steps_per_s']:,.0f} slot-steps/s)"))
    rows.append(("WOSAC scoring, 8 toy scenes, R = 32", f"{bench_metric(toy.select(slice(0, 8))):.2f} scenes/s"))
    womd = find_womd_examples()
    if womd is not None:
        real = load_womd_dir(womd).to(device)
        rows.append(("WOSAC scoring, 8 real WOMD scenes, R = 32", f"{bench_metric(real):.2f} scenes/s"))
    roll = bench_rollouts(Path(args.runs), toy.select(slice(0, args.rollout_scenes)), 32, device)
    for name, r in roll.items():
        rows.append((f"{name} rollout, {args.rollout_scenes} scenes x 32", f"{r['scenarios_per_s']:.1f} scenarios/s, {r['params']:,} parameters"))
    if len(roll) == 2:
        sp, rf = roll["spacer"], roll["reference"]
        rows.append((f"spacer policy forward passes alone, {args.rollout_scenes} scenes x 32",
                     f"{sp['policy_only_scenarios_per_s']:.1f} scenarios/s"))
        rows.append(("policy / reference", f"{sp['scenarios_per_s'] / rf['scenarios_per_s']:.1f}x faster with the simulator, "
                     f"{sp['policy_only_scenarios_per_s'] / rf['scenarios_per_s']:.1f}x policy alone; "
                     f"{rf['params'] / sp['params']:.1f}x smaller"))
    elif not roll:
        rows.append(("reference vs policy rollout", f"missing: no checkpoints under {args.runs}"))
    rows += training_speeds(Path(args.runs))
    md = [f"Device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}); "
          f"command: `{cmd.strip()}`", "", "| figure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text("\n".join(md) + "\n")
    (out / "bench.json").write_text(json.dumps(dict(device=str(device), command=cmd, rows=rows), indent=1))
    print("\n".join(md))
    print(f"\nwritten to {out / 'bench.md'} and {out / 'bench.json'}")
    return dict(rows)


if __name__ == "__main__":
    main()
