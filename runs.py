"""Run folders: the bookkeeping every stage of train.py shares, kept out of the algorithms.

A stage writes into runs/<stage>/: checkpoints (*.pt) and log.json, always through `Run`, so that
- a fresh run never removes finished work before doing any (`open_run`: over an earlier run's files
  it stops and names --resume and --overwrite; with --overwrite they go at the first new write);
- --resume continues from the saved log and checkpoints (and says so when the log is missing);
- no checkpoint with a non-finite tensor is ever written, so the last good one survives;
- only one process writes when several train together (`Run.writer`, torchrun's rank 0).
Non-finite values stop training where they appear: `check_finite` names the stage, step and term,
and `finite_steps` checks the gradient norm before every optimizer step taken inside it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import reference_model as RM
from evaluate import (TABLE_KEYS, evaluate_model, format_table, paired_table, reference_rollout, rft_curves,
                      score_method, seed_table)
from pictures import plot_curves
from scenes import check_finite, read_file, save_atomic  # check_finite: train.py imports it from here


RUN_FILES = ("*.pt", "log.json")           # what a stage writes into its run folder


def check_gradients(stage: str, steps, optimizer, args, kwargs) -> None:
    """An optimizer step pre-hook: the gradients' norm must be finite (one NaN gradient makes every
    weight NaN, and clip_grad_norm_ passes a NaN norm on without a word)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grads:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))  # []
        check_finite(norm, f"{stage}: optimizer step {next(steps)} of this run: the gradient norm")


@contextlib.contextmanager
def finite_steps(stage: str):
    """Check the gradients before every optimizer step taken inside: train_phase's, and those that
    ppo_anchor (PPO, HR-PPO's teacher) and r1_finetune (RFT) take in their own loops."""
    hook = register_optimizer_step_pre_hook(functools.partial(check_gradients, stage, itertools.count(1)))
    try:
        yield
    finally:
        hook.remove()


@dataclass
class Run:
    """A stage's run folder: its log (log.json, kept in memory and written whole) and the one way a
    stage writes there."""
    stage: str                    # e.g. "reference", "spacer/ppo", "r1/seed0": names the run in messages
    dir: Path
    log: dict
    resumed: bool                 # --resume found saved work: its checkpoints are continued
    stale: list = field(default_factory=list)  # an earlier run's files, removed at this run's first write
    writer: bool = True           # False on every process but rank 0 when several train together

    @property
    def log_path(self) -> Path:
        return self.dir / "log.json"

    def checkpoint(self, name: str, device="cpu") -> dict | None:
        """The saved checkpoint `name` to continue, or None (a fresh run never reads an earlier run's)."""
        path = self.dir / name
        if not (self.resumed and path.is_file()):
            return None
        fix = ("delete it to resume from the checkpoints before it, or rerun without --resume and with "
               "--overwrite to start over")
        return read_file(path, f"the {self.stage} stage's checkpoint {name}", fix, device=device)

    def clear_stale(self) -> None:
        for path in self.stale:
            path.unlink(missing_ok=True)
        self.stale = []

    def write_log(self) -> None:
        if self.writer:
            self.clear_stale()
            save_atomic(self.log, self.log_path)

    def save(self, path: Path, write, **states) -> None:
        """Write a checkpoint with write(path) (an atomic save) once every tensor in `states` is
        finite: non-finite weights are refused, so the last good checkpoint survives."""
        for name, state in states.items():
            check_finite(state, f"{self.stage}: not saving {path} (the last one saved stays): {name}")
        if self.writer:
            self.clear_stale()
            write(path)


def open_run(args, stage: str, marks: tuple) -> Run:
    """The run folder runs/<stage>. With --resume and one of `marks` (the files that hold work to
    continue) present, the saved log is read and the checkpoints are continued. Otherwise the run is
    fresh, and never removes finished work before doing any: over an earlier run's files it stops
    and names --resume and --overwrite; with --overwrite they go at the new run's first write."""
    out_dir = Path(args.runs) / stage
    earlier = sorted(p for pattern in RUN_FILES for p in out_dir.glob(pattern))
    if args.resume and any(any(out_dir.glob(m)) for m in marks):
        log_path = out_dir / "log.json"
        if not log_path.is_file():
            print(f"--resume: {log_path} is missing: continuing from the checkpoints, the log's history "
                  "starts fresh")
        fix = ("delete it to resume from the checkpoints with a fresh history, or rerun without --resume "
               "and with --overwrite")
        log = read_file(log_path, "the run's log", fix) if log_path.is_file() else {}
        return Run(stage, out_dir, log, resumed=True)
    if args.resume:
        print(f"--resume: nothing saved under {out_dir}; starting from scratch")
    elif earlier and not args.overwrite:
        raise SystemExit(f"{out_dir} holds an earlier run ({', '.join(p.name for p in earlier)}): pass "
                         "--resume to continue it, or --overwrite to replace it (its files are removed when "
                         "the new run writes its first file)")
    return Run(stage, out_dir, {}, resumed=False, stale=earlier)


@contextlib.contextmanager
def timed(run: Run, name: str):
    """Add the block's wall and CPU seconds to the log under `name` (the machine may be shared)."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    wall, cpu = run.log["wall_s"], run.log.setdefault("cpu_s", {})
    wall[name] = wall.get(name, 0.0) + time.perf_counter() - t0
    cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0
    run.write_log()


def load_checkpoint(path: Path, keys: tuple = ()) -> dict:
    """A checkpoint of an earlier stage (read_file's named errors)."""
    return read_file(path, "a checkpoint written by train.py",
                     "rerun the stage that writes it with --overwrite", keys=keys)


# ----- checkpoints and scores of a run: written once, through Run -----
def save_reference(run: Run, path: Path, model, tok, **extra) -> None:
    """A reference-model checkpoint (reference_model.save_checkpoint), weights and optimizer checked."""
    run.save(path, lambda p: RM.save_checkpoint(p, model, tok, **extra), model=model.state_dict(),
             optimizer=extra.get("optimizer"))


def save_policy(run: Run, state: dict) -> None:
    """ppo_anchor.train's checkpoint (policy, optimizer, iteration, history, RNG), weights checked."""
    run.save(run.dir / "policy.pt", functools.partial(save_atomic, state), policy=state["policy"],
             optimizer=state["optimizer"])


def save_rft(run: Run, path: Path, kind: str, model, tok, opt, cfg, tau: float, step: int,
             history: list) -> None:
    """r1_finetune.train_rft's save_fn: the RFT checkpoint (weights checked), its history in the log."""
    save_reference(run, path, model, tok, r1_cfg=asdict(cfg), optimizer=opt.state_dict(), step=step,
                   history=history, tau=tau)
    run.log[f"rft_{kind}"] = history
    run.write_log()


def score_once(run: Run, name: str, path: Path, tok, test, cfg, known: dict,
               device) -> None:
    """Row `name` of the r1 table: checkpoint `path` scored with eval_R rollouts per test scene,
    once; one sampling seed for every model (common random numbers)."""
    if name not in run.log["eval"]:
        reuse = known.get(path)
        run.log["eval"][name] = reuse or evaluate_model(RM.load_reference(path, device)[0], tok, test, cfg,
                                                        seed=cfg.seed)
        print(f"{name}: realism meta {run.log['eval'][name]['realism_meta']:.4f}"
              + (" (reference stage's)" if reuse else ""))


def score_reference_once(run: Run, ref_path: Path, ref, tok, ref_stage, test,
                         cfg) -> None:
    """The reference's row of the SPACeR table (runs/spacer/reference/log.json), scored like the
    policies and kept until the reference checkpoint or the number of test scenes changes."""
    ref_log = run.dir.parent / "reference" / "log.json"
    fresh = ref_log.is_file() and ref_log.stat().st_mtime > ref_path.stat().st_mtime
    fix = "delete it to score the reference again"
    if fresh and read_file(ref_log, "its scores", fix, ("eval",))["eval"].get("n_scenes") == test.B:
        return
    rollout = reference_rollout(ref, tok, ref_stage.eval_top_k, ref_stage.eval_temperature,
                                  ref_stage.eval_worlds)
    torch.manual_seed(cfg.seed)
    scores = score_method(rollout, test, cfg.eval_rollouts, cfg.eval_batch, progress=True)
    if run.writer:
        save_atomic(dict(reference=str(ref_path), n_params=ref.n_params, eval=scores), ref_log)


def print_r1_tables(run: Run, cfg, variants: tuple, n_test: int, runs: Path, rows: tuple) -> None:
    """This seed's table, RFT's training reward, the times, and the mean over every seed so far."""
    print(f"\nheld-out toy test scenes: {n_test}, {cfg.eval_R} rollouts each (WOSAC 2025 weights), "
          f"seed {cfg.seed}")
    print(format_table({n: run.log["eval"][n] for n in rows if n in run.log["eval"]}))
    for kind in variants:
        h = run.log[f"rft_{kind}"]
        k = max(1, len(h) // 4)
        mean = lambda key, part: sum(e[key] for e in part) / len(part)
        print(f"RFT {kind}: training reward {mean('reward', h[:k]):.4f} (first {k} steps) -> "
              f"{mean('reward', h[-k:]):.4f} (last {k}); KL to SFT-1 {h[-1]['kl_exact']:.4f} (k3 "
              f"{h[-1]['kl']:.4f}); entropy {h[0]['entropy']:.3f} -> {h[-1]['entropy']:.3f}; "
              f"unscored sets {sum(e['n_nan_groups'] for e in h)}")
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run.log["wall_s"].items()))
    print("CPU time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in run.log.get("cpu_s", {}).items()))
    fix = "delete that seed's folder, or rerun it with --overwrite"
    logs = sorted((runs / "r1").glob("seed*/log.json"))
    logs = [p for p in logs if p.parent.name[4:].isdigit()]      # the seeds of the default schedule only
    seeds = [read_file(p, "an r1 seed's log", fix).get("eval", {}) for p in logs]
    seeds = [{n: e[n] for n in rows if n in e} for e in seeds]
    if len(seeds) > 1:
        print(f"\nmean +- std over {len(seeds)} seeds (runs/r1/seed*):")
        print(seed_table(seeds, TABLE_KEYS))
        print("\npaired per-seed differences, mean [95 % interval] (same seed, same SFT-1):")
        print(paired_table(seeds, (("SFT-RFT-SFT", "SFT-SFT"), ("SFT-RFT", "SFT")), TABLE_KEYS))
    if run.writer:
        plot_curves(runs / "r1" / "rft_curves.png", rft_curves(runs))
        print(f"RFT curves of every seed: {runs / 'r1' / 'rft_curves.png'}")
    print(f"checkpoints: {run.dir}/*.pt\nlog and results: {run.log_path}")


# ----- flags: every value checked when parsed, the error naming the flag -----
def number(cast, low: float, strict: bool = False):
    """An argparse type: a finite number >= low (> low when strict)."""
    def parse(text: str):
        try:
            x = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if cast is int else 'a number'}")
        if not math.isfinite(x) or x < low or (strict and x == low):
            bound = f"{'>' if strict else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return x
    return parse


def device_flag(name: str) -> str:
    """An argparse type: auto, cpu, or cuda / cuda:N when that CUDA device exists."""
    if name in ("auto", "cpu"):
        return name
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device this project runs on; "
                                         "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name}: no CUDA device is available; use auto or cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name}: there are {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
