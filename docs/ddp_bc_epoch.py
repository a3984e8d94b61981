"""The README's "More than one machine" figure: the wall time of one BC epoch of train.train_phase
(default model, 64 toy training scenes, batch 16, K = 64), in one process or under torchrun:

    OMP_NUM_THREADS=2 python docs/ddp_bc_epoch.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 docs/ddp_bc_epoch.py
"""
import sys
from dataclasses import replace
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed as D
import presets
import reference_model as RM
import train
from runs import Run
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import toy_splits
D.setup("cpu")
cfg = replace(presets.ReferenceStageConfig(), n_train=64, n_val=8, n_test=4, K=64,
              cache_dir="/tmp/ddp_bc_epoch/data")
with D.writer_first():
    data = toy_splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed, cfg.cache_dir)
tok = MotionTokenizer.fit(data["train"], TokenizerConfig(K=cfg.K, steps_per_token=2, seed=0))
enc = {s: tok.encode_split(data[s]) for s in ("train", "val")}
torch.manual_seed(0)
model = RM.ReferenceModel(presets.model_config(cfg), tok.table)
opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
run = Run("bench", Path("/tmp/ddp_bc_epoch/run"), {}, resumed=False, writer=D.is_writer())
train.save_reference = lambda *a, **k: None        # time the epoch, not the checkpoint
train.train_phase("bc", model, tok, opt, data, enc, cfg, torch.device("cpu"), 0, 1, cfg.lr, run)
if D.is_writer():
    print("RESULT train_s", round(run.log["bc"][0]["train_s"], 2), "world", D.world_size(),
          "threads", torch.get_num_threads())
D.cleanup()
