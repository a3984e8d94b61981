"""Tests of train.py's promises (issue 13): a fresh run never deletes finished work, flags are
checked when parsed, non-finite values stop training and are never saved, a missing log is
reported, and Ctrl-C then --resume loses at most the epoch in flight."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import presets
import r1_finetune as R1
import reference_model as RM
import train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_train=4, n_val=2, n_test=1, K=24, bc_epochs=2, catk_epochs=1, batch_size=2, eval_R=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("toy_data")   # the tiny toy splits, generated once for the module


@pytest.fixture
def tiny(monkeypatch, data_dir):
    """--quick made tinier still: a reference run of a few seconds."""
    cfg = replace(presets.quick_config(), **TINY, cache_dir=str(data_dir))
    monkeypatch.setattr(presets, "quick_config", lambda: cfg)
    return cfg


def reference_args(runs: Path, *more: str) -> list:
    return ["--stage", "reference", "--quick", "--device", "cpu", "--runs", str(runs), *more]


def earlier_run(folder: Path) -> dict:
    """Stand-in files of a finished earlier run; returns their bytes."""
    folder.mkdir(parents=True)
    files = {folder / "bc.pt": b"bc weights", folder / "catk.pt": b"catk weights", folder / "log.json": b"{}"}
    for path, data in files.items():
        path.write_bytes(data)
    return files


def interrupt_after_first_save(monkeypatch):
    real = RM.save_checkpoint

    def save_then_stop(path, *a, **kw):
        real(path, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(RM, "save_checkpoint", save_then_stop)
    return real


# ---- a fresh run never deletes finished work ----------------------------------------------------
@pytest.mark.parametrize("stage, folder", [("reference", "reference"), ("spacer", "spacer/spacer"),
                                           ("r1", "r1/seed0")])
def test_fresh_run_over_an_earlier_run_refuses_and_names_the_flags(tmp_path, stage, folder):
    files = earlier_run(tmp_path / folder)
    with pytest.raises(SystemExit, match="--resume.*--overwrite"):
        train.main(["--stage", stage, "--quick", "--device", "cpu", "--runs", str(tmp_path)])
    assert {p: p.read_bytes() for p in files} == files


def test_overwrite_run_that_fails_before_its_first_write_keeps_the_old_files(tmp_path, tiny, monkeypatch):
    files = earlier_run(tmp_path / "reference")
    monkeypatch.setattr(RM, "bc_loss", lambda *a, **k: (torch.tensor(float("nan")), torch.tensor(0.0)))
    with pytest.raises(FloatingPointError):
        train.main(reference_args(tmp_path, "--overwrite"))
    assert {p: p.read_bytes() for p in files} == files


def test_overwrite_replaces_the_earlier_run_at_its_first_write(tmp_path, tiny, monkeypatch):
    """The earlier run's files go together at the first write: no mix of old CAT-K and new BC."""
    files = earlier_run(tmp_path / "reference")
    interrupt_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.main(reference_args(tmp_path, "--overwrite"))
    out = tmp_path / "reference"
    assert torch.load(out / "bc.pt", weights_only=True)["epoch"] == 1
    assert not (out / "catk.pt").exists()
    assert [e["epoch"] for e in json.loads((out / "log.json").read_text())["bc"]] == [1]


def test_bad_flag_or_device_leaves_earlier_run_and_creates_nothing(tmp_path, capsys):
    files = earlier_run(tmp_path / "reference")
    assert train.main(["--stage", "reference", "--device", "mps", "--runs", str(tmp_path),
                       "--overwrite"]) == 2
    assert "--device" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in files} == files
    assert train.main(["--stage", "r1", "--rft-lr", "-1", "--runs", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


# ---- flags checked when parsed ------------------------------------------------------------------
BAD_FLAGS = [("--hidden", "0"), ("--hidden", "-5"), ("--rft-lr", "0"), ("--rft-lr", "-1"),
             ("--rft-lr", "nan"), ("--seed", "-1"), ("--iterations", "0"), ("--alpha", "-0.1"),
             ("--alpha", "inf"), ("--beta", "nan"), ("--device", "mps"), ("--device", "meta"),
             ("--device", "cuda:99")]
if not torch.cuda.is_available():
    BAD_FLAGS.append(("--device", "cuda"))


@pytest.mark.parametrize("flag, value", BAD_FLAGS)
def test_bad_flag_is_refused_at_parse_time_naming_the_flag(tmp_path, capsys, flag, value):
    runs = tmp_path / "runs"
    assert train.main(["--stage", "spacer", "--runs", str(runs), flag, value]) == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not runs.exists()


def test_alpha_beta_only_with_the_spacer_anchor(capsys):
    assert train.main(["--stage", "spacer", "--anchor", "ppo", "--alpha", "0.1"]) == 2
    assert "--alpha" in capsys.readouterr().err


def test_good_flags_parse():
    args = train.parse_args(["--stage", "spacer", "--device", "cpu", "--alpha", "0", "--beta", "0.2",
                             "--hidden", "8", "--seed", "3", "--rft-lr", "1e-5"])
    assert (args.alpha, args.beta, args.hidden, args.seed, args.rft_lr) == (0.0, 0.2, 8, 3, 1e-5)
    assert train.parse_args(["--stage", "all"]).resume          # the main job resumes what exists
    assert not train.parse_args(["--stage", "all", "--overwrite"]).resume


def test_quick_with_iterations_takes_the_flag():
    cfg, name = train.spacer_config(train.parse_args(["--stage", "spacer", "--quick", "--iterations", "7"]))
    assert (cfg.iterations == 7 and cfg.num_worlds == presets.SPACER_QUICK["num_worlds"]
            and name == "spacer_iterations7")


def test_quick_r1_preset_is_a_valid_schedule():
    cfg = R1.R1Config(**presets.R1_QUICK)
    R1.check_config(cfg)
    epochs = R1.schedule(cfg, n_train=24)
    assert epochs["sft1"] + epochs["sft2"] == epochs["sft1"] + epochs["sftsft"] == 2 * cfg.sft_epochs


# ---- non-finite values --------------------------------------------------------------------------
def test_check_finite_names_the_entry():
    train.check_finite(dict(w=torch.ones(3), lr=0.1, steps=[1, 2]), "ok")
    with pytest.raises(FloatingPointError, match=r"state\['opt'\]\[1\] is not finite"):
        train.check_finite(dict(w=torch.ones(2), opt=[0.5, float("nan")]), "state")
    with pytest.raises(FloatingPointError, match=r"model\['b'\] is not finite \(1\)"):
        train.check_finite(dict(a=torch.ones(2), b=torch.tensor([1.0, float("inf")])), "model")


def test_nan_loss_stops_with_stage_step_term_and_the_last_checkpoint_survives(tmp_path, tiny, monkeypatch):
    real = RM.bc_loss
    calls = {"n": 0}

    def nan_in_epoch_2(model, scenes, tokens, smoothing=0.1):
        loss, acc = real(model, scenes, tokens, smoothing)
        calls["n"] += model.training
        return (loss * float("nan") if calls["n"] > 2 and model.training else loss), acc  # 2 steps per epoch

    monkeypatch.setattr(RM, "bc_loss", nan_in_epoch_2)
    with pytest.raises(FloatingPointError, match=r"reference: bc epoch 2, step 1/2: the loss is not finite"):
        train.main(reference_args(tmp_path))
    ck = torch.load(tmp_path / "reference" / "bc.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values()
                                    if v.is_floating_point())


def test_non_finite_gradient_stops_before_the_step(tmp_path, tiny, monkeypatch):
    real = RM.bc_loss

    def nan_gradient(model, scenes, tokens, smoothing=0.1):   # a finite loss whose gradient is NaN
        loss, acc = real(model, scenes, tokens, smoothing)
        return loss + (next(model.parameters()).sum() * 0).abs().sqrt(), acc

    monkeypatch.setattr(RM, "bc_loss", nan_gradient)
    with pytest.raises(FloatingPointError, match=r"bc epoch 1, step 1/2: the gradient norm is not finite"):
        train.main(reference_args(tmp_path))
    assert not (tmp_path / "reference").exists()


def test_save_refuses_non_finite_weights_and_keeps_the_last_good_file(tmp_path):
    run = train.Run("reference", tmp_path, {}, resumed=False)
    model, path = torch.nn.Linear(2, 2), tmp_path / "w.pt"
    write = lambda p: torch.save(model.state_dict(), p)
    run.save(path, write, model=model.state_dict())
    good = path.read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"not saving .*w.pt.*model\['weight'\] is not finite"):
        run.save(path, write, model=model.state_dict())
    assert path.read_bytes() == good


def test_optimizer_steps_inside_finite_steps_check_the_gradients():
    """Covers the steps ppo_anchor and r1_finetune take in their own loops."""
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(net.parameters())
    with train.finite_steps("r1"):
        net(torch.ones(1, 2)).sum().backward()
        opt.step()                                          # finite: fine
        net.weight.grad.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match="r1: optimizer step 2 of this run: the gradient norm"):
            opt.step()
    assert torch.isfinite(net.weight).all()
    opt.step()                                              # the guard is gone outside the block


# ---- resume -------------------------------------------------------------------------------------
def test_resume_with_missing_log_says_so(tmp_path, tiny, monkeypatch, capsys):
    real = interrupt_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.main(reference_args(tmp_path))
    (tmp_path / "reference" / "log.json").unlink()
    monkeypatch.setattr(RM, "save_checkpoint", real)
    assert train.main(reference_args(tmp_path, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'reference' / 'log.json'} is missing" in out and "starts fresh" in out
    log = json.loads((tmp_path / "reference" / "log.json").read_text())
    assert [e["epoch"] for e in log["bc"]] == [2] and "eval" in log


CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell starts children ignoring SIGINT
from dataclasses import replace
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import presets
import reference_model as RM
import train
cfg = replace(presets.quick_config(), **{tiny!r}, cache_dir={data!r})
presets.quick_config = lambda: cfg
if {stall}:                  # a long second epoch: the interrupt arrives with it in flight
    real = RM.bc_loss
    def slow(model, *a, **k):
        if model.training and os.path.exists({runs!r} + "/reference/bc.pt"):
            print("epoch 2 in flight", flush=True)
            time.sleep(120)
        return real(model, *a, **k)
    RM.bc_loss = slow
sys.exit(train.main(sys.argv[1:]))
"""


def test_ctrl_c_then_resume_loses_at_most_the_epoch_in_flight(tmp_path, data_dir):
    runs = tmp_path / "runs"
    args = ["--stage", "reference", "--quick", "--device", "cpu", "--runs", str(runs)]
    child = lambda stall: [sys.executable, "-c", CHILD.format(repo=str(REPO), tiny=TINY, data=str(data_dir),
                                                              runs=str(runs), stall=stall)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(child(True) + args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    for line in proc.stdout:
        if "in flight" in line:
            break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    out = runs / "reference"
    assert torch.load(out / "bc.pt", weights_only=True)["epoch"] == 1
    done = subprocess.run(child(False) + args + ["--resume"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = json.loads((out / "log.json").read_text())
    assert [e["epoch"] for e in log["bc"]] == [1, 2] and [e["epoch"] for e in log["catk"]] == [1]
    assert set(log["eval"]["results"]) == {"constant velocity", "BC", "CAT-K"}


# ---- corrupt files of a run: a named error with the fix, never a raw traceback ------------------
def test_resume_over_a_corrupt_checkpoint_or_log_names_the_file_and_the_fix(tmp_path, tiny):
    files = earlier_run(tmp_path / "reference")            # bc.pt and catk.pt hold random bytes
    with pytest.raises(ValueError, match=r"reference.(catk|bc)\.pt: cannot be read as a torch.*--overwrite"):
        train.main(reference_args(tmp_path, "--resume"))
    log = tmp_path / "reference" / "log.json"
    log.write_text('{"bc": [{"epoch": 1')                 # a log cut short
    with pytest.raises(ValueError, match=r"log\.json: not valid JSON.*expected the run's log.*--overwrite"):
        train.main(reference_args(tmp_path, "--resume"))
    assert {p: p.read_bytes() for p in files if p != log} == {p: b for p, b in files.items() if p != log}
