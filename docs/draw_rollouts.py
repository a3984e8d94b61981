"""Redraw the README's rollout picture (docs/rollouts_toy.png, docs/rollout_toy_SPACeR.gif) from the
checkpoints under a runs folder, without scoring anything: the eval stage's own picture code
(evaluate.draw_rollouts) on the held-out toy split's busiest junction.

    python docs/draw_rollouts.py [RUNS]        # default: runs
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate as E  # noqa: E402

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
present = [n for n, rel, _ in E.METHODS if rel and (runs / rel.format(seed=0)).is_file()]
out = Path(__file__).resolve().parent
for p in E.draw_rollouts(runs, E.held_out_scenes(runs), "toy", present, out, "cpu", seed=0):
    print(f"wrote {p}")
