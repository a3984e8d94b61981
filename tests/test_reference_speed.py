"""Speedups of the reference model (reference_model.py) change no result: each fast path is
compared with the computation it replaced, in values and (where it trains) gradients."""
import pytest
import torch

import reference_model as RM
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes


def attention_outputs(block, x, k, v, r, mask):
    """The block's output and the gradients of a fixed function of it w.r.t. every input."""
    ins = [t.clone().requires_grad_(True) for t in (x, k, v, r)]
    out = block(*ins, mask)                                                   # [..., D]
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = [p.grad.clone() for p in block.parameters() if p.grad is not None]   # the kv projection is not used
    return [out.detach()] + [t.grad for t in ins] + grads


@pytest.mark.parametrize("C", [3, 6, 10])
def test_plain_softmax_attention_equals_sdpa(C, monkeypatch):
    """The plain masked softmax used for few candidates gives SDPA's values and gradients,
    including queries with nothing visible (message zero) and a single visible candidate."""
    torch.manual_seed(0)
    D, heads = 32, 4
    block = RM.AttentionBlock(D, heads, dropout=0.0)
    x = torch.randn(5, 7, D)                                                  # [5, 7, D]
    k, v, r = (torch.randn(5, 7, C, D) for _ in range(3))                     # [5, 7, C, D] each
    mask = torch.rand(5, 7, C) < 0.6                                          # [5, 7, C]
    mask[0, :3] = False                                                       # nothing visible
    mask[1, :3] = False
    mask[1, :3, -1] = True                                                    # one candidate visible
    results = {}
    for name, sdpa_from in (("plain", C + 1), ("sdpa", 0)):
        monkeypatch.setattr(RM.AttentionBlock, "SDPA_FROM", sdpa_from)
        block.zero_grad(set_to_none=True)
        results[name] = attention_outputs(block, x, k, v, r, mask)
    for a, b in zip(results["plain"], results["sdpa"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert results["plain"][0][0, :3].sub(x[0, :3]).abs().max() > 0       # the feed-forward still runs


def test_repeated_rollout_runs_history_once_with_the_same_result():
    """closed_loop(repeats=R) computes the map and the history pass once per scene, then rolls out
    R worlds per scene: the same logits, tokens and trajectories as rolling out scenes.repeat(R)."""
    scenes = make_toy_scenes(2, seed=5)
    tok = MotionTokenizer.fit(scenes, TokenizerConfig(K=32, steps_per_token=2))
    torch.manual_seed(0)
    cfg = RM.ReferenceConfig(K=32, D=32, heads=2, layers=2, window=4, map_neighbours=6, agent_neighbours=4)
    model = RM.ReferenceModel(cfg, tok.table).eval()
    R = 3
    outs = []
    for kw in (dict(scenes=scenes.repeat(R)), dict(scenes=scenes, repeats=R)):
        gen = torch.Generator().manual_seed(1)
        outs.append(RM.closed_loop(model, tok, top_k=5, generator=gen, return_logits=True, **kw))
    full, once = outs
    assert torch.allclose(full["logits"], once["logits"], atol=1e-5), (full["logits"] - once["logits"]).abs().max()
    assert full["logits"][:, :, tok.n0:].abs().max() > 0           # rolled-out steps were compared too
    for k in ("ids", "id_valid", "pose_valid"):
        assert torch.equal(full["tokens"][k], once["tokens"][k]), k
    assert torch.allclose(full["traj"], once["traj"], atol=1e-5)
    assert torch.equal(full["controlled"], once["controlled"])
