"""The results table across methods, and pictures of what the agents do.

Every method is judged the same way: R = 32 rollouts of the 80 future steps per held-out scene,
scored by the WOSAC realism metric (`wosac_metrics.score_rollouts`), plus the goal rate (an
agent comes within `goal_radius` of its logged final position) and the rollout throughput in
scenarios per second. Methods:

- constant velocity: controlled agents keep their step-10 velocity (the floor);
- human driver: the toy logs' own stochastic driver re-run from step 10 with new seeds, i.e.
  samples of the true behaviour distribution (the ceiling on toy scenes);
- BC and CAT-K: the centralized reference model (`reference_model.py`);
- PPO, HR-PPO, SPACeR: the decentralized policy (`ppo_anchor.py`);
- SFT-RFT, SFT-SFT and SFT-RFT-SFT: SMART-R1's schedule (`r1_finetune.py`).

A method whose checkpoint is missing is listed as missing, never silently dropped.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import distributed as D
import pictures
import ppo_anchor as PA
import reference_model as RM
from env import EnvConfig, MultiAgentEnv
from human_driver import HumanDriver
from scenes import DT, NOW, T, Scenes, read_file, save_atomic
from toy_scenes import make_toy_scenes, toy_dataset
from womd import find_womd_examples, load_womd_dir, missing_womd_examples
from wosac_metrics import dataset_means, score_rollouts, trajectory_features

TABLE_KEYS = ("realism_meta", "kinematic", "interactive", "map_based", "min_ade",
              "collision_rate", "offroad_rate", "goal_rate")


# --------------------------------------------------------------------------------------------
# Baseline rollouts
# --------------------------------------------------------------------------------------------
def constant_velocity(scenes: Scenes, R: int) -> tuple:
    """Controlled agents keep their step-10 velocity and heading; others replay the log.
    Returns fut_pos [B, R, A, 80, 2], fut_z, fut_yaw [B, R, A, 80]."""
    t = DT * torch.arange(1, T - NOW, device=scenes.device, dtype=torch.float32)  # [80]
    pos = scenes.pos[:, :, NOW, None] + scenes.vel[:, :, NOW, None] * t[:, None]  # [B, A, 80, 2]
    ctrl = scenes.controlled[..., None]                                        # [B, A, 1]
    pos = torch.where(ctrl[..., None], pos, scenes.pos[:, :, NOW + 1:])        # [B, A, 80, 2]
    # [B, A, 80]
    yaw = torch.where(ctrl, scenes.yaw[:, :, NOW, None].expand_as(pos[..., 0]), scenes.yaw[:, :, NOW + 1:])
    z = scenes.z[:, :, NOW, None].expand_as(yaw)                               # [B, A, 80]
    rep = lambda x: x[:, None].expand(-1, R, *([-1] * (x.dim() - 1))).contiguous()
    return rep(pos), rep(z), rep(yaw)


@torch.no_grad()
def human_driver_rollout(scenes: Scenes, R: int, seed: int = 0, batch_worlds: int = 512) -> tuple:
    """The toy human driver re-run from step 10 in the env (continuous bicycle mode), R times per
    scene with new noise. Returns fut_pos [B, R, A, 80, 2], fut_z, fut_yaw [B, R, A, 80]."""
    gen = torch.Generator(device=scenes.device).manual_seed(seed)
    per = max(1, batch_worlds // R)
    outs = []
    for b0 in range(0, scenes.B, per):
        s = scenes.select(slice(b0, b0 + per)).repeat(R)                       # [b * R] worlds
        env = MultiAgentEnv(s, EnvConfig(mode="continuous"))
        env.reset()
        driver = HumanDriver(s, generator=gen)
        for t in range(NOW, T - 1):
            accel, steer = driver.act(env.pos, env.yaw, env.speed, env.active, t)   # [b*R, A] each
            env.step(torch.stack([accel, steer], -1))
        outs.append([x.unflatten(0, (-1, R)) for x in env.rollout_future()])   # [b, R, A, 80, ...]
    return tuple(torch.cat([o[i] for o in outs]) for i in range(3))


# --------------------------------------------------------------------------------------------
# Scoring: any sim agent, given as a rollout function, judged the same way
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def score_method(rollout_fn, scenes: Scenes, R: int, batch: int, goal_radius: float = 2.0,
                 progress: bool = False, desc: str = "evaluate", generator=None, seed: int = 0) -> dict:
    """Realism of any sim agent given as rollout_fn(scenes [B], R) -> (pos [B, R, A, 80, 2], z, yaw
    [B, R, A, 80]), on `batch` scenes (x R worlds) at a time. Returns the WOSAC dataset means
    (realism_meta, buckets, min_ade, collision_rate, offroad_rate, ...), the goal rate (scored agents
    passing within goal_radius of their goal) and throughput: scenarios (one 8 s rollout of one
    scene) per second of rollout time, scoring excluded.

    Under torchrun the chunks of `batch` scenes are dealt round-robin to the ranks and the
    per-scene scores gathered in scene order, so the result is the single-process one (rollout_s:
    summed over the ranks). That needs a chunk's rollouts not to depend on the chunks before it:
    `generator` (the one rollout_fn samples with) restarts at chunk i from seed + 1_000_003 i."""
    done, rollout_s = [], 0.0                  # (first scene, per-scene scores [b] each, goal counts [2])
    chunks = [i for k, i in enumerate(range(0, scenes.B, batch)) if D.own(k)]
    if progress:
        chunks = tqdm(chunks, desc=desc, leave=False, disable=not D.is_writer())
    for i in chunks:
        if generator is not None:
            generator.manual_seed(seed + 1_000_003 * i)
        part = scenes.select(slice(i, i + batch))
        sync(part.device)
        t0 = time.perf_counter()
        pos, z, yaw = rollout_fn(part, R)                                 # [b, R, A, 80, 2], [b, R, A, 80] x2
        sync(part.device)
        rollout_s += time.perf_counter() - t0
        per_scene = [score_rollouts(part.select([b]), pos[b:b + 1], z[b:b + 1], yaw[b:b + 1])
                     for b in range(part.B)]  # one scene at a time bounds the metric's memory at R = 32
        near = (pos - part.goal[:, None, :, None]).norm(dim=-1).amin(-1) < goal_radius  # [b, R, A]
        scored = (part.eval_mask & part.valid[:, :, NOW])[:, None].expand_as(near)      # [b, R, A]
        done.append((i, {k: torch.cat([p[k] for p in per_scene]).cpu() for k in per_scene[0]},   # [b] each
                     torch.stack([near[scored].float().sum(), scored.float().sum()]).cpu()))  # [2]
    if D.active():                              # every rank's chunks, back in scene order
        done = sorted((c for part in D.gather(done) for c in part), key=lambda c: c[0])
        rollout_s = D.all_sum(rollout_s)
    result = dataset_means({k: torch.cat([c[1][k] for c in done]) for k in done[0][1]})
    g = torch.stack([c[2] for c in done]).sum(0)                                  # [2]
    result.update(goal_rate=(g[0] / g[1].clamp(min=1)).item(), scenarios_per_s=scenes.B * R / rollout_s,
                  rollout_s=rollout_s, n_scenes=scenes.B, rollouts=R)
    return result


def sync(device) -> None:
    """Wait for queued CUDA work, so that wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def format_table(results: dict, keys=TABLE_KEYS) -> str:
    """Markdown table; a method given as a string (why it is missing) is listed as missing."""
    extra = ("scenarios_per_s", "params")
    lines = ["| method | " + " | ".join(keys + extra) + " |", "|---" * (len(keys) + len(extra) + 1) + "|"]
    for name, m in results.items():
        if not isinstance(m, dict):
            lines.append(f"| {name} | missing: {m} |" + " |" * (len(keys) + len(extra) - 1))
            continue
        cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "-" for k in keys]
        cells.append(f"{m['scenarios_per_s']:.1f}" if m.get("scenarios_per_s") else "-")
        cells.append(f"{int(m['params']):,}" if m.get("params") else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPACER_COLUMNS = ("realism_meta", "kinematic", "interactive", "map_based", "min_ade", "collision_rate",
                  "offroad_rate", "goal_rate", "scenarios_per_s", "policy_only_scenarios_per_s", "n_params",
                  "entropy", "kl_ref", "logp_ref_exec")
TRAIN_COLUMNS = ("entropy", "kl_ref", "logp_ref_exec")  # training diagnostics, mean of the last 5 iterations


def spacer_table(spacer_dir: Path) -> str:
    """The SPACeR table: every finished run under runs/spacer and the reference, one row each."""
    rows = {}
    for log_path in sorted(spacer_dir.glob("*/log.json")):
        log = read_file(log_path, "a SPACeR run's log", "delete its folder or rerun it with --overwrite")
        if "eval" in log:
            tail = log.get("history", [])[-5:]
            train = {k: sum(h[k] for h in tail) / len(tail) for k in TRAIN_COLUMNS if tail and k in tail[0]}
            rows[log_path.parent.name] = {**log["eval"], **train, "n_params": log["n_params"]}
    lines = ["| method | " + " | ".join(SPACER_COLUMNS) + " |", "|---" * (len(SPACER_COLUMNS) + 1) + "|"]
    fmt = lambda k, v: "-" if v is None else f"{v:,.0f}" if k == "n_params" else f"{v:.1f}" \
        if k.endswith("_per_s") else f"{v:.4f}"
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(k, m.get(k)) for k in SPACER_COLUMNS) + " |")
    return "\n".join(lines)


def spacer_seeds(spacer_dir: Path) -> dict:
    """Every finished SPACeR run grouped by its flags: {run name without `_seed<S>`: {seed: eval}},
    the per-seed logs that the seed tables below average and pair."""
    groups = {}
    for log_path in sorted(spacer_dir.glob("*/log.json")):
        log = read_file(log_path, "a SPACeR run's log", "delete its folder or rerun it with --overwrite")
        if "eval" not in log:
            continue
        base, _, seed = log_path.parent.name.rpartition("_seed")
        base, seed = (base, int(seed)) if base and seed.isdigit() else (log_path.parent.name, 0)
        groups.setdefault(base, {})[seed] = log["eval"]
    return groups


def spacer_seed_tables(spacer_dir: Path, keys: tuple = TABLE_KEYS) -> str:
    """SPACeR's Table 1 over seeds: mean +- std of every run name, then the paired per-seed
    differences SPACeR - PPO and SPACeR - HR-PPO (only the seeds both runs have). Empty when no
    run name has two seeds."""
    groups = spacer_seeds(spacer_dir)
    seeds = sorted({s for g in groups.values() for s in g})
    evals = [{name: g[s] for name, g in groups.items() if s in g} for s in seeds]  # one dict per seed
    if not any(len(g) > 1 for g in groups.values()):
        return ""
    pairs = (("spacer", "ppo"), ("spacer", "hr-ppo"))
    return (f"mean +- std over seeds ({spacer_dir}/<run>[_seed<S>]):\n" + seed_table(evals, keys)
            + "\n\npaired per-seed differences, mean [95 % interval]:\n" + paired_table(evals, pairs, keys))


def seed_table(evals: list, keys: tuple) -> str:
    """Markdown table of mean +- std over seeds: evals is a list (one per seed) of
    {row name: {metric: value}}; a row is shown with the seeds that have it."""
    rows = list(dict.fromkeys(name for e in evals for name in e))
    lines = ["| model | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in rows:
        have = [e[name] for e in evals if name in e]
        vals = torch.tensor([[m.get(k, math.nan) for k in keys] for m in have],
                            dtype=torch.float64)                               # [seeds, keys]
        std = vals.std(0) if len(vals) > 1 else torch.zeros(len(keys), dtype=torch.float64)  # [keys]
        cells = ["-" if math.isnan(m) else f"{m:.4f} +- {s:.4f}" if len(vals) > 1 else f"{m:.4f}"
                 for m, s in zip(vals.mean(0).tolist(), std.tolist())]  # a metric a seed did not log: "-"
        lines.append(f"| {name} | {len(vals)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def t95(n: int) -> float:
    """Two-sided 95 % Student-t quantile with n - 1 degrees of freedom (n = 2..10; 1.96 beyond)."""
    return {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
            10: 2.262}.get(n, 1.96)


def paired_difference(a: list, b: list) -> dict:
    """The paired per-seed difference a - b (same seeds, same order): mean, std, the 95 % interval
    of the mean (Student t) and the per-seed values."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # [seeds]
    n = len(d)
    std = float(d.std()) if n > 1 else math.nan
    half = t95(n) * std / math.sqrt(n) if n > 1 else math.nan
    return dict(mean=float(d.mean()), std=std, lo=float(d.mean()) - half, hi=float(d.mean()) + half,
                per_seed=d.tolist(), n=n)


def paired_table(evals: list, pairs: tuple, keys: tuple) -> str:
    """Markdown table of paired differences over seeds: evals is a list (one per seed) of
    {row name: {metric: value}}; pairs are (a, b) row names; only seeds that have both count."""
    lines = ["| difference | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for a, b in pairs:
        both = [e for e in evals if a in e and b in e]
        if len(both) < 2:
            continue
        cells = []
        for k in keys:
            d = paired_difference([e[a][k] for e in both], [e[b][k] for e in both])
            cells.append(f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        lines.append(f"| {a} - {b} | {len(both)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# (row name, checkpoint under runs/, kind). Kinds: "cv" constant velocity, "human" the toy driver,
# "reference" a reference_model checkpoint, "policy" a ppo_anchor policy.
METHODS = (
    ("constant velocity", None, "cv"),
    ("human driver", None, "human"),
    ("BC", "reference/bc.pt", "reference"),
    ("CAT-K", "reference/catk.pt", "reference"),
    ("PPO", "spacer/ppo/policy.pt", "policy"),
    ("HR-PPO", "spacer/hr-ppo/policy.pt", "policy"),
    ("SPACeR", "spacer/spacer/policy.pt", "policy"),
    ("SFT-RFT", "r1/seed{seed}/rft_mpo.pt", "reference"),
    ("SFT-SFT", "r1/seed{seed}/sftsft.pt", "reference"),
    ("SFT-RFT-SFT", "r1/seed{seed}/sft2.pt", "reference"),
)


# The panels of rollouts_<suite>.png beside the log, in this order (others only when these are missing).
PICTURED = ("CAT-K", "PPO", "HR-PPO", "SPACeR", "SFT-RFT-SFT")
PICTURE_LABEL = {"CAT-K": "reference (CAT-K)", "SFT-RFT-SFT": "SMART-R1 (SFT-RFT-SFT)"}


def reference_rollout(model, tok, top_k: int = 5, temperature: float = 1.0, batch_worlds: int = 256,
                      generator=None):
    """A reference model (reference_model.rollout) as a rollout function for score_method."""
    def roll(s, R):
        out = RM.rollout(model, tok, s, R=R, top_k=top_k, temperature=temperature, generator=generator,
                         batch_worlds=batch_worlds)
        return out["traj"][..., :2], out["z"], out["traj"][..., 2]        # [B, R, A, 80, 2], [B, R, A, 80] x2
    return roll


def rollout_fn(kind: str, path: Path | None, runs: Path, device, seed: int, generator=None):
    """(rollout_fn(scenes, R) -> (pos, z, yaw), parameter count) for one method of METHODS; a
    reference model samples with `generator` (default: a new one seeded with `seed`)."""
    if kind == "cv":
        return constant_velocity, 0
    if kind == "human":
        return (lambda s, R: human_driver_rollout(s, R, seed=seed)), 0
    if kind == "reference":
        model, tok, _ = RM.load_reference(path, device)
        stage = read_file(path, "a reference checkpoint", "rerun `python train.py --stage reference`").get(
            "stage_cfg", {})
        gen = torch.Generator(device=device).manual_seed(seed) if generator is None else generator
        return reference_rollout(model, tok, stage.get("eval_top_k", 8), stage.get("eval_temperature", 1.0),
                                 stage.get("eval_worlds", 256), gen), model.n_params
    policy, cfg = PA.load_policy(path, device)
    _, tok, _ = RM.load_reference(runs / "reference" / "catk.pt", device)  # the vocabulary the policy acts in

    def roll(s, R):
        torch.manual_seed(seed)
        return PA.policy_rollout(policy, s, R, tok.table, cfg)
    return roll, PA.count_parameters(policy)


def held_out_scenes(runs: Path) -> Scenes:
    """The reference stage's held-out toy test split (the same scenes every stage scored)."""
    ck = Path(runs) / "reference" / "bc.pt"
    fix = "rerun `python train.py --stage reference` with --overwrite"
    cfg = read_file(ck, "a reference checkpoint", fix, ("stage_cfg",))["stage_cfg"] if ck.is_file() else {}
    return toy_dataset("test", cfg.get("n_test", 32), seed=cfg.get("data_seed", 0),
                         cache_dir=cfg.get("cache_dir", "data"))


def draw_rollouts(runs: Path, scenes: Scenes, suite: str, present: list, out_dir: Path, device,
                  seed: int = 0) -> list:
    """The pictures of one suite: one fresh rollout of each present method (PICTURED first, at most
    5 beside the log) on the split's busiest junction, rollouts_<suite>.png, and one of them animated.
    Returns the paths written."""
    written = []
    b = pictures.busiest_scene(scenes)
    scene = scenes.select([b]).to(device)
    order = [n for n in PICTURED if n in present] + [n for n in present if n not in PICTURED]
    shown = {}
    for name in order[:5]:
        rel, kind = next((rel, kind) for n, rel, kind in METHODS if n == name)
        fn, _ = rollout_fn(kind, runs / rel.format(seed=seed) if rel else None, runs, device, seed)
        pos, z, yaw = fn(scene, 1)                                # [1, 1, A, 80, 2], [1, 1, A, 80] x2
        shown[name] = (pos[0, 0].cpu(), z[0, 0].cpu(), yaw[0, 0].cpu())  # [A, 80, 2], [A, 80] x2
    p = out_dir / f"rollouts_{suite}.png"
    pairs = int(pictures.crossing_pairs(scene)[0])
    title = (f"{scene.scene_id[0]}, the densest junction of the {suite} split ({pairs} crossing vehicle "
             "pairs); one 8 s rollout per method")
    labelled = {PICTURE_LABEL.get(k, k): v for k, v in shown.items()}
    pictures.plot_rollouts(p, scene.to("cpu"), labelled, title=title)
    written.append(p)
    animated = ("SPACeR", "SFT-RFT-SFT", "CAT-K", "BC", "human driver")
    best = next((k for k in animated if k in shown), None)
    if best is not None:
        p = out_dir / f"rollout_{suite}_{best.replace(' ', '_')}.gif"
        one = [x[None, None] for x in shown[best]]               # [1, 1, A, 80, 2], [1, 1, A, 80] x2
        pictures.animate_rollout(p, scene.to("cpu"), *one, name=PICTURE_LABEL.get(best, best))
        written.append(p)
    return written


def run_eval(runs="runs", device="cpu", R: int = 32, seed: int = 0, n_test: int | None = None,
             womd: bool = True, batch: int = 8, toy: Scenes | None = None) -> dict:
    """Score every method of METHODS on the held-out toy scenes (`toy`, default the reference
    stage's test split) and, where present, the real WOMD examples; write results.md, results.json
    and the pictures to runs/eval. A method is re-scored only when its checkpoint changed since the
    last results.json (so `--stage all` resumes)."""
    runs, device = Path(runs), torch.device(device)
    out_dir = runs / "eval"
    res_path = out_dir / "results.json"
    old = {}
    if res_path.is_file():
        try:
            old = read_file(res_path, "the scores of an earlier eval", "every method is scored again")
        except ValueError as err:                              # a cache of scores: no reason to stop
            print(f"eval: scoring every method again, the earlier results are unusable: {err}")
    suites = {"toy": held_out_scenes(runs) if toy is None else toy}
    if n_test is not None:
        suites["toy"] = suites["toy"].select(slice(0, n_test))
    root = find_womd_examples() if womd else None
    if root is not None:
        suites["womd"] = load_womd_dir(root)
    elif womd:
        print(f"eval: the WOMD suite is skipped: {missing_womd_examples()}")
    results = dict(R=R, seed=seed, device=str(device), date=time.strftime("%Y-%m-%d"), suites={})
    for suite, scenes in suites.items():
        scenes = scenes.to(device)
        table = results["suites"][suite] = {}
        for name, rel, kind in METHODS:
            path = runs / rel.format(seed=seed) if rel else None
            if kind == "human" and suite != "toy":
                table[name] = "toy scenes only (the real logs have no driver model)"
                continue
            if path is not None and not path.is_file():
                table[name] = f"no checkpoint at {path}"
                continue
            stamp = path.stat().st_mtime if path is not None else None
            prev = old.get("suites", {}).get(suite, {}).get(name)
            if (isinstance(prev, dict) and prev.get("mtime") == stamp and prev.get("n_scenes") == scenes.B
                    and (old.get("R"), old.get("seed"), old.get("device")) == (R, seed, str(device))):
                table[name] = prev                             # unchanged since the last eval: keep its score
                continue
            gen = torch.Generator(device=device)                # restarted per chunk: see score_method
            fn, params = rollout_fn(kind, path, runs, device, seed, gen)
            m = score_method(fn, scenes, R, batch, progress=True, desc=f"{suite}: {name}", generator=gen,
                             seed=seed)
            table[name] = dict(m, params=params, checkpoint=str(path) if path else None, mtime=stamp)
            if D.is_writer():
                save_atomic(results, res_path)                  # after every method: never lose finished work
            print(f"{suite} {name}: realism meta {m['realism_meta']:.4f}, minADE {m['min_ade']:.2f} m, "
                  f"{m['scenarios_per_s']:.1f} scenarios/s")
    if not D.is_writer():                                      # under torchrun rank 0 writes
        return results
    save_atomic(results, res_path)

    # ---- results.md and pictures -------------------------------------------------------------
    md = [f"# Results ({results['date']}, device {device}, {R} rollouts per scene, sampling seed {seed})", ""]
    for suite, table in results["suites"].items():
        n = next((m["n_scenes"] for m in table.values() if isinstance(m, dict)), 0)
        md += [f"## {'held-out toy test scenes' if suite == 'toy' else 'real WOMD example scenes'} ({n})", "",
               format_table(table), ""]
    written = []
    for suite, scenes in suites.items():                       # one fresh rollout per method, one busy scene
        present = [n for n, _, _ in METHODS if isinstance(results["suites"][suite].get(n), dict)]
        written += draw_rollouts(runs, scenes, suite, present, out_dir, device, seed)
    p = out_dir / "training_curves.png"
    pictures.plot_curves(p, training_curves(runs, seed))
    if p.is_file():
        written.append(p)
    md += ["Pictures: " + ", ".join(f"`{q.name}`" for q in written), ""]
    (out_dir / "results.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"results: {out_dir / 'results.md'}, {res_path}\npictures: {', '.join(str(q) for q in written)}")
    return results


def training_curves(runs: Path, seed: int = 0) -> dict:
    """The series plot_curves draws, read from each stage's log.json."""
    def read(p):
        fix = "delete it, or rerun that stage with --overwrite"
        return read_file(p, "a stage's log", fix) if p.is_file() else {}
    ref = read(runs / "reference" / "log.json")
    curves = {"reference: validation loss per epoch": {ph: [e["val_loss"] for e in ref.get(ph, [])]
                                                       for ph in ("bc", "catk")}}
    spacer = {p.parent.name: read(p).get("history", []) for p in sorted((runs / "spacer").glob("*/log.json"))}
    for key, title in (("task_reward", "SPACeR: task reward per iteration"),
                       ("entropy", "SPACeR: policy entropy per iteration"),
                       ("kl_ref", "SPACeR: KL(pi || p_ref) per iteration")):
        curves[title] = {run: [h.get(key) for h in hist] for run, hist in spacer.items() if hist}
    r1 = read(runs / "r1" / f"seed{seed}" / "log.json")
    curves["SMART-R1: RFT reward per step"] = {k[4:]: [h["reward"] for h in v] for k, v in r1.items()
                                              if k.startswith("rft_") and isinstance(v, list)}
    return curves


def rft_curves(runs: Path) -> dict:
    """MPO's training curves of every seed of the default schedule (runs/r1/seed<S>/log.json):
    the realism reward, the exact KL(pi || pi_sft) and the entropy of pi per RFT step."""
    fix = "delete it, or rerun that seed with --overwrite"
    logs = {p.parent.name: read_file(p, "an r1 seed's log", fix)
            for p in sorted((runs / "r1").glob("seed*/log.json")) if p.parent.name[4:].isdigit()}
    hist = {name: log.get("rft_mpo", []) for name, log in logs.items()}
    return {title: {name: [h.get(key) for h in steps] for name, steps in hist.items() if steps}
            for key, title in (("reward", "MPO: realism reward per RFT step"),
                               ("kl_exact", "MPO: KL(pi || pi_SFT-1) per RFT step"),
                               ("entropy", "MPO: entropy of pi per RFT step"))}


# --------------------------------------------------------------------------------------------
# The env's sanity report: OMP_NUM_THREADS=1 python evaluate.py --env-report --toy 16 --R 8 --seed 0
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def log_replay_events(scenes: Scenes) -> dict:
    """Replay every agent's log through the env and compare its events with the metric's.

    No agent is controlled, so the env moves every agent along its log; we record the env's
    collision / off-road flags at steps 11..90. The same flags are computed by wosac_metrics on the
    logged trajectories themselves (`trajectory_features` with the log as the one rollout).
    Returns [B, A] bool tensors: `agents` (sim agents: valid at step 10) and, per agent, any event
    on steps 11..90: env_collision, env_offroad, metric_collision, metric_offroad."""
    log_only = dataclasses.replace(scenes, controlled=torch.zeros_like(scenes.controlled))
    env = MultiAgentEnv(log_only, EnvConfig(mode="continuous"))
    env.reset()
    no_action = torch.zeros(env.B, env.A, 2, device=env.device)      # [B, A, 2] ignored: nobody is controlled
    coll, off = [], []
    for t in range(NOW, T - 1):
        _, _, info = env.step(no_action)
        coll.append(info["collided"])                                          # [B, A] at step t + 1
        off.append(info["offroad"])                                            # [B, A]
    env_coll = torch.stack(coll, -1)                                           # [B, A, 80]
    env_off = torch.stack(off, -1)                                             # [B, A, 80]

    f = trajectory_features(scenes, scenes.pos[:, None], scenes.z[:, None], scenes.yaw[:, None],
                               scenes.valid[:, None])                          # dict of [B, 1, A, 80]
    valid = f["valid"][:, 0]                                                   # [B, A, 80] logged steps
    agents = scenes.valid[:, :, NOW]                                           # [B, A] sim agents
    return dict(agents=agents,
                env_collision=env_coll.any(-1) & agents, env_offroad=env_off.any(-1) & agents,
                metric_collision=(f["collision_per_step"][:, 0] & valid).any(-1) & agents,
                metric_offroad=(f["offroad_per_step"][:, 0] & valid).any(-1) & agents)


@torch.no_grad()
def human_driver_spread(scenes: Scenes, R: int, seed: int) -> dict:
    """The toy human driver re-run closed loop from step 10, R times per scene with new noise
    (evaluate.human_driver_rollout), scored by WOSAC: dataset means of collision_rate and
    offroad_rate (fraction of (rollout, scored agent) pairs with any event), min_ade and
    realism_meta; plus `spread`, the mean over scored agents of the mean distance between two
    rollouts' final positions (step 90)."""
    pos, z, yaw = human_driver_rollout(scenes, R, seed=seed)              # [B, R, A, 80, 2], [B, R, A, 80] x2
    per_scene = [score_rollouts(scenes.select([b]), pos[b:b + 1], z[b:b + 1], yaw[b:b + 1])
                 for b in range(scenes.B)]                               # one scene at a time: bounded memory
    out = dataset_means({k: torch.cat([p[k] for p in per_scene]) for k in per_scene[0]})
    final = pos[:, :, :, -1].transpose(1, 2)                                   # [B, A, R, 2] step 90
    pair = torch.cdist(final, final)                                           # [B, A, R, R]
    mean_pair = pair.sum((-1, -2)) / (R * (R - 1))                             # [B, A] diagonal is 0
    scored = scenes.eval_mask & scenes.valid[:, :, NOW]                        # [B, A]
    out["spread"] = mean_pair[scored].mean().item()
    out["n_agents"] = int(scored.sum())
    return out


def env_report(argv=None) -> None:
    """Print the env's sanity numbers as markdown: (a) log replay through the env, its event
    flags against the metric's on the same logs; (b) the human driver re-run closed loop."""
    p = argparse.ArgumentParser(description="The env's sanity report: log replay events and human-driver "
                                "rollouts through the env (the results table is "
                                "`python train.py --stage eval`)")
    p.add_argument("--env-report", action="store_true", required=True, help="print the env's sanity report")
    p.add_argument("--toy", type=int, default=16, help="toy scenes")
    p.add_argument("--R", type=int, default=8, help="human-driver rollouts per toy scene")
    p.add_argument("--seed", type=int, default=0, help="toy scenes seed; the driver uses seed + 1")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    print(f"`OMP_NUM_THREADS=1 python {' '.join(['evaluate.py'] + given)}` "
          f"(--toy {args.toy} --R {args.R} --seed {args.seed})\n")

    toy_name = f"toy ({args.toy} scenes, seed {args.seed})"
    toy = make_toy_scenes(args.toy, seed=args.seed)
    suites = {toy_name: toy}
    root = find_womd_examples()
    if root is None:
        print(f"WOMD examples skipped: {missing_womd_examples()}\n")
    else:
        womd = load_womd_dir(root)
        suites[f"WOMD ({womd.B} example scenes)"] = womd

    print("## (a) Log replay: any collision / off-road on steps 11..90, fraction of sim agents\n")
    print("| scenes | sim agents | collision: env | collision: metric | off-road: env | off-road: metric "
          "| agents where env != metric (coll / off) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, sc in suites.items():
        t0 = time.perf_counter()
        e = log_replay_events(sc)
        n = int(e["agents"].sum())
        rate = lambda k: e[k].sum().item() / n
        diff = lambda k: int((e["env_" + k] != e["metric_" + k]).sum())
        print(f"| {name} | {n} | {rate('env_collision'):.4f} | {rate('metric_collision'):.4f} "
              f"| {rate('env_offroad'):.4f} | {rate('metric_offroad'):.4f} "
              f"| {diff('collision')} / {diff('offroad')} | {time.perf_counter() - t0:.1f} |")

    print(f"\n## (b) Human driver re-run closed loop from step 10, R = {args.R} new seeds per toy scene\n")
    print("| scenes | scored agents | collision rate | off-road rate | final-position spread (m) "
          "| minADE (m) | realism meta | s |")
    print("|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    h = human_driver_spread(toy, args.R, seed=args.seed + 1)
    print(f"| {toy_name} | {h['n_agents']} | {h['collision_rate']:.4f} | {h['offroad_rate']:.4f} "
          f"| {h['spread']:.2f} | {h['min_ade']:.3f} | {h['realism_meta']:.4f} "
          f"| {time.perf_counter() - t0:.1f} |")
    print("\n(a) env: the env's per-step flags with every agent replaying its log; metric: "
          "wosac_metrics.trajectory_features of the log. (b) rates and minADE as score_rollouts "
          "reports them (mean over scenes; collision / off-road: fraction of (rollout, scored agent) "
          "pairs with any event; minADE over all 91 steps, history included, as WOSAC defines it); "
          "spread: mean over scored agents of the mean pairwise distance between the R rollouts' "
          "positions at step 90.")


if __name__ == "__main__":
    env_report()


# ----- scores kept in a stage's log (train.py's reference and r1 stages) -----
def evaluate_model(model, tok, scenes: Scenes, cfg, seed: int) -> dict:
    """WOSAC metrics, goal rate and rollout scenarios per second of R sampled rollouts per scene,
    eval_worlds // eval_R scenes at a time, each chunk's sampling started from (seed, chunk) so
    that a chunk's rollouts are the same on whichever rank computes it (score_method)."""
    gen = torch.Generator(device=scenes.device)
    roll = reference_rollout(model, tok, cfg.eval_top_k, cfg.eval_temperature, cfg.eval_worlds, gen)
    per = max(1, cfg.eval_worlds // cfg.eval_R)                # scenes per chunk: reference_rollout's
    return score_method(roll, scenes, cfg.eval_R, per, generator=gen, seed=seed)


def reference_scores(ref_dir: Path, R: int, n_test: int) -> dict:
    """{checkpoint: its scores} for BC and CAT-K from the reference stage's log, when it scored them
    the same way (seed, R, test scenes) after they were last written."""
    ref_log, bc_path, catk_path = ref_dir / "log.json", ref_dir / "bc.pt", ref_dir / "catk.pt"
    fix = "delete it, or rerun the reference stage with --overwrite"
    ref_eval = read_file(ref_log, "its log", fix).get("eval", {}) if ref_log.is_file() else {}
    if ref_eval.get("R") != R or ref_eval.get("n_test") != n_test \
            or ref_log.stat().st_mtime < max(bc_path.stat().st_mtime, catk_path.stat().st_mtime):
        return {}
    results = ref_eval.get("results", {})
    return {bc_path: results.get("BC"), catk_path: results.get("CAT-K")}
