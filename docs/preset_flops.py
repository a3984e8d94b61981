"""The README's "The paper preset" figure: floating-point operations of one BC training step
(forward and backward) per toy scene, for the reference of each preset, counted by PyTorch's
FlopCounterMode (matrix products and attention; gathers and element-wise work are not counted) on
bench.py's BC batch (the first 16 of its 32 toy scenes):

    python docs/preset_flops.py
"""
import sys
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import presets
import reference_model as RM
import scenes as S
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes

toy = make_toy_scenes(32, seed=777)
batch = S.trim(toy.select(slice(0, 16)))[0]
for preset in presets.PRESETS:
    cfg = presets.reference_config(preset, quick=False)
    tok = MotionTokenizer.fit(toy, TokenizerConfig(K=cfg.K, steps_per_token=cfg.steps_per_token, seed=0))
    model = RM.ReferenceModel(presets.model_config(cfg), tok.table)
    with FlopCounterMode(display=False) as count:
        loss, _ = RM.bc_loss(model, batch, tok.encode(batch), cfg.label_smoothing)
        loss.backward()
    print(f"{preset}: {model.n_params:,} parameters, {count.get_total_flops() / batch.B / 1e9:.1f} GFLOP per "
          f"scene per BC step (forward + backward)")
