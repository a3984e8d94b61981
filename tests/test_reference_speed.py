"""Speedups of the reference model (reference_model.py) change no result: each fast path is
compared with the computation it replaced, in values and (where it trains) gradients."""
import pytest
import torch

import reference_model as RM


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
