"""HR-PPO's teacher: fitted on one split, scored on the held-out tokens of another."""
import pytest
import torch

import ppo_anchor as PA
from hr_ppo import bc_samples, token_accuracy, train_bc
from tokenizer import MotionTokenizer, TokenizerConfig
from toy_scenes import make_toy_scenes

K = 16


@pytest.fixture(scope="module")
def splits():
    """Split A (training) and split B (held out): different scenes, one tokenizer fitted on A."""
    a, b = make_toy_scenes(3, seed=7), make_toy_scenes(2, seed=11)
    tok = MotionTokenizer.fit(a, TokenizerConfig(K=K, steps_per_token=2))
    return (a, tok.encode(a)), (b, tok.encode(b)), tok


def constant_policy(k: int) -> PA.LateFusionPolicy:
    """A policy that predicts token k whatever it sees (actor weights zero, bias one-hot)."""
    policy = PA.LateFusionPolicy(K)
    with torch.no_grad():
        policy.actor.weight.zero_()
        policy.actor.bias.copy_(torch.nn.functional.one_hot(torch.tensor(k), K).float().repeat(policy.n_heads))
    return policy.eval()


def test_token_accuracy_of_constant_predictors_is_the_token_frequency(splits):
    """Known answer: predicting token k everywhere scores the share of k among the split's logged
    tokens, so the K constant predictors' accuracies sum to exactly 1."""
    (b, enc_b), tok = splits[1], splits[2]
    cfg = PA.SpacerConfig(num_worlds=4)
    samples = bc_samples(b, enc_b, tok.table, tok.n0, cfg, seed=0)
    target = samples["target"]                                                   # [M]
    n_valid = int((b.controlled.unsqueeze(-1) & enc_b["id_valid"][:, :, tok.n0:tok.n0 + 40]).sum())
    assert 0 < target.numel() <= n_valid            # the controlled agents' valid tokens, up to the goal
    acc = [token_accuracy(constant_policy(k), samples, batch=97) for k in range(K)]
    for k in range(K):
        assert acc[k] == pytest.approx(int((target == k).sum()) / target.numel(), abs=1e-12)
    assert sum(acc) == pytest.approx(1.0, abs=1e-9)


def test_teacher_fit_on_one_split_is_scored_on_the_held_out_split(splits):
    """A teacher fitted on split A (where every logged token is the zero-motion token: it learns to
    predict 0) reports train accuracy 1 on A and, on held-out split B, exactly the share of zeros
    among B's tokens: the score comes from B's tokens, not A's. The reported numbers equal
    token_accuracy recomputed on each split's samples."""
    (a, enc_a), (b, enc_b), tok = splits
    still = {**enc_a, "ids": torch.zeros_like(enc_a["ids"])}                     # A: everyone stands still
    cfg = PA.SpacerConfig(num_worlds=4, bc_epochs=6, minibatch_size=64, seed=3)
    teacher, stats = train_bc(cfg, a, still, b, enc_b, tok.table, tok.n0)
    val = bc_samples(b, enc_b, tok.table, tok.n0, cfg, cfg.seed + 1)
    train = bc_samples(a, still, tok.table, tok.n0, cfg, cfg.seed)
    assert stats["val_tokens"] == val["target"].numel() and stats["train_tokens"] == train["target"].numel()
    assert stats["val_scenes"] == b.B and stats["train_scenes"] == a.B and len(stats["val_accuracy_history"]) == 6
    assert stats["train_accuracy"] == 1.0
    zeros = int((val["target"] == 0).sum()) / val["target"].numel()
    assert zeros < 0.5                                                           # B's agents mostly move
    assert stats["val_accuracy"] == pytest.approx(zeros, abs=1e-12)
    assert stats["val_accuracy"] == token_accuracy(teacher, val)
    # bc_scenes caps the training scenes; 0 takes them all
    _, capped = train_bc(PA.SpacerConfig(num_worlds=4, bc_epochs=1, bc_scenes=1), a, enc_a, b, enc_b,
                         tok.table, tok.n0)
    assert capped["train_scenes"] == 1 and capped["train_tokens"] < stats["train_tokens"]
    assert capped["val_tokens"] == stats["val_tokens"]
