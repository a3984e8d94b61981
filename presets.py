"""Presets: every stage's configuration in one place, and what --quick and --preset change.

The reference stage's settings are one dataclass, `ReferenceStageConfig`, whose defaults are the
tutorial run (2 CPU cores, README: stage times); `quick_config` is its smoke-test size and
`model_config` the reference_model.ReferenceConfig it builds. The other stages keep their full
settings in their own module's config (ppo_anchor.SpacerConfig, r1_finetune.R1Config,
evaluate.run_eval's arguments); what --quick changes in them is a dict here.

Two presets (`--preset`):
- tutorial (the default): a 372k-parameter reference that trains on 2 CPU cores in minutes.
- paper: the papers' proportions, meant for a GPU (README: the paper preset, what it costs). The
  reference is SMART-tiny's width and depth (D = 128, 8 heads of 16, 6 agent layers; SMART-R1
  notes) with a 2 s temporal window and 64 map / 16 agent neighbours per token: about 3.8M
  parameters, as SPACeR's 3.2M reference (SPACeR notes), 57x the 66,585-parameter policy (the
  paper: 65k, 49x smaller). Training follows the papers where they say: AdamW at 5e-4 with
  gradient clip 0.5 (SMART), 6 CAT-K epochs at 0.1x the rate (SPACeR), on 8x the tutorial's toy
  training scenes. The policy and PPO settings stay the tutorial's: the policy already has the
  paper's size. `--preset paper --quick` keeps the model's size and shrinks data and epochs to a
  CPU smoke run. Each preset writes to its own runs folder (RUNS), and its name is saved with the
  reference, so that a later stage never anchors to, fine-tunes or scores another preset's model.
"""
from __future__ import annotations

from dataclasses import dataclass

import reference_model as RM


@dataclass
class ReferenceStageConfig:
    """The reference stage: data, tokens, model, BC, CAT-K and evaluation."""
    preset: str = "tutorial"      # which preset these settings belong to (checked by every later stage)
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
    map_neighbours: int = 32      # map tokens per agent (10 reached 6 m and missed road edges; README: diagnosis)
    agent_neighbours: int = 6     # other agents per agent
    # behaviour cloning
    bc_epochs: int = 12           # epochs of next-token cross-entropy on the logs
    lr: float = 3e-3              # AdamW peak learning rate for BC
    batch_size: int = 4           # scenes per gradient step (BC is step-limited: 4x the steps of 16 at equal cost)
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
    eval_top_k: int = 5           # top-k sampling of the rollouts: SMART's K = 5 (CAT-K validates with it)
    eval_temperature: float = 1.0  # sampling temperature of the rollouts
    eval_worlds: int = 256        # rollout worlds (scenes x R) computed at once
    seed: int = 0                 # seeds initialisation, shuffling and rollout sampling


def quick_config() -> ReferenceStageConfig:
    """--quick for the reference stage: tiny sizes for smoke tests and CI."""
    return ReferenceStageConfig(n_train=24, n_val=8, n_test=4, K=64, D=32, heads=2, layers=1, window=4,
                                map_neighbours=8, agent_neighbours=4, bc_epochs=2, catk_epochs=1,
                                batch_size=8, eval_R=4, lr=3e-3, catk_lr=3e-4)


# --preset paper: the reference at the papers' proportions (see the docstring), meant for a GPU
PAPER = dict(preset="paper", n_train=2048, D=128, heads=8, layers=6, window=10, map_neighbours=64,
             agent_neighbours=16, bc_epochs=32, lr=5e-4, batch_size=32, grad_clip=0.5, catk_epochs=6,
             catk_lr=5e-5, eval_worlds=1024)
# --preset paper --quick: the same model, a few scenes and one epoch of each phase (a CPU smoke run)
PAPER_QUICK = dict(n_train=2, n_val=1, n_test=1, bc_epochs=1, catk_epochs=1, batch_size=2, eval_R=2,
                   eval_worlds=8)
PRESETS = ("tutorial", "paper")
RUNS = dict(tutorial="runs", paper="runs/paper")   # each preset's default --runs folder


def reference_config(preset: str, quick: bool) -> ReferenceStageConfig:
    """The reference stage's settings of a preset, at full or --quick size."""
    if preset == "paper":
        return ReferenceStageConfig(**{**PAPER, **(PAPER_QUICK if quick else {})})
    if preset == "tutorial":
        return quick_config() if quick else ReferenceStageConfig()
    raise ValueError(f"--preset: unknown preset {preset!r}, choose from {PRESETS}")


def model_config(cfg: ReferenceStageConfig) -> RM.ReferenceConfig:
    """The reference model's own settings (reference_model.ReferenceConfig) from the stage's."""
    return RM.ReferenceConfig(K=cfg.K, steps_per_token=cfg.steps_per_token, D=cfg.D, heads=cfg.heads,
                              layers=cfg.layers, dropout=cfg.dropout, window=cfg.window,
                              map_neighbours=cfg.map_neighbours, agent_neighbours=cfg.agent_neighbours)


# the spacer stage: ppo_anchor.SpacerConfig (its defaults are the full run) and --quick's changes
SPACER_QUICK = dict(num_worlds=4, iterations=3, minibatch_size=512, eval_rollouts=4, eval_batch=4,
                    bc_scenes=8, bc_epochs=2, save_every=1)
SPACER_QUICK_TEST = 4             # --quick scores this many held-out test scenes
# the r1 stage: r1_finetune.R1Config (its defaults are the full run) and --quick's changes
R1_QUICK = dict(M=4, groups=1, grpo_groups=4, scenes_per_step=2, rft_steps=3, tau_scenes=2, save_every=1,
                sft_epochs=1, eval_R=4, lr=1e-4)
# the eval stage: evaluate.run_eval's arguments under --quick
EVAL_QUICK = dict(R=4, n_test=4)
