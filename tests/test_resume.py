"""Resume: after Ctrl-C, a crash, or a SIGKILL inside a checkpoint save, a resumed run ends bit for bit
where an uninterrupted one does; a resume under other settings or from a tampered state is refused."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import model as model_mod
import objective
import train as trainer
from test_train import ROOT, config


def final_state(out):
    """The weights and optimizer state of a run's last checkpoint."""
    from safetensors.torch import load_file
    ckpt = os.path.join(out, "checkpoint")
    return load_file(os.path.join(ckpt,
                                  "model.safetensors")), checkpoint.load_trainer_state(ckpt)["optimizer"]


def assert_bitwise_equal(a, b):
    (wa, oa), (wb, ob) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, s in oa["state"].items():
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in s.items())


REAL_LOSS_TERMS = objective.loss_terms


def count_steps(monkeypatch, fail_at=None, error=None):
    """Counts the micro-batches the training loop computes (one per step at grad_accum 1); with
    fail_at, the fail_at-th call raises error instead (a Ctrl-C or a crash in that step)."""
    calls = []

    def counted(*args):
        calls.append(1)
        if len(calls) == fail_at:
            raise error
        return REAL_LOSS_TERMS(*args)
    monkeypatch.setattr(objective, "loss_terms", counted)
    return calls


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints every 3 steps: what every resumed run must equal."""
    cfg = config(tmp_path_factory.mktemp("straight"), max_steps=8, save_every=3)
    return trainer.train(cfg)["metrics"], final_state(cfg.out)


def test_ctrl_c_saves_and_resume_does_only_the_rest(tmp_path, monkeypatch, capsys, straight):
    count_steps(monkeypatch, fail_at=5, error=KeyboardInterrupt)  # Ctrl-C during step 5
    with pytest.raises(SystemExit) as e:
        trainer.train(config(tmp_path, max_steps=8, save_every=3))
    assert e.value.code == 130  # --resume's cue
    steps = count_steps(monkeypatch)
    clock = iter(range(1000))  # a clock that ticks a second per reading: the ETA is then exact
    monkeypatch.setattr(trainer, "time", SimpleNamespace(time=lambda: float(next(clock))))
    capsys.readouterr()
    resumed = trainer.train(config(tmp_path, max_steps=8, save_every=3, resume=True,
                                      log_every=1))["metrics"]
    out = capsys.readouterr().out
    assert "resumed from" in out and len(steps) == 4  # steps 5 to 8 only
    first = next(l for l in out.splitlines() if l.startswith("step "))
    assert first.startswith("step     5/8")
    assert first.endswith("ETA 3s")  # 1 s for the 1 step run since the resume
    assert [m["step"] for m in resumed] == list(range(1, 9)) and resumed == straight[0]
    assert_bitwise_equal(final_state(tmp_path / "run"), straight[1])


def test_ctrl_c_during_a_periodic_eval_saves_the_step_it_follows(tmp_path, monkeypatch, straight):
    """--eval-every 2: evals after steps 2, 4, 6 (not after the last); a Ctrl-C inside the one after
    step 4 exits 130 with a checkpoint at step 4 whose weights are step 4's, and --resume then gives
    the uninterrupted run's metrics and final state."""
    seen = []

    def stub_eval(model, proc, cfg, *args):
        seen.append(len(open(os.path.join(cfg.out, "metrics.jsonl")).readlines()))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return {}
    monkeypatch.setattr(trainer, "run_eval", stub_eval)
    with pytest.raises(SystemExit) as e:
        trainer.train(config(tmp_path, max_steps=8, save_every=3, eval_every=2))
    assert e.value.code == 130 and seen == [2, 4]
    assert checkpoint.load_trainer_state(str(tmp_path / "run" / "checkpoint"))["step"] == 4
    resumed = trainer.train(config(tmp_path, max_steps=8, save_every=3, eval_every=2, resume=True))
    assert seen == [2, 4, 6] and resumed["metrics"] == straight[0]
    assert_bitwise_equal(final_state(tmp_path / "run"), straight[1])


def test_crash_resumes_from_the_periodic_checkpoint(tmp_path, monkeypatch, straight):
    """A crash after step 5 (no save on the way down): resume from the step-3 checkpoint, drop the
    metrics rows logged after it, redo steps 4 to 8."""
    count_steps(monkeypatch, fail_at=6, error=RuntimeError("power cut"))
    with pytest.raises(RuntimeError):
        trainer.train(config(tmp_path, max_steps=8, save_every=3))
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 5
    steps = count_steps(monkeypatch)
    trainer.train(config(tmp_path, max_steps=8, save_every=3, resume=True))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(steps) == 5 and rows == straight[0]
    assert_bitwise_equal(final_state(tmp_path / "run"), straight[1])


KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import answers
import checkpoint
import nanoattcot
point, ckpt, real, writes = sys.argv[2], sys.argv[3], os.replace, [0]

def replace(src, dst):  # SIGKILL this process at one point of the second checkpoint save (step 6)
    dst = str(dst)
    writes[0] += dst == os.path.join(ckpt + ".tmp", "model.safetensors")
    if writes[0] == 2 and (point == "writing" and dst.endswith("model.safetensors")
                           or point == "swap" and dst == ckpt):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    if writes[0] == 2 and point == "cleanup" and dst == ckpt:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
nanoattcot.main(sys.argv[4:])
"""


@pytest.mark.parametrize("point,step", [("writing", 3), ("swap", 3), ("cleanup", 6)])
def test_sigkill_during_a_checkpoint_save(tmp_path, monkeypatch, capsys, straight, point, step):
    """Killed while writing the new checkpoint, between its two renames, or while removing the old
    one: the folder left is the old or the new checkpoint, whole, and the resumed run ends equal."""
    out = tmp_path / "run"
    flags = ["train", "--out", str(out), "--n-train", "64", "--n-eval", "6", "--batch-size", "8",
             "--max-steps", "8",
             "--warmup", "2", "--save-every", "3", "--log-every", "100", "--device", "cpu"]
    run = subprocess.run([sys.executable, "-c", KILLER, ROOT, point, str(out / "checkpoint"), *flags],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == -9, run.stderr[-2000:]
    steps = count_steps(monkeypatch)
    trainer.train(config(tmp_path, max_steps=8, save_every=3, resume=True))
    assert f"at step {step}" in capsys.readouterr().out and len(steps) == 8 - step
    assert_bitwise_equal(final_state(out), straight[1])
    assert sorted(os.listdir(out)) == ["checkpoint", "curves.png", "data", "metrics.jsonl", "model"]


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    trainer.train(config(tmp_path, max_steps=1, resume=True))
    assert "--resume: no checkpoint in" in capsys.readouterr().out


def test_resume_under_other_settings_is_refused(tmp_path, monkeypatch):
    """--resume with a setting that changes what the run computes (the rate, the steps, the objective)
    names each difference and stops before a step; one that changes where or how it runs (the log
    interval, the device) continues."""
    count_steps(monkeypatch, fail_at=3, error=KeyboardInterrupt)
    with pytest.raises(SystemExit):
        trainer.train(config(tmp_path, max_steps=4, save_every=2))
    steps = count_steps(monkeypatch)
    with pytest.raises(checkpoint.CheckpointError, match=r"other settings \(--max-steps 4 there, 5 now, "
                       r"--lr 0.003 there, 0.001 now\)"):
        trainer.train(config(tmp_path, max_steps=5, save_every=2, lr=1e-3, resume=True))
    with pytest.raises(checkpoint.CheckpointError, match=r"--objective 'attcot' there, 'sft' now"):
        trainer.train(config(tmp_path, max_steps=4, save_every=2, objective="sft", resume=True))
    assert steps == []
    trainer.train(config(tmp_path, max_steps=4, save_every=2, resume=True, log_every=1))
    assert len(steps) == 2


def test_tampered_trainer_state_is_refused(tmp_path):
    """trainer_state.pt loads with weights_only: a pickle that would run code is refused, unrun."""
    trainer.train(config(tmp_path, max_steps=1))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    torch.save({"step": Payload()}, tmp_path / "run" / "checkpoint" / "trainer_state.pt")
    with pytest.raises(model_mod.CheckpointError, match="trainer_state.pt: refused to load"):
        trainer.train(config(tmp_path, max_steps=2, resume=True))
    assert not marker.exists()
