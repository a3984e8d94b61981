"""The one entry point: python train.py --stage reference|spacer|r1|eval|all

Each stage is a plain function `stage_<name>(args)` that reads like its paper's algorithm: data,
model, loop, save. The presets (every stage's configuration, what --quick changes, and
--preset tutorial|paper: the papers' proportions, for a GPU) are in presets.py; `open_run` does the
resume bookkeeping of every stage. Every stage writes checkpoints atomically, keeps a JSON log,
continues with --resume (and does nothing when its work is complete), and prints where its files went.

reference  The centralized next-token reference model (reference_model.py) on toy scenes: fit
           the motion tokenizer on the training split, behaviour cloning (BC), then CAT-K
           closed-loop SFT at about 0.1x the BC learning rate, then score constant velocity, BC
           and CAT-K on held-out scenes with R = 32 rollouts each (WOSAC realism meta metric).
           runs/reference/{bc,catk}.pt, log.json.
spacer     SPACeR (ppo_anchor.py): self-play PPO of a small decentralized policy anchored to the
           frozen CAT-K reference, or the PPO / HR-PPO baselines (--anchor). runs/spacer/<run>/.
r1         SMART-R1 (r1_finetune.py): SFT-1, RFT with MPO, SFT-2, and the SFT-SFT control at the
           same budget (--variants: GRPO-style and no-KL RFT too). runs/r1/seed<S>/.
eval       Every checkpoint under runs/ on the same held-out toy and real WOMD scenes
           (evaluate.py): runs/eval/results.{md,json} and pictures.
all        reference, spacer (PPO, HR-PPO, SPACeR), r1 and eval in order, resuming what exists.

    python train.py --stage all                    # the main job (README: stage times)
    python train.py --stage all --quick            # a smoke run of the whole pipeline
    python train.py --stage reference --resume     # continue from the last saved epoch
    python train.py --stage reference --overwrite  # start over where an earlier run's files are
    python train.py --stage all --preset paper     # a 3.8M-parameter reference, in runs/paper (a GPU)

The bookkeeping (refusing to overwrite, --resume, finite checks, flags) lives in runs.py, and
`torchrun --nproc_per_node N train.py ...` (data-parallel: README, More than one machine) in distributed.py.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

import distributed as D
import evaluate as E
import ppo_anchor as PA
import r1_finetune as R1
import reference_model as RM
import scenes as S
from hr_ppo import train_bc
from presets import (EVAL_QUICK, PRESETS, R1_QUICK, RUNS, SPACER_QUICK, SPACER_QUICK_TEST,
                     ReferenceStageConfig, model_config, reference_config)
from runs import (Run, check_finite, device_flag, finite_steps, load_checkpoint, number, open_run,
                  pick_device, print_r1_tables, save_policy, save_reference, save_rft, score_once,
                  score_reference_once, timed)
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import toy_splits


# --------------------------------------------------------------------------------------------
# Flags: every value checked when parsed, the error naming the flag
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, choices=(*ORDER, "all"),
                   help="reference | spacer | r1 | eval | all")
    p.add_argument("--device", default="auto", type=device_flag,
                   help="auto (CUDA when present) | cpu | cuda[:N]")
    p.add_argument("--preset", default="tutorial", choices=PRESETS,
                   help="tutorial (2 CPU cores) | paper (the papers' proportions, for a GPU; presets.py)")
    p.add_argument("--runs", default=None,
                   help="folder for checkpoints and logs (default: runs, runs/paper for --preset paper)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run from its last save")
    again.add_argument("--overwrite", action="store_true",
                       help="start over where an earlier run's files are (removed at the first write)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests")
    p.add_argument("--anchor", default="spacer", choices=PA.ANCHORS, help="spacer stage: which anchoring")
    p.add_argument("--alpha", type=number(float, 0.0), default=None,
                   help="spacer stage: likelihood-reward weight (ablations)")
    p.add_argument("--beta", type=number(float, 0.0), default=None,
                   help="spacer stage: KL-to-reference weight (ablations)")
    p.add_argument("--iterations", type=number(int, 1), default=None,
                   help="spacer stage: PPO iterations (default: config, also with --quick)")
    p.add_argument("--hidden", type=number(int, 1), default=None,
                   help="spacer stage: the policy's fused hidden width (default: config)")
    p.add_argument("--variants", action="store_true",
                   help="r1 stage: also RFT with GRPO-style and no-KL advantages")
    p.add_argument("--rft-lr", type=number(float, 0.0, strict=True), default=None,
                   help="r1 stage: RFT learning rate (default: config); writes runs/r1/seed<S>_lr<LR>")
    args = p.parse_args(argv)
    args.runs = RUNS[args.preset] if args.runs is None else args.runs
    if args.stage == "all" and not args.overwrite:
        args.resume = True                 # the main job picks up whatever an earlier run finished
    anchored = any(getattr(args, k) not in (None, 0.0) for k in ("alpha", "beta"))
    if anchored and (args.stage == "all" or args.stage == "spacer" and args.anchor != "spacer"):
        p.error("--alpha / --beta weight the reference anchors: only for --stage spacer --anchor spacer")
    if D.launched() and args.stage in ("spacer", "all"):
        p.error("--stage spacer / all under torchrun: SPACeR's PPO runs in one process (README: torchrun)")
    return args


# --------------------------------------------------------------------------------------------
# The reference model: learning-rate schedule, BC / CAT-K epochs, validation, evaluation
# --------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def same_preset(saved: ReferenceStageConfig, path: Path, preset: str) -> ReferenceStageConfig:
    """`saved`, the reference settings stored in `path`, when they are of this run's preset: runs of
    two presets never mix (no policy anchored to, no model tuned from, no score of another's reference)."""
    if saved.preset != preset:
        raise SystemExit(f"{path}: a reference of --preset {saved.preset} (D = {saved.D}, {saved.layers} "
                         f"layers), but this run is --preset {preset}: give each preset its own --runs "
                         f"folder (default {RUNS[preset]}), or retrain it: --stage reference --preset "
                         f"{preset} --overwrite")
    return saved


def reference_settings(path: Path, preset: str) -> ReferenceStageConfig:
    """The reference stage's settings saved with checkpoint `path`, refused when of another preset."""
    saved = ReferenceStageConfig(**load_checkpoint(path, ("stage_cfg",))["stage_cfg"])
    return same_preset(saved, path, preset)


@torch.no_grad()
def validate(model, data: S.Scenes, enc: dict, cfg: ReferenceStageConfig, device) -> tuple:
    """Teacher-forced BC loss (with the training smoothing) and token accuracy on held-out scenes."""
    model.eval()
    tot_loss = tot_acc = 0.0
    for idx in S.batches(data.B, cfg.batch_size, shuffle=False):
        loss, acc = RM.bc_loss(model, *S.batch_of(data, enc, device, idx), cfg.label_smoothing)
        tot_loss += loss.item() * len(idx)
        tot_acc += acc.item() * len(idx)
    model.train()
    return tot_loss / data.B, tot_acc / data.B


def train_phase(phase: str, model, tok, opt, data: dict, enc: dict, cfg: ReferenceStageConfig, device,
                start_epoch: int, epochs: int, peak_lr: float, run: Run) -> None:
    """Epochs of BC ("bc") or CAT-K (any other phase name) from start_epoch; after each, the log,
    then the checkpoint <phase>.pt. The loss and the gradient norm are checked every step. Under
    torchrun each rank takes its shard of every batch and steps through DDP (distributed.py)."""
    n_batches, ddp = math.ceil(data["train"].B / cfg.batch_size), D.wrap(model)
    total = epochs * n_batches
    model.train()
    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + (500 if phase == "catk" else 0))
        t0, c0 = time.perf_counter(), time.process_time()
        sums = dict(loss=0.0, acc=0.0)
        order = S.batches(data["train"].B, cfg.batch_size, shuffle=True, gen=gen)
        bar = tqdm(order, desc=f"{phase} epoch {epoch + 1}/{epochs}", leave=False, disable=not run.writer)
        for i, idx in enumerate(bar):
            where = f"{run.stage}: {phase} epoch {epoch + 1}, step {i + 1}/{n_batches}"
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * n_batches + i, total, peak_lr, cfg.warmup_frac)
            s, tk = S.batch_of(data["train"], enc["train"], device, D.shard(idx))
            if phase == "bc":
                loss, acc = RM.bc_loss(ddp, s, tk, cfg.label_smoothing, **D.token_mean())
            else:
                loss, acc = RM.catk_loss(model, tok, s, cfg.catk_top_k, tk, ddp, **D.token_mean())
            check_finite(loss, f"{where}: the loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            check_finite(grad_norm, f"{where}: the gradient norm")
            opt.step()
            sums["loss"] += loss.item()
            sums["acc"] += acc.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.3f}")
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0  # wall and CPU seconds
        sums = D.mean_dict(sums)                   # each rank's share of every step's mean: the mean
        val_loss, val_acc = validate(model, data["val"], enc["val"], cfg, device)
        entry = dict(epoch=epoch + 1, train_loss=sums["loss"] / n_batches, train_acc=sums["acc"] / n_batches,
                     val_loss=val_loss, val_acc=val_acc, train_s=train_s, train_cpu_s=train_cpu_s)
        run.log[phase] = [e for e in run.log.get(phase, []) if e["epoch"] <= epoch] + [entry]
        run.write_log()  # first the log: a resume drops log entries past the checkpoint's epoch
        save_reference(run, run.dir / f"{phase}.pt", model, tok, stage_cfg=asdict(cfg),
                       optimizer=opt.state_dict(), epoch=epoch + 1, phase=phase)
        print(f"{phase} epoch {epoch + 1}/{epochs}: train loss {entry['train_loss']:.3f} "
              f"acc {entry['train_acc']:.3f} | val loss {val_loss:.3f} acc {val_acc:.3f} | {train_s:.1f} s")


# --------------------------------------------------------------------------------------------
# The reference stage: tokenizer, BC, CAT-K, evaluation
# --------------------------------------------------------------------------------------------
def stage_reference(args) -> dict:
    """Tokenizer, BC, CAT-K and the evaluation table; returns the evaluation results."""
    device = pick_device(args.device)
    run = replace(open_run(args, "reference", marks=("bc.pt", "catk.pt")), writer=D.is_writer())
    bc_path, catk_path = run.dir / "bc.pt", run.dir / "catk.pt"
    cfg = replace(reference_config(args.preset, args.quick), seed=args.seed)
    ck = run.checkpoint("catk.pt") or run.checkpoint("bc.pt")       # the latest phase saved
    if ck is not None:
        saved = same_preset(ReferenceStageConfig(**ck["stage_cfg"]), run.dir / f"{ck['phase']}.pt",
                            args.preset)
        if saved != cfg:
            print(f"--resume: continuing with the configuration saved in {run.dir / (ck['phase'] + '.pt')}")
        cfg = saved
    torch.manual_seed(cfg.seed)
    if ck is not None and ck["phase"] == "catk" and ck["epoch"] >= cfg.catk_epochs and "eval" in run.log \
            and run.log_path.stat().st_mtime >= catk_path.stat().st_mtime:
        print(f"--resume: {run.dir} is complete (BC, CAT-K and their evaluation); nothing to do")
        print(E.format_table(run.log["eval"]["results"]))
        return run.log["eval"]["results"]
    run.log["config"] = asdict(cfg)
    t_start = time.perf_counter()

    # ---- data and tokens ---------------------------------------------------------------------
    with D.writer_first():                 # rank 0 generates and caches the scenes, the others read them
        data = toy_splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed, cfg.cache_dir)
    print(f"toy scenes: train {data['train'].B}, val {data['val'].B}, test {data['test'].B} "
          f"(up to {data['train'].A} agents, {data['train'].seg_start.shape[1]} map segments)")
    if ck is not None:
        tok = MotionTokenizer.from_state_dict(ck["tokenizer"], K=cfg.K, steps_per_token=cfg.steps_per_token)
    else:
        t0 = time.perf_counter()
        tok = MotionTokenizer.fit(data["train"], TokenizerConfig(K=cfg.K, steps_per_token=cfg.steps_per_token,
                                                                 seed=cfg.seed))
        run.log["tokenizer_s"] = time.perf_counter() - t0
    tok = tok.to(device)
    enc = {split: tok.encode_split(data[split]) for split in ("train", "val")}  # log tokens, once
    model = RM.ReferenceModel(model_config(cfg), tok.table).to(device)
    print(f"reference model: {model.n_params:,} parameters; K={cfg.K} tokens per type, "
          f"{cfg.steps_per_token} steps per token; device {device}")
    run.log["n_params"] = model.n_params

    # ---- behaviour cloning -------------------------------------------------------------------
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bc_start = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ck["phase"] == "bc":
            opt.load_state_dict(ck["optimizer"])
        bc_start = ck["epoch"] if ck["phase"] == "bc" else cfg.bc_epochs
    if bc_start < cfg.bc_epochs:
        train_phase("bc", model, tok, opt, data, enc, cfg, device, bc_start, cfg.bc_epochs, cfg.lr, run)

    # ---- CAT-K closed-loop SFT, from the BC weights with a fresh optimizer at ~0.1x the rate ----
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.catk_lr, weight_decay=cfg.weight_decay)
    catk_start = 0
    if ck is not None and ck["phase"] == "catk":
        opt.load_state_dict(ck["optimizer"])
        catk_start = ck["epoch"]
    if catk_start < cfg.catk_epochs:
        train_phase("catk", model, tok, opt, data, enc, cfg, device, catk_start, cfg.catk_epochs, cfg.catk_lr,
                    run)
    elif ck is None or ck["phase"] != "catk":  # zero CAT-K epochs: the CAT-K model is the BC model
        save_reference(run, catk_path, model, tok, stage_cfg=asdict(cfg), optimizer=opt.state_dict(), epoch=0,
                       phase="catk")

    # ---- evaluation on held-out scenes -------------------------------------------------------
    test = data["test"].to(device)
    results = {}
    t0 = time.perf_counter()
    results["constant velocity"] = E.score_method(E.constant_velocity, test, cfg.eval_R, batch=test.B)
    for name, path in (("BC", bc_path), ("CAT-K", catk_path)):
        m, _, _ = RM.load_reference(path, device)
        results[name] = dict(E.evaluate_model(m, tok, test, cfg, seed=cfg.seed), params=m.n_params)
    run.log["eval"] = dict(results=results, eval_s=time.perf_counter() - t0, R=cfg.eval_R, n_test=test.B)
    run.log["total_s_this_run"] = time.perf_counter() - t_start
    run.write_log()
    print(f"\nheld-out toy test scenes: {test.B}, {cfg.eval_R} rollouts each (WOSAC 2025 weights)")
    print(E.format_table(results))
    print(f"checkpoints: {bc_path}, {catk_path}\nlog and results: {run.log_path}")
    print(f"stage time: {run.log['total_s_this_run']:.0f} s")
    return results


# --------------------------------------------------------------------------------------------
# The spacer stage: SPACeR self-play PPO and its PPO / HR-PPO baselines (ppo_anchor.py)
# --------------------------------------------------------------------------------------------
def spacer_config(args) -> tuple:
    """(SpacerConfig, run name) from the flags: --anchor's method, the --quick preset, then --alpha,
    --beta, --iterations and --hidden on top (they also name the run)."""
    overrides = {k: getattr(args, k) for k in ("alpha", "beta", "iterations", "hidden")
                 if getattr(args, k, None) is not None}
    cfg = PA.anchor_config(args.anchor, seed=args.seed, **{**(SPACER_QUICK if args.quick else {}),
                                                            **overrides})
    name = args.anchor + "".join(f"_{k}{v:g}" for k, v in overrides.items())
    return cfg, name + (f"_seed{args.seed}" if args.seed else "")


def hr_ppo_teacher(run: Run, cfg: PA.SpacerConfig, data: dict, enc: dict, tok, device):
    """HR-PPO's decentralized behaviour-cloned teacher, trained once per run (bc.pt) on the training
    split (enc: its tokens); its top-1 accuracy on held-out validation tokens: log.json "bc_teacher"."""
    saved = run.checkpoint("bc.pt", device)
    if saved is None or "stats" not in saved:  # a bc.pt of before the held-out score is fitted again
        teacher, stats = train_bc(cfg, data["train"].to(device), enc, data["val"].to(device),
                                  tok.encode_split(data["val"]), tok.table, tok.n0, progress=True)
        saved = dict(teacher=teacher.state_dict(), stats=stats)
        run.save(run.dir / "bc.pt", functools.partial(S.save_atomic, saved), teacher=saved["teacher"])
    teacher = PA.LateFusionPolicy(tok.K, cfg.embed, cfg.bc_hidden, cfg.type_heads).to(device)
    teacher.load_state_dict(saved["teacher"])
    run.log["bc_teacher"] = st = saved["stats"]
    print(f"BC teacher ({st['train_scenes']} training scenes x {st['epochs']} epochs): top-1 token accuracy "
          f"{st['val_accuracy']:.3f} on {st['val_tokens']:,} held-out validation tokens, "
          f"{st['train_accuracy']:.3f} on its training tokens -> {run.dir / 'bc.pt'}")
    return teacher.eval()


def stage_spacer(args) -> dict:
    """Self-play PPO of the small decentralized policy on the reference's toy training scenes,
    anchored to the frozen CAT-K reference (--anchor spacer) or as the PPO / HR-PPO baselines, then
    R = 32 rollouts per held-out test scene. Writes runs/spacer/<run>/policy.pt (atomically, every few
    iterations: --resume continues) and log.json; scores the reference once; prints every run's table.

        python train.py --stage spacer --anchor ppo|hr-ppo|spacer [--alpha A --beta B] [--seed S]"""
    device = pick_device(args.device)
    cfg, name = spacer_config(args)
    run = open_run(args, f"spacer/{name}", marks=("policy.pt",))
    state = run.checkpoint("policy.pt", device)
    if state is not None:
        cfg = PA.SpacerConfig(**state["cfg"])
        print(f"--resume: continuing {run.dir / 'policy.pt'} from iteration "
              f"{state['iteration']}/{cfg.iterations}")
        if state["iteration"] >= cfg.iterations and "eval" in run.log:
            print(f"--resume: {run.dir} is complete (training and evaluation); nothing to do")
            print(E.spacer_table(run.dir.parent))
            return run.log["eval"]
    ref_path = Path(args.runs) / "reference" / "catk.pt"
    if not ref_path.is_file():
        print(f"no reference checkpoint at {ref_path}: training it first (the reference stage)")
        stage_reference(args)
    run.log = dict(config=asdict(cfg), reference=str(ref_path))

    # ---- data: the reference's own training logs (as tokens) and test scenes -------------------
    ref_stage = reference_settings(ref_path, args.preset)
    ref, tok, _ = RM.load_reference(ref_path, device)
    if state is not None and state["K"] != tok.K:          # e.g. a --quick policy over another vocabulary
        raise SystemExit(f"{run.dir / 'policy.pt'}: a policy over {state['K']} tokens per type, but the "
                         f"reference {ref_path} has K = {tok.K}: rerun with --overwrite")
    data = toy_splits(ref_stage.n_train, ref_stage.n_val, ref_stage.n_test, ref_stage.data_seed,
                      ref_stage.cache_dir)
    train_scenes = data["train"].to(device)
    enc = tok.encode_split( data["train"])

    # ---- models: the frozen reference as a (scenes, ids, id_valid) callable, HR-PPO's teacher ---
    log_p_ref = functools.partial(RM.log_p_ref, ref, tok)
    teacher = hr_ppo_teacher(run, cfg, data, enc, tok, device) if args.anchor == "hr-ppo" else None
    n_params = PA.count_parameters(PA.LateFusionPolicy(tok.K, cfg.embed, cfg.hidden, cfg.type_heads))
    print(f"{name}: policy {n_params:,} parameters (reference {ref.n_params:,}); {cfg.num_worlds} worlds x "
          f"{cfg.iterations} iterations; alpha {cfg.alpha}, beta {cfg.beta}; device {device}")

    # ---- self-play PPO -------------------------------------------------------------------------
    t0 = time.perf_counter()
    policy, history = PA.train(cfg, train_scenes, enc, tok.table, tok.n0, log_p_ref=log_p_ref,
                               teacher=teacher, state=state, ckpt_fn=functools.partial(save_policy, run),
                               progress=True)
    steps = sum(h["agent_steps"] for h in history)
    busy_s = sum(h["rollout_s"] + h["reference_s"] + h["update_s"] for h in history)
    run.log.update(n_params=n_params, reference_params=ref.n_params, history=history,
                   train_s_this_run=time.perf_counter() - t0, agent_steps=steps,
                   train_sps=steps / max(busy_s, 1e-9))

    # ---- evaluation on held-out test scenes, R rollouts each -----------------------------------
    n_test = min(data["test"].B, SPACER_QUICK_TEST if args.quick else data["test"].B)
    test = data["test"].select(slice(0, n_test)).to(device)
    policy.eval()
    torch.manual_seed(cfg.seed)
    timing = {}
    rollout = lambda s, R: PA.policy_rollout(policy, s, R, tok.table, cfg, timing)
    run.log["eval"] = E.score_method(rollout, test, cfg.eval_rollouts, cfg.eval_batch, progress=True)
    run.log["eval"]["policy_only_scenarios_per_s"] = n_test * cfg.eval_rollouts / timing["policy_s"]
    run.write_log()
    score_reference_once(run, ref_path, ref, tok, ref_stage, test, cfg)
    print(f"\nheld-out toy test scenes: {n_test}, {cfg.eval_rollouts} rollouts each (WOSAC 2025 weights)")
    print(E.spacer_table(run.dir.parent))
    print(E.spacer_seed_tables(run.dir.parent))  # Table 1 over seeds, once a run name has two
    print(f"training: {steps:,} agent-steps at {run.log['train_sps']:.0f} agent-steps/s")
    print(f"policy: {run.dir / 'policy.pt'}\nlog and results: {run.log_path}")
    return run.log["eval"]


# --------------------------------------------------------------------------------------------
# The r1 stage: SMART-R1's SFT-RFT-SFT schedule against SFT-SFT (r1_finetune.py)
# --------------------------------------------------------------------------------------------
R1_ROWS = ("BC", "SFT", "SFT-RFT", "SFT-SFT", "SFT-RFT-SFT", "SFT-RFT (GRPO)", "SFT-RFT (no KL)",
           "SFT-SFT (trajectory-matched)")
R1_VARIANTS = (("grpo", "SFT-RFT (GRPO)"), ("reinforce", "SFT-RFT (no KL)"))  # --variants: RFT baselines


def r1_config(args) -> tuple:
    """(R1Config, run name) from the flags; a --rft-lr run is a variant of the schedule, with its
    own folder, not one of the seeds."""
    cfg = replace(R1.R1Config(**R1_QUICK) if args.quick else R1.R1Config(), seed=args.seed)
    if args.rft_lr is not None:
        cfg = replace(cfg, lr=args.rft_lr)
    R1.check_config(cfg)
    return cfg, f"r1/seed{cfg.seed}" + ("" if args.rft_lr is None else f"_lr{args.rft_lr:g}")


def sft_phase(run: Run, name: str, init: Path, epochs: int, tok, data: dict, enc: dict,
              cfg: ReferenceStageConfig, lr: float, device) -> Path:
    """A CAT-K sub-stage (SFT-1, SFT-2, SFT-SFT) from checkpoint `init`, continued from <name>.pt."""
    path = run.dir / f"{name}.pt"
    ck = run.checkpoint(path.name)
    model = RM.load_reference(path if ck else init, device)[0].train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    if ck:
        opt.load_state_dict(ck["optimizer"])
    start = ck["epoch"] if ck else 0
    if start < epochs:
        train_phase(name, model, tok, opt, data, enc, cfg, device, start, epochs, lr, run)
    elif ck is None:                          # zero epochs: a copy of the starting model
        save_reference(run, path, model, tok, stage_cfg=asdict(cfg), optimizer=opt.state_dict(), epoch=0,
                       phase=name)
    return path


def rft_phase(run: Run, kind: str, sft1: Path, tau: float, cfg: R1.R1Config, tok, get_batch, n_train: int,
              device) -> Path:
    """RFT of SFT-1 with the `kind` advantage against the frozen SFT-1, continued from rft_<kind>.pt."""
    path, cfg = run.dir / f"rft_{kind}.pt", R1.variant_config(cfg, kind)
    ck = run.checkpoint(path.name)
    model = RM.load_reference(path if ck else sft1, device)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ck:
        opt.load_state_dict(ck["optimizer"])
    if ck is None or ck["step"] < cfg.rft_steps:
        save = functools.partial(save_rft, run, path, kind, model, tok, opt, cfg, tau)
        sft = R1.frozen_copy(RM.load_reference(sft1, device)[0])
        R1.train_rft(model, sft, tok, get_batch, n_train, cfg, tau, opt, ck["step"] if ck else 0,
                     ck["history"] if ck else [], save)
    return path


def stage_r1(args) -> dict:
    """SMART-R1 on the reference's toy scenes, the paper's split (r1_finetune.schedule): SFT-1 = N CAT-K
    epochs from BC (the reference stage's CAT-K model when it is exactly that), RFT with MPO
    against the frozen SFT-1, SFT-2 = N CAT-K epochs, and the control SFT-SFT = SFT-1 + N CAT-K
    epochs (2N in both arms, the same rate schedule); with --variants also RFT with the GRPO-style
    and the no-KL REINFORCE advantages, and the trajectory-matched control. Every model is scored
    on the held-out test scenes with eval_R rollouts (one sampling seed for all). Writes runs/r1/seed<S>/
    *.pt and log.json after every epoch / few RFT steps (--resume continues); prints the tables."""
    device = pick_device(args.device)
    cfg, stage = r1_config(args)
    run = replace(open_run(args, stage, marks=("log.json", "*.pt")), writer=D.is_writer())
    ref_dir = Path(args.runs) / "reference"
    bc_path, catk_path = ref_dir / "bc.pt", ref_dir / "catk.pt"
    if not (bc_path.is_file() and catk_path.is_file()):
        print(f"no reference checkpoints under {ref_dir}: training them first (the reference stage)")
        stage_reference(args)
    if "config" in run.log:
        cfg = R1.R1Config(**run.log["config"])
        R1.check_config(cfg)
        print(f"--resume: continuing {run.dir} with its saved configuration")
    else:
        run.log = dict(config=asdict(cfg), reference=str(ref_dir), wall_s={}, eval={})
    torch.manual_seed(cfg.seed)

    # ---- data, the tokenizer, the SFT settings (the reference stage's CAT-K settings) ------------
    ref_cfg = reference_settings(bc_path, args.preset)
    with D.writer_first():
        data = toy_splits(ref_cfg.n_train, ref_cfg.n_val, ref_cfg.n_test, ref_cfg.data_seed,
                          ref_cfg.cache_dir)
    _, tok, _ = RM.load_reference(bc_path, device)
    enc = {split: tok.encode_split(data[split]) for split in ("train", "val")}
    n_train = data["train"].B
    epochs = R1.schedule(cfg, n_train)
    sft_cfg = replace(ref_cfg, seed=cfg.seed)      # train_phase's batch size, CAT-K top-k, clip, warm-up
    sft_lr = ref_cfg.catk_lr if cfg.sft_lr is None else cfg.sft_lr
    variants = ("mpo", "grpo", "reinforce") if args.variants else ("mpo",)
    for kind in variants:
        R1.variant_config(cfg, kind)            # a bad variant fails before any training
    print(f"SMART-R1 from {ref_dir}: {n_train} training scenes; CAT-K epochs: SFT-1 {epochs['sft1']}, "
          f"SFT-2 {epochs['sft2']}, SFT-SFT {epochs['sft1']} + {epochs['sftsft']}; RFT {cfg.rft_steps} "
          f"steps x {cfg.scenes_per_step} scenes x M={cfg.M} rollouts in {cfg.groups} set(s); "
          f"device {device}")
    get_batch = functools.partial(S.batch_of, data["train"], enc["train"], device)
    sft = functools.partial(sft_phase, run, tok=tok, data=data, enc=enc, cfg=sft_cfg, lr=sft_lr,
                            device=device)
    rft = functools.partial(rft_phase, run, cfg=cfg, tok=tok, get_batch=get_batch, n_train=n_train,
                            device=device)
    test = data["test"].to(device)
    score = functools.partial(score_once, run, tok=tok, test=test, cfg=replace(ref_cfg, eval_R=cfg.eval_R),
                              known=E.reference_scores(ref_dir, cfg.eval_R, test.B), device=device)

    # ---- the schedule ----------------------------------------------------------------------------
    sft1 = catk_path                           # the reference stage's CAT-K model when it is SFT-1 exactly
    if ref_cfg.catk_epochs != epochs["sft1"] or sft_lr != ref_cfg.catk_lr:
        with timed(run, "sft1"):
            sft1 = sft("sft1", bc_path, epochs["sft1"])
    with timed(run, "eval"):
        score("BC", bc_path)
        score("SFT", sft1)
    if run.log.get("tau") is None:             # MPO's baseline: given, or SFT-1's mean training reward
        if cfg.tau is not None:
            run.log["tau"] = cfg.tau
        else:
            with timed(run, "tau"):
                sft1_model = RM.load_reference(sft1, device)[0]
                run.log["tau"] = R1.measure_tau(sft1_model, tok, get_batch, n_train, cfg)
        run.write_log()
    tau = run.log["tau"]
    print(f"tau = {tau:.4f} ({'given' if cfg.tau is not None else 'SFT-1 mean reward on training scenes'}, "
          f"M={cfg.M} rollouts in {cfg.groups} group(s))")
    with timed(run, "rft_mpo"):
        rft_mpo = rft("mpo", sft1, tau)
    with timed(run, "eval"):
        score("SFT-RFT", rft_mpo)
    with timed(run, "sft2"):
        sft2 = sft("sft2", rft_mpo, epochs["sft2"])
    with timed(run, "eval"):
        score("SFT-RFT-SFT", sft2)
    with timed(run, "sftsft"):
        sftsft = sft("sftsft", sft1, epochs["sftsft"])
    with timed(run, "eval"):
        score("SFT-SFT", sftsft)
    if args.variants:                          # the old control: RFT's trajectories as CAT-K epochs
        with timed(run, "sftsft_traj"):
            traj = sft("sftsft_traj", sft1, epochs["sftsft_traj"])
        with timed(run, "eval"):
            score("SFT-SFT (trajectory-matched)", traj)
    for kind, name in R1_VARIANTS:
        if kind in variants:
            with timed(run, f"rft_{kind}"):
                path = rft(kind, sft1, tau)
            with timed(run, "eval"):
                score(name, path)
    print_r1_tables(run, cfg, variants, test.B, Path(args.runs), R1_ROWS)
    return run.log["eval"]


# ---- the eval stage and the entry point ----------------------------------------------------
def stage_eval(args) -> dict:
    """Every method side by side (evaluate.run_eval): held-out toy and real WOMD scenes, R = 32 rollouts
    each; runs/eval/results.{md,json} and pictures; a missing checkpoint is listed. --quick: EVAL_QUICK."""
    quick = EVAL_QUICK if args.quick else {}
    if (Path(args.runs) / "reference" / "bc.pt").is_file():
        reference_settings(Path(args.runs) / "reference" / "bc.pt", args.preset)
    return E.run_eval(args.runs, pick_device(args.device), seed=args.seed, **quick)


STAGES = {"reference": stage_reference, "spacer": stage_spacer, "r1": stage_r1, "eval": stage_eval}
ORDER = ("reference", "spacer", "r1", "eval")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as stop:             # argparse has printed the usage and what is wrong with which flag
        return stop.code
    args.device = D.setup(args.device)     # under torchrun: join the process group, this rank's device
    wall = {}                              # seconds of wall time per stage (README: stage times)
    for stage in (ORDER if args.stage == "all" else (args.stage,)):
        t0 = time.perf_counter()
        if stage == "spacer" and args.stage == "all":  # the table's three rows: two baselines and SPACeR
            for anchor in ("ppo", "hr-ppo", "spacer"):
                t1 = time.perf_counter()
                with finite_steps(f"spacer --anchor {anchor}"):
                    stage_spacer(argparse.Namespace(**{**vars(args), "anchor": anchor}))
                wall[f"spacer --anchor {anchor}"] = time.perf_counter() - t1
        else:
            with finite_steps(stage):
                STAGES[stage](args)
            wall[stage] = time.perf_counter() - t0
        D.barrier()                        # the next stage reads what rank 0 wrote
    if len(wall) > 1:
        print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items())
              + f"; total {sum(wall.values()) / 60:.1f} min")
    D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
