"""Several processes through ``accelerate launch`` (2 CPU processes, gloo): DDP and FSDP take the
same steps as 1 process with the same global batch, and a run killed with SIGKILL resumes to the
same final weights as an uninterrupted one.

accelerate selects FSDP only for GPU-like devices (its ``AcceleratorState`` leaves a CPU run on
DDP), while torch's FSDP2 (``fully_shard``) runs on CPU with gloo; the FSDP runs here therefore
start through a small driver that sets accelerate's distributed type to FSDP with an FSDP2 plugin
after ``Accelerator()`` is built, and the rest (accelerate's ``prepare`` and FSDP2 wrapping,
memllm's trainer) runs unchanged.

Each layout costs four launches (~35 s on 2 cores): marked ``slow`` and ``multiprocess``; the
default ``pytest``/``make test`` selects ``multiprocess`` tests even though they are slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memllm.training.checkpointing import complete_checkpoints
from memllm.training.run_config import load_run_config
from memllm.training.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/debug.yaml")
STEPS = 4
# FSDP=1: accelerate's FSDP2 plugin on CPU (see the module docstring); SLOW=1: each step waits,
# so that a kill lands mid-run
DRIVER = """
import os, sys, time
if os.environ.get("FSDP") == "1":
    import accelerate
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    built = accelerate.Accelerator.__init__
    def init(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            cpu_ram_efficient_loading=False, reshard_after_forward=True)
    accelerate.Accelerator.__init__ = init
if os.environ.get("SLOW") == "1":
    import memllm.training.trainer as loop
    real = loop.Trainer.train_step
    def slow(self, batches):
        time.sleep(0.5)
        return real(self, batches)
    loop.Trainer.train_step = slow
from memllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _overrides(out: Path, batch_size: int, accum: int = 1) -> list[str]:
    return [
        f"output_dir={out}",
        f"train.batch_size={batch_size}",
        f"train.grad_accum_steps={accum}",
        f"train.max_steps={STEPS}",
        # every bAbI prompt is longer than 64 tokens: cutting them to one length means no padding,
        # so both runs see identical segments and only the summation order differs
        "train.max_length=64",
        "train.segment_length=32",
        "train.save_every=2",
        "eval.every=2",
        "eval.max_examples=8",
        "data.num_train=16",
        "log.tensorboard=false",
        "log.progress_bar=false",
    ]


def _launch(tmp: Path, out: Path, layout: str, *, slow: bool = False) -> subprocess.Popen:
    """``accelerate launch`` of ``memllm train`` on 2 CPU processes, in its own process group;
    each process runs 2 micro-batches of 1 per step (the gradients synced after the second)."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",  # gloo on the CPU
        "OMP_NUM_THREADS": "1",
        "FSDP": str(int(layout == "fsdp")),
        "SLOW": str(int(slow)),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(driver), "train", "--config", CONFIG, *_overrides(out, batch_size=1, accum=2),
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the launcher and its workers: one group, killed as one
    )


def _finish(proc: subprocess.Popen) -> str:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def _train_log(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] in ("train", "eval")]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "memory.safetensors")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 1 process, the same global batch (4)."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = train(load_run_config(CONFIG, _overrides(out, batch_size=4)))
    assert result.summary["processes"] == 1 and result.summary["global_batch"] == 4
    return out


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_processes(request, tmp_path_factory):
    """An uninterrupted 2-process run of the layout, and its stderr."""
    tmp = tmp_path_factory.mktemp(request.param)
    out = tmp / "run"
    stderr = _finish(_launch(tmp, out, request.param))
    return request.param, out, stderr


def test_two_processes_match_one_process_with_the_same_global_batch(two_processes, one_process):
    layout, two, stderr = two_processes
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4
    assert (two / "checkpoints" / f"step-{STEPS:08d}" / "rng" / "rank1.pt").is_file()
    if layout == "fsdp":  # the frozen backbone really was sharded, the memory left whole
        line = next(x for x in stderr.splitlines() if "FSDP:" in x)
        assert int(line.split("FSDP: ")[1].split()[0]) > 0, line
    else:
        assert "FSDP:" not in stderr

    ref_log, got_log = _train_log(one_process), _train_log(two)
    assert [r["step"] for r in ref_log] == [r["step"] for r in got_log]
    for a, b in zip(ref_log, got_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    ref, got = _weights(one_process), _weights(two)
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5)


def test_sigkill_mid_run_then_resume_ends_bit_identical(two_processes, tmp_path):
    layout, reference, _ = two_processes
    out = tmp_path / "killed"
    proc = _launch(tmp_path, out, layout, slow=True)
    try:
        deadline = time.time() + 180
        while not complete_checkpoints(out):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint after 180 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers at once
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists()  # killed mid-run
    assert complete_checkpoints(out)[-1][0] < STEPS

    _finish(_launch(tmp_path, out, layout))  # the same command again resumes
    ref, got = _weights(reference), _weights(out)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert [r["step"] for r in _train_log(out)] == [r["step"] for r in _train_log(reference)]
