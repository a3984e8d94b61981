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

import wosac_metrics as wm
from env import EnvConfig, MultiAgentEnv
from scenes import make_toy_scenes, find_womd_examples, load_womd_dir


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    """Reference (CAT-K) vs SPACeR policy rollouts at the same batch of scenes x R."""
    out = {}
    ref_path = runs / "reference" / "catk.pt"
    if ref_path.is_file():
        import reference_model as RM
        model, tok, _ = RM.load_reference(ref_path, device)
        gen = torch.Generator(device=device).manual_seed(0)
        sync(device); t0 = time.perf_counter()
        RM.rollout(model, tok, scenes, R=R, generator=gen)
        sync(device)
        out["reference"] = dict(scenarios_per_s=scenes.B * R / (time.perf_counter() - t0), params=model.n_params())
        pol_path = runs / "spacer" / "spacer" / "policy.pt"
        if pol_path.is_file():
            import ppo_anchor as PA
            policy, cfg = PA.load_policy(pol_path, device)
            sync(device); t0 = time.perf_counter()
            PA.policy_rollout(policy, scenes, R, tok.table.to(device), cfg)
            sync(device)
            out["spacer"] = dict(scenarios_per_s=scenes.B * R / (time.perf_counter() - t0),
                                 params=PA.count_parameters(policy))
    return out


def training_speeds(runs: Path) -> dict:
    """Training throughput per stage, as each stage logged it."""
    out = {}
    for log in sorted(runs.glob("**/log.json")):
        try:
            d = json.loads(log.read_text())
        except json.JSONDecodeError:
            continue
        speeds = [v for k, v in _walk(d) if "per_s" in k or k in ("sps", "steps_per_s")]
        if speeds:
            out[str(log.parent.relative_to(runs))] = sum(speeds) / len(speeds)
    return out


def _walk(d, key=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, k)
    elif isinstance(d, list):
        for v in d:
            yield from _walk(v, key)
    elif isinstance(d, (int, float)):
        yield key, float(d)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--worlds", type=int, default=64, help="toy scenes (worlds) per env benchmark batch")
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
        rows.append(("policy / reference", f"{roll['spacer']['scenarios_per_s'] / roll['reference']['scenarios_per_s']:.1f}x faster, "
                     f"{roll['reference']['params'] / roll['spacer']['params']:.1f}x smaller"))
    elif not roll:
        rows.append(("reference vs policy rollout", f"missing: no checkpoints under {args.runs}"))
    for stage, v in training_speeds(Path(args.runs)).items():
        rows.append((f"training throughput, {stage} (from its log.json)", f"{v:,.1f} (as logged)"))
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
