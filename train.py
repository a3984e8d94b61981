"""The one entry point: python train.py --stage reference|spacer|r1|eval|all

Each stage is a plain function `stage_<name>(args)` that reads like its paper's algorithm:
data, model, loop, log. Every stage writes checkpoints atomically, keeps a JSON log, continues
with --resume (and does nothing when its work is complete), and prints where its files went.

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

    python train.py --stage all                    # the main job (about 80 min on 2 CPU cores)
    python train.py --stage all --quick            # a smoke run of the whole pipeline (~5 min)
    python train.py --stage reference --resume     # continue from the last saved epoch
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import evaluate as E
import ppo_anchor as PA
import r1_finetune as R1
import reference_model as RM
import scenes as S
from scenes import DT, NOW, T, Scenes
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import toy_dataset


@dataclass
class ReferenceStageConfig:
    # data
    n_train: int = 256            # toy training scenes
    n_val: int = 32               # held-out toy scenes for validation loss and token accuracy
    n_test: int = 32              # held-out toy scenes scored with eval_R rollouts
    data_seed: int = 0            # seed of the toy datasets (each split derives its own)
    cache_dir: str = "data"       # where generated toy datasets are cached
    # tokens
    K: int = 200                  # motion tokens per agent type
    steps_per_token: int = 2      # 0.1 s steps per token (2 = 5 Hz as in SPACeR)
    # model (reference_model.ReferenceConfig)
    D: int = 64                   # hidden size
    heads: int = 4                # attention heads
    layers: int = 2               # agent layers (temporal -> map -> agent attention each)
    dropout: float = 0.1          # dropout in attention and feed-forward outputs
    window: int = 4               # temporal attention span, token steps (0.8 s at 5 Hz)
    map_neighbours: int = 10      # map tokens per agent
    agent_neighbours: int = 6     # other agents per agent
    # behaviour cloning
    bc_epochs: int = 12           # epochs of next-token cross-entropy on the logs
    lr: float = 3e-3              # AdamW peak learning rate for BC
    batch_size: int = 16          # scenes per gradient step
    weight_decay: float = 0.01    # AdamW weight decay
    warmup_frac: float = 0.05     # fraction of a phase's steps with linear warm-up, then cosine decay
    grad_clip: float = 1.0        # gradient norm clip
    label_smoothing: float = 0.1  # BC label smoothing
    # CAT-K closed-loop SFT
    catk_epochs: int = 2          # epochs: each rolls every training batch out once and trains on it
    catk_lr: float = 3e-4         # 0.1x the BC rate
    catk_top_k: int = 32          # closest among the top-k tokens
    # evaluation
    eval_R: int = 32              # rollouts per test scene (WOSAC uses 32)
    eval_top_k: int = 8           # top-k sampling of the rollouts
    eval_temperature: float = 1.0  # sampling temperature of the rollouts
    eval_worlds: int = 256        # rollout worlds (scenes x R) computed at once
    seed: int = 0                 # seeds initialisation, shuffling and rollout sampling


def quick_config() -> ReferenceStageConfig:
    """Tiny sizes for smoke tests and CI (about a minute on 2 cores)."""
    return ReferenceStageConfig(n_train=24, n_val=8, n_test=4, K=64, D=32, heads=2, layers=1, window=4,
                                map_neighbours=8, agent_neighbours=4, bc_epochs=2, catk_epochs=1,
                                batch_size=8, eval_R=4, lr=3e-3, catk_lr=3e-4)


def model_config(cfg: ReferenceStageConfig) -> RM.ReferenceConfig:
    return RM.ReferenceConfig(K=cfg.K, steps_per_token=cfg.steps_per_token, D=cfg.D, heads=cfg.heads,
                              layers=cfg.layers, dropout=cfg.dropout, window=cfg.window,
                              map_neighbours=cfg.map_neighbours, agent_neighbours=cfg.agent_neighbours)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r}: not a device; use auto, cpu or cuda") from None


# --------------------------------------------------------------------------------------------
# Data: toy splits, trimming padded batches
# --------------------------------------------------------------------------------------------
AGENT_FIELDS = ("pos", "z", "yaw", "vel", "valid", "size", "agent_type", "controlled", "eval_mask", "goal",
                "route", "route_valid", "style")
SEG_FIELDS = ("seg_start", "seg_end", "seg_type", "seg_code", "seg_poly", "seg_prev", "seg_next", "seg_valid")


def trim(scenes: Scenes, tokens: dict | None = None) -> tuple:
    """Drop trailing padding agents and map segments of a batch (a dataset is padded to its largest
    scene; a batch rarely needs that much). tokens [B, A, ...] are trimmed alongside."""
    any_agent = scenes.valid.any(-1).any(0)                                    # [A]
    A = int(any_agent.nonzero().max()) + 1 if bool(any_agent.any()) else 1
    any_seg = scenes.seg_valid.any(0)                                          # [S]
    Sn = int(any_seg.nonzero().max()) + 1 if bool(any_seg.any()) else 1
    t = scenes.tensors()
    unknown = set(t) - set(AGENT_FIELDS) - set(SEG_FIELDS) - {"tl_lane", "tl_state", "tl_stop"}
    if unknown:
        raise ValueError(f"train.trim: Scenes fields {sorted(unknown)} are not classified as agent or map fields")
    for name in AGENT_FIELDS:
        t[name] = t[name][:, :A]
    for name in SEG_FIELDS:
        t[name] = t[name][:, :Sn]
    out = Scenes(**t, scene_id=list(scenes.scene_id))
    return out, (None if tokens is None else {k: v[:, :A] for k, v in tokens.items()})


def load_splits(cfg: ReferenceStageConfig) -> dict:
    """Toy train / val / test splits (generated once, then cached on disk by toy_scenes.toy_dataset)."""
    sizes = dict(train=cfg.n_train, val=cfg.n_val, test=cfg.n_test)
    return {split: toy_dataset(split, n, seed=cfg.data_seed, cache_dir=cfg.cache_dir) for split, n in sizes.items()}


def batches(n: int, size: int, shuffle: bool, gen=None) -> list:
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warm = max(1, int(warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


# --------------------------------------------------------------------------------------------
# Evaluation: rollouts scored by the WOSAC realism metric
# --------------------------------------------------------------------------------------------
def evaluate_model(model, tok, scenes: Scenes, cfg: ReferenceStageConfig, seed: int) -> dict:
    """WOSAC metrics, goal rate and rollout scenarios per second of R sampled rollouts per scene."""
    gen = torch.Generator(device=scenes.device).manual_seed(seed)
    roll = E.reference_rollout(model, tok, cfg.eval_top_k, cfg.eval_temperature, cfg.eval_worlds, gen)
    return E.score_method(roll, scenes, cfg.eval_R, batch=scenes.B)


# --------------------------------------------------------------------------------------------
# The reference stage
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(model, data: Scenes, enc: dict, cfg: ReferenceStageConfig, device) -> tuple:
    """Teacher-forced BC loss (with the training smoothing) and token accuracy on held-out scenes."""
    model.eval()
    tot_loss = tot_acc = 0.0
    for idx in batches(data.B, cfg.batch_size, shuffle=False):
        s, tk = trim(data.select(idx), {k: v[idx] for k, v in enc.items()})
        loss, acc = RM.bc_loss(model, s.to(device), {k: v.to(device) for k, v in tk.items()}, cfg.label_smoothing)
        tot_loss += loss.item() * len(idx)
        tot_acc += acc.item() * len(idx)
    model.train()
    return tot_loss / data.B, tot_acc / data.B


def train_phase(phase: str, model, tok, opt, data: dict, enc: dict, cfg: ReferenceStageConfig, device,
                start_epoch: int, epochs: int, peak_lr: float, ckpt: Path, log: dict, log_path: Path) -> None:
    """Epochs of BC ("bc") or CAT-K ("catk") from start_epoch; checkpoint and log after each."""
    n_batches = math.ceil(data["train"].B / cfg.batch_size)
    total = epochs * n_batches
    model.train()
    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + (500 if phase == "catk" else 0))
        t0, c0 = time.perf_counter(), time.process_time()
        sums = dict(loss=0.0, acc=0.0)
        bar = tqdm(batches(data["train"].B, cfg.batch_size, shuffle=True, gen=gen), desc=f"{phase} epoch {epoch + 1}/{epochs}",
                   leave=False)
        for i, idx in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * n_batches + i, total, peak_lr, cfg.warmup_frac)
            s, tk = trim(data["train"].select(idx), {k: v[idx] for k, v in enc["train"].items()})
            s, tk = s.to(device), {k: v.to(device) for k, v in tk.items()}
            if phase == "bc":
                loss, acc = RM.bc_loss(model, s, tk, cfg.label_smoothing)
            else:
                loss, acc = RM.catk_loss(model, tok, s, top_k=cfg.catk_top_k, enc=tk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sums["loss"] += loss.item()
            sums["acc"] += acc.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc.item():.3f}")
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0  # wall and CPU seconds
        val_loss, val_acc = validate(model, data["val"], enc["val"], cfg, device)
        entry = dict(epoch=epoch + 1, train_loss=sums["loss"] / n_batches, train_acc=sums["acc"] / n_batches,
                     val_loss=val_loss, val_acc=val_acc, train_s=train_s, train_cpu_s=train_cpu_s)
        log[phase] = [e for e in log.get(phase, []) if e["epoch"] <= epoch] + [entry]
        S.save_atomic(log, log_path)  # first the log: a resume drops log entries past the checkpoint's epoch
        RM.save_checkpoint(ckpt, model, tok, stage_cfg=asdict(cfg), optimizer=opt.state_dict(), epoch=epoch + 1,
                           phase=phase)
        print(f"{phase} epoch {epoch + 1}/{epochs}: train loss {entry['train_loss']:.3f} acc {entry['train_acc']:.3f} | "
              f"val loss {val_loss:.3f} acc {val_acc:.3f} | {train_s:.1f} s")


@torch.no_grad()
def encode_split(tok: MotionTokenizer, data: Scenes, chunk: int = 64) -> dict:
    """tok.encode over a whole split, in chunks of scenes, on the tokenizer's device, kept on CPU."""
    parts = [tok.encode(data.select(slice(i, i + chunk)).to(tok.device)) for i in range(0, data.B, chunk)]
    return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def stage_reference(args) -> dict:
    """Tokenizer, BC, CAT-K and the evaluation table; returns the evaluation results."""
    device = pick_device(args.device)
    out_dir = Path(args.runs) / "reference"
    bc_path, catk_path, log_path = out_dir / "bc.pt", out_dir / "catk.pt", out_dir / "log.json"
    cfg = quick_config() if args.quick else ReferenceStageConfig()
    cfg = replace(cfg, seed=args.seed)
    resume_from = None
    if args.resume:
        resume_from = catk_path if catk_path.is_file() else bc_path if bc_path.is_file() else None
        if resume_from is None:
            print(f"--resume: nothing saved under {out_dir}; starting from scratch")
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        saved = ReferenceStageConfig(**ck["stage_cfg"])
        if saved != cfg:
            print(f"--resume: continuing with the configuration saved in {resume_from}")
        cfg = saved
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:  # a fresh run never mixes with checkpoints of an earlier one
        for stale in (bc_path, catk_path):
            stale.unlink(missing_ok=True)
    log = json.loads(log_path.read_text()) if resume_from is not None and log_path.is_file() else {}
    if resume_from == catk_path and ck["epoch"] >= cfg.catk_epochs and "eval" in log \
            and log_path.stat().st_mtime >= catk_path.stat().st_mtime:
        print(f"--resume: {out_dir} is complete (BC, CAT-K and their evaluation); nothing to do")
        print(E.format_table(log["eval"]["results"]))
        return log["eval"]["results"]
    log["config"] = asdict(cfg)
    t_start = time.perf_counter()

    # ---- data and tokens ---------------------------------------------------------------------
    data = load_splits(cfg)
    print(f"toy scenes: train {data['train'].B}, val {data['val'].B}, test {data['test'].B} "
          f"(up to {data['train'].A} agents, {data['train'].seg_start.shape[1]} map segments)")
    if resume_from is not None:
        tok = MotionTokenizer.from_state_dict(ck["tokenizer"], K=cfg.K, steps_per_token=cfg.steps_per_token).to(device)
    else:
        t0 = time.perf_counter()
        tok = MotionTokenizer.fit(data["train"], TokenizerConfig(K=cfg.K, steps_per_token=cfg.steps_per_token,
                                                                 seed=cfg.seed)).to(device)
        log["tokenizer_s"] = time.perf_counter() - t0
    enc = {split: encode_split(tok, data[split]) for split in ("train", "val")}  # log tokens, once
    model = RM.ReferenceModel(model_config(cfg), tok.table).to(device)
    print(f"reference model: {model.n_params:,} parameters; K={cfg.K} tokens per type, "
          f"{cfg.steps_per_token} steps per token; device {device}")
    log["n_params"] = model.n_params

    # ---- behaviour cloning -------------------------------------------------------------------
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bc_start = 0
    if resume_from is not None:
        model.load_state_dict(ck["model"])
        if ck["phase"] == "bc":
            opt.load_state_dict(ck["optimizer"])
            bc_start = ck["epoch"]
        else:
            bc_start = cfg.bc_epochs
    if bc_start < cfg.bc_epochs:
        train_phase("bc", model, tok, opt, data, enc, cfg, device, bc_start, cfg.bc_epochs, cfg.lr,
                    bc_path, log, log_path)

    # ---- CAT-K closed-loop SFT, from the BC weights with a fresh optimizer at ~0.1x the rate ----
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.catk_lr, weight_decay=cfg.weight_decay)
    catk_start = 0
    if resume_from is not None and ck["phase"] == "catk":
        opt.load_state_dict(ck["optimizer"])
        catk_start = ck["epoch"]
    if catk_start < cfg.catk_epochs:
        train_phase("catk", model, tok, opt, data, enc, cfg, device, catk_start, cfg.catk_epochs, cfg.catk_lr,
                    catk_path, log, log_path)
    elif not catk_path.is_file():  # zero CAT-K epochs: the CAT-K model is the BC model
        RM.save_checkpoint(catk_path, model, tok, stage_cfg=asdict(cfg), optimizer=opt.state_dict(), epoch=0,
                           phase="catk")

    # ---- evaluation on held-out scenes -------------------------------------------------------
    test = data["test"].to(device)
    results = {}
    t0 = time.perf_counter()
    results["constant velocity"] = E.score_method(E.constant_velocity, test, cfg.eval_R, batch=test.B)
    for name, path in (("BC", bc_path), ("CAT-K", catk_path)):
        m, _, _ = RM.load_reference(path, device)
        results[name] = dict(evaluate_model(m, tok, test, cfg, seed=cfg.seed), params=m.n_params)
    log["eval"] = dict(results=results, eval_s=time.perf_counter() - t0, R=cfg.eval_R, n_test=test.B)
    log["total_s_this_run"] = time.perf_counter() - t_start
    S.save_atomic(log, log_path)
    print(f"\nheld-out toy test scenes: {test.B}, {cfg.eval_R} rollouts each (WOSAC 2025 weights)")
    print(E.format_table(results))
    print(f"checkpoints: {bc_path}, {catk_path}\nlog and results: {log_path}")
    print(f"stage time: {log['total_s_this_run']:.0f} s")
    return results


# --------------------------------------------------------------------------------------------
# The spacer stage: SPACeR self-play PPO and its PPO / HR-PPO baselines (ppo_anchor.py)
# --------------------------------------------------------------------------------------------
SPACER_QUICK = dict(num_worlds=4, iterations=3, minibatch_size=512, eval_rollouts=4, eval_batch=4,
                    bc_scenes=8, bc_epochs=2, save_every=1)  # --quick: a smoke run of about a minute
SPACER_COLUMNS = ("realism_meta", "kinematic", "interactive", "map_based", "min_ade", "collision_rate",
                  "offroad_rate", "goal_rate", "scenarios_per_s", "policy_only_scenarios_per_s", "n_params", "entropy",
                  "kl_ref", "logp_ref_exec")
TRAIN_COLUMNS = ("entropy", "kl_ref", "logp_ref_exec")  # training diagnostics, mean of the last 5 iterations


def spacer_table(spacer_dir: Path) -> str:
    """The SPACeR table: every finished run under runs/spacer and the reference, one row each."""
    rows = {}
    for log_path in sorted(spacer_dir.glob("*/log.json")):
        log = json.loads(log_path.read_text())
        if "eval" in log:
            tail = log.get("history", [])[-5:]
            train = {k: sum(h[k] for h in tail) / len(tail) for k in TRAIN_COLUMNS if tail and k in tail[0]}
            rows[log_path.parent.name] = {**log["eval"], **train, "n_params": log["n_params"]}
    lines = ["| method | " + " | ".join(SPACER_COLUMNS) + " |", "|---" * (len(SPACER_COLUMNS) + 1) + "|"]
    fmt = lambda k, v: "-" if v is None else f"{v:,.0f}" if k == "n_params" else f"{v:.1f}" if k.endswith("_per_s") \
        else f"{v:.4f}"
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(k, m.get(k)) for k in SPACER_COLUMNS) + " |")
    return "\n".join(lines)


def stage_spacer(args) -> dict:
    """Self-play PPO of the small decentralized policy on the reference's toy training scenes,
    anchored to the frozen CAT-K reference (--anchor spacer) or as the PPO / HR-PPO baselines, then
    R = 32 rollouts per held-out test scene. Writes runs/spacer/<run>/policy.pt (atomically, every
    few iterations: --resume continues) and log.json; scores the reference the same way once
    (runs/spacer/reference/log.json); prints the table of every run so far.

        python train.py --stage spacer                          # SPACeR (alpha 0, beta 0.1)
        python train.py --stage spacer --anchor ppo             # task reward only
        python train.py --stage spacer --anchor hr-ppo          # KL to a behaviour-cloned policy
        python train.py --stage spacer --alpha 0.1 --beta 0     # ablation: likelihood reward only
        python train.py --stage spacer --quick                  # smoke run (about a minute)
    """
    device = pick_device(args.device)
    anchor = getattr(args, "anchor", None) or "spacer"
    ref_path = Path(args.runs) / "reference" / "catk.pt"
    if not ref_path.is_file():
        print(f"no reference checkpoint at {ref_path}: training it first (the reference stage)")
        stage_reference(args)
    ref, tok, _ = RM.load_reference(ref_path, device)
    ref_stage = ReferenceStageConfig(**load_checkpoint(ref_path)["stage_cfg"])
    data = load_splits(ref_stage)                   # the reference's own training logs and test scenes

    # ---- configuration, run folder, resume ----------------------------------------------------
    overrides = {k: getattr(args, k) for k in ("alpha", "beta", "iterations", "hidden") if getattr(args, k, None) is not None}
    cfg = PA.anchor_config(anchor, seed=args.seed, **(SPACER_QUICK if args.quick else {}), **overrides)
    name = anchor + "".join(f"_{k}{v:g}" for k, v in overrides.items()) + (f"_seed{args.seed}" if args.seed else "")
    spacer_dir = Path(args.runs) / "spacer"
    out_dir = spacer_dir / name
    policy_path, bc_path, log_path = out_dir / "policy.pt", out_dir / "bc.pt", out_dir / "log.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    state = None
    if args.resume and policy_path.is_file():
        state = torch.load(policy_path, map_location=device, weights_only=True)
        cfg = PA.SpacerConfig(**state["cfg"])
        print(f"--resume: continuing {policy_path} from iteration {state['iteration']}/{cfg.iterations}")
    elif args.resume:
        print(f"--resume: nothing saved under {out_dir}; starting from scratch")
    if state is None:  # a fresh run never mixes with checkpoints of an earlier one
        for stale in (policy_path, bc_path, log_path):
            stale.unlink(missing_ok=True)
    if state is not None and state["iteration"] >= cfg.iterations and log_path.is_file():
        done = json.loads(log_path.read_text())
        if "eval" in done:
            print(f"--resume: {out_dir} is complete (training and evaluation); nothing to do")
            print(spacer_table(spacer_dir))
            return done["eval"]
    log = dict(config=asdict(cfg), reference=str(ref_path))

    # ---- the training logs as tokens; the frozen reference as a (scenes, ids, id_valid) callable --
    train_scenes = data["train"].to(device)
    enc = encode_split(tok, data["train"])
    log_p_ref = functools.partial(RM.log_p_ref, ref, tok)
    teacher = None
    if anchor == "hr-ppo":  # HR-PPO's decentralized behaviour-cloned teacher, trained once per run
        teacher = PA.LateFusionPolicy(tok.K, cfg.embed, cfg.bc_hidden, cfg.type_heads).to(device)
        if state is not None and bc_path.is_file():
            teacher.load_state_dict(torch.load(bc_path, map_location=device, weights_only=True))
        else:
            t0 = time.perf_counter()
            teacher, acc = PA.train_bc(cfg, train_scenes, {k: v.to(device) for k, v in enc.items()}, tok.table,
                                       tok.n0, progress=True)
            S.save_atomic(teacher.state_dict(), bc_path)
            log.update(bc_accuracy=acc, bc_s=time.perf_counter() - t0)
            print(f"BC teacher: {PA.count_parameters(teacher):,} parameters, token accuracy {acc:.3f} -> {bc_path}")
        teacher.eval()
    n_params = PA.count_parameters(PA.LateFusionPolicy(tok.K, cfg.embed, cfg.hidden, cfg.type_heads))
    print(f"{name}: policy {n_params:,} parameters (reference {ref.n_params:,}); {cfg.num_worlds} worlds x "
          f"{cfg.iterations} iterations; alpha {cfg.alpha}, beta {cfg.beta}; device {device}")

    # ---- self-play PPO -------------------------------------------------------------------------
    t0 = time.perf_counter()
    policy, history = PA.train(cfg, train_scenes, enc, tok.table, tok.n0, log_p_ref=log_p_ref,
                               teacher=teacher, state=state, ckpt_fn=lambda st: S.save_atomic(st, policy_path),
                               progress=True)
    steps = sum(h["agent_steps"] for h in history)
    log.update(n_params=n_params, reference_params=ref.n_params, history=history, train_s_this_run=time.perf_counter() - t0,
               agent_steps=steps, train_sps=steps / max(sum(h["rollout_s"] + h["reference_s"] + h["update_s"]
                                                            for h in history), 1e-9))

    # ---- evaluation on held-out test scenes, R rollouts each -----------------------------------
    n_test = min(data["test"].B, 4 if args.quick else data["test"].B)
    test = data["test"].select(slice(0, n_test)).to(device)
    policy.eval()
    torch.manual_seed(cfg.seed)
    timing = {}
    log["eval"] = E.score_method(lambda s, R: PA.policy_rollout(policy, s, R, tok.table, cfg, timing), test,
                                 cfg.eval_rollouts, cfg.eval_batch, progress=True)
    log["eval"]["policy_only_scenarios_per_s"] = n_test * cfg.eval_rollouts / timing["policy_s"]
    S.save_atomic(log, log_path)
    ref_log = spacer_dir / "reference" / "log.json"
    fresh = ref_log.is_file() and ref_log.stat().st_mtime > ref_path.stat().st_mtime
    if not fresh or json.loads(ref_log.read_text())["eval"]["n_scenes"] != n_test:
        ref_rollout = E.reference_rollout(ref, tok, ref_stage.eval_top_k, ref_stage.eval_temperature,
                                          ref_stage.eval_worlds)
        torch.manual_seed(cfg.seed)
        (spacer_dir / "reference").mkdir(parents=True, exist_ok=True)
        S.save_atomic(dict(reference=str(ref_path), n_params=ref.n_params, eval=E.score_method(
            ref_rollout, test, cfg.eval_rollouts, cfg.eval_batch, progress=True)), ref_log)
    print(f"\nheld-out toy test scenes: {n_test}, {cfg.eval_rollouts} rollouts each (WOSAC 2025 weights)")
    print(spacer_table(spacer_dir))
    print(f"training: {steps:,} agent-steps at {log['train_sps']:.0f} agent-steps/s")
    print(f"policy: {policy_path}\nlog and results: {log_path}")
    return log["eval"]


# --------------------------------------------------------------------------------------------
# The r1 stage: SMART-R1's SFT-RFT-SFT schedule against SFT-SFT (r1_finetune.py)
# --------------------------------------------------------------------------------------------
R1_ROWS = ("BC", "SFT", "SFT-RFT", "SFT-SFT", "SFT-RFT-SFT", "SFT-RFT (GRPO)", "SFT-RFT (no KL)",
           "SFT-SFT (trajectory-matched)")


def stage_r1(args) -> dict:
    """SMART-R1 on the reference's toy scenes, the paper's split (r1_finetune.schedule): SFT-1 = N
    CAT-K epochs from BC (the reference stage's CAT-K model when it is exactly that), RFT with MPO
    against the frozen SFT-1, SFT-2 = N CAT-K epochs, and the control SFT-SFT = SFT-1 + N CAT-K
    epochs (2N in both arms, the same rate schedule); with --variants also RFT with the GRPO-style
    and the no-KL REINFORCE advantages, and the trajectory-matched control. Every model is
    scored on the held-out test scenes with eval_R rollouts (one sampling seed for all). Writes
    runs/r1/seed<S>/*.pt and log.json atomically after every epoch / few RFT steps (--resume
    skips finished sub-stages and continues the current one); prints this seed's table and the
    mean over every seed run so far."""
    device = pick_device(args.device)
    ref_dir = Path(args.runs) / "reference"
    bc_path, catk_path = ref_dir / "bc.pt", ref_dir / "catk.pt"
    if not (bc_path.is_file() and catk_path.is_file()):
        print(f"no reference checkpoints under {ref_dir}: training them first (the reference stage)")
        stage_reference(args)
    ref_cfg = ReferenceStageConfig(**load_checkpoint(bc_path)["stage_cfg"])
    cfg = replace(R1.quick_config() if args.quick else R1.R1Config(), seed=args.seed)
    lr = getattr(args, "rft_lr", None)
    if lr is not None:                    # a variant of the schedule: its own folder, not one of the seeds
        cfg = replace(cfg, lr=lr)
    out_dir = Path(args.runs) / "r1" / (f"seed{cfg.seed}" + ("" if lr is None else f"_lr{lr:g}"))
    log_path = out_dir / "log.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.resume and log_path.is_file():
        log = json.loads(log_path.read_text())
        cfg = R1.R1Config(**log["config"])
        print(f"--resume: continuing {out_dir} with its saved configuration")
    else:
        if args.resume:
            print(f"--resume: nothing saved under {out_dir}; starting from scratch")
        for stale in out_dir.glob("*.pt"):   # a fresh run never mixes with checkpoints of an earlier one
            stale.unlink()
        log = dict(config=asdict(cfg), reference=str(ref_dir), wall_s={}, eval={})
    variants = ("mpo", "grpo", "reinforce") if getattr(args, "variants", False) else ("mpo",)
    rft_cfgs = {kind: R1.variant_config(cfg, kind) for kind in variants}   # checked before any training
    torch.manual_seed(cfg.seed)
    data = load_splits(ref_cfg)
    _, tok, _ = RM.load_reference(bc_path, device)
    enc = {split: encode_split(tok, data[split]) for split in ("train", "val")}
    n_train = data["train"].B
    sft_cfg = replace(ref_cfg, seed=cfg.seed)            # train_phase's batch size, CAT-K top-k, clip, warm-up
    sft_lr = ref_cfg.catk_lr if cfg.sft_lr is None else cfg.sft_lr
    sched = R1.schedule(cfg, n_train)                  # CAT-K epochs of each SFT phase
    print(f"SMART-R1 from {ref_dir}: {n_train} training scenes; CAT-K epochs: SFT-1 {sched['sft1']}, SFT-2 "
          f"{sched['sft2']}, SFT-SFT {sched['sft1']} + {sched['sftsft']}; RFT {cfg.rft_steps} steps x "
          f"{cfg.scenes_per_step} scenes x M={cfg.M} rollouts in {cfg.groups} set(s); device {device}")

    def load(path):
        return RM.load_reference(path, device)[0]

    def timed(name, fn):                         # wall and CPU seconds per sub-stage (the machine may be shared)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        log["wall_s"][name] = log["wall_s"].get(name, 0.0) + time.perf_counter() - t0
        cpu = log.setdefault("cpu_s", {})
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0
        S.save_atomic(log, log_path)
        return out

    def catk(name: str, init: Path, epochs: int) -> Path:
        """A CAT-K sub-stage from checkpoint `init` (reference_model.catk_loss via train_phase)."""
        path = out_dir / f"{name}.pt"
        ck = load_checkpoint(path) if path.is_file() else None
        model = load(path if ck else init).train()
        opt = torch.optim.AdamW(model.parameters(), lr=sft_lr, weight_decay=ref_cfg.weight_decay)
        if ck:
            opt.load_state_dict(ck["optimizer"])
        if (ck["epoch"] if ck else 0) < epochs:
            train_phase(name, model, tok, opt, data, enc, sft_cfg, device, ck["epoch"] if ck else 0, epochs,
                        sft_lr, path, log, log_path)
        elif ck is None:                          # zero epochs: a copy of the starting model
            RM.save_checkpoint(path, model, tok, stage_cfg=asdict(sft_cfg), optimizer=opt.state_dict(), epoch=0,
                               phase=name)
        return path

    def get_batch(idx):
        s, tk = trim(data["train"].select(idx), {k: v[idx] for k, v in enc["train"].items()})
        return s.to(device), {k: v.to(device) for k, v in tk.items()}

    def rft(kind: str, sft1: Path, tau: float) -> Path:
        """RFT of SFT-1 with the `kind` advantage against the frozen SFT-1."""
        path, rcfg = out_dir / f"rft_{kind}.pt", rft_cfgs[kind]
        ck = load_checkpoint(path) if path.is_file() else None
        model = load(path if ck else sft1)
        opt = torch.optim.AdamW(model.parameters(), lr=rcfg.lr, weight_decay=rcfg.weight_decay)
        if ck:
            opt.load_state_dict(ck["optimizer"])
        if ck is None or ck["step"] < rcfg.rft_steps:
            def save(step, history):
                RM.save_checkpoint(path, model, tok, r1_cfg=asdict(rcfg), optimizer=opt.state_dict(), step=step,
                                   history=history, tau=tau)
                log[f"rft_{kind}"] = history
                S.save_atomic(log, log_path)
            R1.train_rft(model, R1.frozen_copy(load(sft1)), tok, get_batch, n_train, rcfg, tau, opt,
                         ck["step"] if ck else 0, ck["history"] if ck else [], save)
        return path

    test = data["test"].to(device)
    eval_cfg = replace(ref_cfg, eval_R=cfg.eval_R)

    # the reference stage scored BC and CAT-K the same way (seed, R, test scenes): reuse when current
    ref_log = ref_dir / "log.json"
    ref_eval = json.loads(ref_log.read_text()).get("eval", {}) if ref_log.is_file() else {}
    if ref_eval.get("R") != cfg.eval_R or ref_eval.get("n_test") != test.B \
            or ref_log.stat().st_mtime < max(bc_path.stat().st_mtime, catk_path.stat().st_mtime):
        ref_eval = {}
    known = {bc_path: "BC", catk_path: "CAT-K"}

    def evaluate(name: str, path: Path) -> None:
        if name not in log["eval"]:             # one sampling seed for every model: common random numbers
            reuse = ref_eval.get("results", {}).get(known.get(path))
            log["eval"][name] = reuse or evaluate_model(load(path), tok, test, eval_cfg, seed=ref_cfg.seed)
            print(f"{name}: realism meta {log['eval'][name]['realism_meta']:.4f}" + (" (reference stage's)" if reuse else ""))

    # ---- the schedule --------------------------------------------------------------------------
    reuse = ref_cfg.catk_epochs == sched["sft1"] and sft_lr == ref_cfg.catk_lr   # the same N epochs from BC
    sft1 = catk_path if reuse else timed("sft1", lambda: catk("sft1", bc_path, sched["sft1"]))
    timed("eval", lambda: (evaluate("BC", bc_path), evaluate("SFT", sft1)))
    if log.get("tau") is None:
        tau = cfg.tau if cfg.tau is not None else timed("tau", lambda: R1.measure_tau(load(sft1), tok, get_batch,
                                                                                         n_train, cfg))
        log["tau"] = tau
        S.save_atomic(log, log_path)
    tau = log["tau"]
    print(f"tau = {tau:.4f} ({'given' if cfg.tau is not None else 'SFT-1 mean reward on training scenes'}, "
          f"M={cfg.M} rollouts in {cfg.groups} group(s))")
    rft_mpo = timed("rft_mpo", lambda: rft("mpo", sft1, tau))
    timed("eval", lambda: evaluate("SFT-RFT", rft_mpo))
    sft2 = timed("sft2", lambda: catk("sft2", rft_mpo, sched["sft2"]))
    timed("eval", lambda: evaluate("SFT-RFT-SFT", sft2))
    sftsft = timed("sftsft", lambda: catk("sftsft", sft1, sched["sftsft"]))
    timed("eval", lambda: evaluate("SFT-SFT", sftsft))
    if getattr(args, "variants", False):         # the old control: RFT's trajectories as CAT-K epochs
        traj = timed("sftsft_traj", lambda: catk("sftsft_traj", sft1, sched["sftsft_traj"]))
        timed("eval", lambda: evaluate("SFT-SFT (trajectory-matched)", traj))
    for kind, name in (("grpo", "SFT-RFT (GRPO)"), ("reinforce", "SFT-RFT (no KL)")):
        if kind in variants:
            path = timed(f"rft_{kind}", lambda: rft(kind, sft1, tau))
            timed("eval", lambda: evaluate(name, path))

    # ---- tables ----------------------------------------------------------------------------------
    print(f"\nheld-out toy test scenes: {test.B}, {cfg.eval_R} rollouts each (WOSAC 2025 weights), seed {cfg.seed}")
    rows = [n for n in R1_ROWS if n in log["eval"]]
    print(E.format_table({n: log["eval"][n] for n in rows}))
    for kind in variants:
        h = log[f"rft_{kind}"]
        k = max(1, len(h) // 4)
        mean = lambda key, part: sum(e[key] for e in part) / len(part)
        print(f"RFT {kind}: training reward {mean('reward', h[:k]):.4f} (first {k} steps) -> "
              f"{mean('reward', h[-k:]):.4f} (last {k}); KL to SFT-1 {h[-1]['kl_exact']:.4f} (k3 "
              f"{h[-1]['kl']:.4f}); entropy {h[0]['entropy']:.3f} -> {h[-1]['entropy']:.3f}; "
              f"unscored sets {sum(e['n_nan_groups'] for e in h)}")
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in log["wall_s"].items()))
    print("CPU time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in log.get("cpu_s", {}).items()))
    seeds = [json.loads(p.read_text()).get("eval", {}) for p in sorted((Path(args.runs) / "r1").glob("seed*/log.json"))
             if p.parent.name[4:].isdigit()]       # the seeds of the default schedule only
    seeds = [{n: e[n] for n in R1_ROWS if n in e} for e in seeds]
    if len(seeds) > 1:
        print(f"\nmean +- std over {len(seeds)} seeds (runs/r1/seed*):")
        print(R1.summary_table(seeds, E.TABLE_KEYS))
    print(f"checkpoints: {out_dir}/*.pt\nlog and results: {log_path}")
    return log["eval"]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def stage_eval(args) -> dict:
    """Every method side by side (evaluate.run_eval): the held-out toy test scenes and the real
    WOMD examples where present, R = 32 rollouts each; runs/eval/results.{md,json} and pictures.
    A method whose checkpoint is missing is listed as missing. --quick scores 4 toy scenes x 4."""
    device = pick_device(args.device)
    q = dict(R=4, n_test=4) if args.quick else {}
    return E.run_eval(args.runs, device, seed=args.seed, **q)


STAGES = {"reference": stage_reference, "spacer": stage_spacer, "r1": stage_r1, "eval": stage_eval}
ORDER = ("reference", "spacer", "r1", "eval")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, help="reference | spacer | r1 | eval | all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--runs", default="runs", help="folder for checkpoints and logs")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last saved epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests (about a minute)")
    p.add_argument("--anchor", default="spacer", choices=("spacer", "ppo", "hr-ppo"), help="spacer stage: which anchoring")
    p.add_argument("--alpha", type=float, default=None, help="spacer stage: likelihood-reward weight (ablations)")
    p.add_argument("--beta", type=float, default=None, help="spacer stage: KL-to-reference weight (ablations)")
    p.add_argument("--iterations", type=int, default=None, help="spacer stage: PPO iterations (default: config)")
    p.add_argument("--hidden", type=int, default=None, help="spacer stage: the policy's fused hidden width (default: config)")
    p.add_argument("--variants", action="store_true",
                   help="r1 stage: also RFT with GRPO-style and no-KL advantages, and the trajectory-matched control")
    p.add_argument("--rft-lr", type=float, default=None, help="r1 stage: RFT learning rate (default: config); "
                   "writes runs/r1/seed<S>_lr<LR>")
    args = p.parse_args(argv)
    todo = list(ORDER) if args.stage == "all" else [args.stage]
    unknown = [s for s in todo if s not in ORDER]
    if unknown:
        print(f"train.py: unknown stage {unknown[0]!r}; choose one of {', '.join(ORDER)} or all", file=sys.stderr)
        return 2
    if args.stage == "all":
        args.resume = True                 # the main job picks up whatever an earlier run finished
    for stage in todo:
        if stage == "spacer" and args.stage == "all":  # the table's three rows: two baselines and SPACeR
            for anchor in ("ppo", "hr-ppo", "spacer"):
                stage_spacer(argparse.Namespace(**{**vars(args), "anchor": anchor}))
        else:
            STAGES[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
