"""A run's output folder on disk: one run at a time (OS lock), checkpoints that verify (resume
falls back to the newest good one), settings compared even without config.yaml, and a NaN stop
whose advice works."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memllm.errors import CheckpointError, ConfigError
from memllm.training.checkpointing import complete_checkpoints
from memllm.training.lock import LOCK_FILE
from memllm.training.run_config import load_run_config
from memllm.training.schedule import lr_factor
from memllm.training.trainer import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import ToyTask, records, toy_config  # noqa: E402

CONFIG = str(ROOT / "configs/debug.yaml")
HOLD_DRIVER = """
import os, sys, time
import memllm.training.trainer as loop
real = loop.Trainer.train_step
def held(self, batches):  # after its first checkpoint the run waits while the hold file exists
    while self.state.step >= 2 and os.path.exists(os.environ["HOLD"]):
        time.sleep(0.05)
    return real(self, batches)
loop.Trainer.train_step = held
from memllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _overrides(out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        "train.max_steps=6",
        "train.save_every=2",
        "eval.every=6",
        "eval.max_examples=4",
        "data.num_train=32",
        "log.tensorboard=false",
        "log.progress_bar=false",
    ]


def test_two_trains_on_one_folder_the_second_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(HOLD_DRIVER)
    hold = tmp_path / "hold"
    hold.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HOLD": str(hold)}
    first = subprocess.Popen(
        [sys.executable, str(driver), "train", "--config", CONFIG, *_overrides(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not complete_checkpoints(out):  # the first run holds the lock and is training
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "memllm", "train", "--config", CONFIG, *_overrides(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None  # the refusal did not disturb the first run
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"is in use by another run (pid {first.pid} on " in errors[0]
    assert "driver.py train --config" in errors[0]  # the holder's command
    # the OS released the killed run's lock: the folder resumes, and its log reads as one run
    assert (out / LOCK_FILE).is_file()
    resumed = train(load_run_config(CONFIG, _overrides(out)), source=CONFIG)
    assert resumed.summary["steps"] == 6
    assert [r["step"] for r in records(out)] == [5, 6]  # log.every=5, then the last step


def test_a_run_in_progress_holds_the_lock_and_releases_it(tmp_path):
    from memllm.training.lock import OutputLock

    cfg = toy_config(tmp_path)
    with OutputLock(cfg.output_dir):
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "from memllm.training.lock import OutputLock; import sys; "
                f"OutputLock({cfg.output_dir!r}).acquire()",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    train(cfg, task=ToyTask())  # released: the same folder trains


def _reference(tmp_path, **sections):
    return train(toy_config(tmp_path / "ref", **sections), task=ToyTask())


def _interrupted(tmp_path, stop_after: int, **sections):
    """A run of the same config that crashes in the step after ``stop_after`` (checkpointed)."""
    from memllm.training.trainer import Trainer

    cfg = toy_config(tmp_path / "run", **sections)
    real, calls = Trainer.train_step, {"n": 0}

    def crash(self, batches):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise RuntimeError("simulated crash")
        return real(self, batches)

    Trainer.train_step = crash
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, task=ToyTask())
    finally:
        Trainer.train_step = real
    return cfg


SECTIONS = {"train": {"max_steps": 6, "save_every": 2, "keep_last": 3}, "eval": {"every": 0}}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 300):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "weights-bitflip": lambda p: _flip(p / "memory.safetensors"),
    "trainer-truncated": lambda p: (p / "trainer.pt").write_bytes(b"PK\x03\x04" * 10),
    "state-garbled": lambda p: (p / "state.json").write_text('{"step": 4, "bes'),
    "rng-empty": lambda p: (p / "rng" / "rank0.pt").write_bytes(b""),
}  # fmt: skip


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_a_corrupted_latest_checkpoint_falls_back_to_the_newest_good_one(corrupt, tmp_path, caplog):
    reference = _reference(tmp_path, **SECTIONS)
    cfg = _interrupted(tmp_path, 4, **SECTIONS)
    root = Path(cfg.output_dir) / "checkpoints"
    CORRUPTIONS[corrupt](root / "step-00000004")
    with caplog.at_level(logging.WARNING, logger="memllm"):
        resumed = train(cfg, task=ToyTask())
    warnings = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("resuming from step-00000002: the newer step-00000004 failed")
    assert (root / "step-00000004.unverified").is_dir()  # kept for inspection, not deleted
    assert resumed.summary["steps"] == 6
    ref, got = (
        load_file(reference.output_dir / "final/memory.safetensors"),
        load_file(Path(cfg.output_dir) / "final/memory.safetensors"),
    )
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit-exact with the uninterrupted run


def test_no_checkpoint_that_verifies_is_one_error_not_a_silent_restart(tmp_path):
    cfg = _interrupted(tmp_path, 4, **SECTIONS)
    for _, path in complete_checkpoints(cfg.output_dir):
        _flip(path / "memory.safetensors")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint\(s\) .* verifies") as e:
        train(cfg, task=ToyTask())
    assert "\n" not in str(e.value)


def test_resume_compares_against_the_checkpoints_settings_without_config_yaml(tmp_path):
    """With config.yaml deleted, another train.lr resumed and rewrote config.yaml."""
    first = train(toy_config(tmp_path, train={"max_steps": 2}), task=ToyTask())
    (first.output_dir / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 → 0\.5"):
        train(toy_config(tmp_path, train={"max_steps": 4, "lr": 0.5}), task=ToyTask())
    assert not (first.output_dir / "config.yaml").exists()  # nothing rewritten


def test_the_first_log_record_after_a_resume_spans_log_every_steps(tmp_path):
    sections = {
        "train": {"max_steps": 6, "save_every": 2},
        "eval": {"every": 0},
        "log": {"every": 3},
    }
    reference = _reference(tmp_path, **sections)
    cfg = _interrupted(tmp_path, 4, **sections)
    train(cfg, task=ToyTask())
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in records(reference.output_dir)]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in records(cfg.output_dir)]
    assert got == want  # step 6 averages steps 4-6, as in the uninterrupted run


def _poison_from(monkeypatch, step: int):
    import memllm.training.forward as loop

    calls = {"n": 0}
    real = loop.forward_segments

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "forward_segments", poisoned)


def test_the_nan_stop_names_step_value_and_fix_and_its_fix_is_allowed(tmp_path, monkeypatch):
    sections = {"train": {"max_steps": 6, "save_every": 3}, "eval": {"every": 0}}
    cfg = toy_config(tmp_path, **sections)
    _poison_from(monkeypatch, 4)
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, task=ToyTask())
    message = str(info.value)
    assert message.startswith("step 4: the task loss is nan; stopped before updating them")
    assert "step-00000003" in message and "train.lr (now 0.01)" in message
    assert "train.max_grad_norm (now 1.0)" in message and "\n" not in message
    monkeypatch.undo()

    # a change the advice does not cover is still refused
    other = toy_config(tmp_path, **sections, memory={"type": "latent", "num_slots": 8})
    with pytest.raises(ConfigError, match="num_slots"):
        train(other, task=ToyTask())
    # the advice: a lower lr on the same folder resumes step 3, and the change is recorded
    lower = toy_config(tmp_path, **{**sections, "train": {**sections["train"], "lr": 0.005}})
    result = train(lower, task=ToyTask())
    change = {"step": 3, "changes": ["train.lr: 0.01 → 0.005"]}
    assert result.summary["setting_changes"] == [change]
    state = json.loads((Path(cfg.output_dir) / "checkpoints/step-00000006/state.json").read_text())
    assert state["setting_changes"] == [change] and state["config"]["train"]["lr"] == 0.005
    step4 = next(r for r in records(cfg.output_dir) if r["step"] == 4)
    t = lower.train
    assert step4["lr"] == pytest.approx(0.005 * lr_factor(3, t.scheduler, t.warmup_steps, 6))


def test_a_non_finite_update_is_never_checkpointed(tmp_path, monkeypatch):
    """The 'last good' checkpoint of a NaN stop gave NaN again on resume."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def blow_up(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up)
    cfg = toy_config(tmp_path, train={"max_steps": 6, "save_every": 1}, eval={"every": 0})
    with pytest.raises(TrainingDiverged, match=r"step 3: the update made .* non-finite") as info:
        train(cfg, task=ToyTask())
    assert "after updating the weights (not saved)" in str(info.value)
    assert [s for s, _ in complete_checkpoints(cfg.output_dir)] == [1, 2]
    weights = load_file(Path(cfg.output_dir) / "checkpoints/step-00000002/memory.safetensors")
    assert all(bool(v.isfinite().all()) for v in weights.values())
