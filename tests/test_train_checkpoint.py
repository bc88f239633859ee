"""train.py killed at every step of a checkpoint save (GEOCHAT_TEST_KILL_AT), and a real Ctrl-C: a complete checkpoint
always survives, --resume continues from it at the right step and ends where a straight run ends."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import REPO, base_args, metrics, run_main, setup_dir  # noqa: F401 (setup_dir is a fixture)

SETTINGS = ["--mode", "lora", "--global-batch", 4, "--batch-size", 2, "--lr", 5e-3, "--lora-r", 4, "--lora-alpha", 8,
            "--lora-dropout", 0.2, "--save-every", 1, "--weight-decay", 0.1]
COMMON = [*SETTINGS, "--max-steps", 3]
SWAPPED = train.SAVE_STEPS.index("tmp-moved-to-ckpt")  # from this save step on, the new checkpoint is ckpt/


def train_process(args, kill_at=None, **popen):
    """train.py in a subprocess (2 threads, like this one), with GEOCHAT_TEST_KILL_AT set to kill_at if given."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    env.pop(train.KILL_AT_ENV, None)
    if kill_at is not None:
        env[train.KILL_AT_ENV] = kill_at
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def run_killed(args, kill_at: str):
    """Run train.py until the fault injection kills it at kill_at ("<save step>:<train step>")."""
    proc = train_process(args, kill_at)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == train.KILL_EXIT_CODE, err[-3000:]


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint --resume would continue from."""
    ckpt = train.find_checkpoint(out)
    assert ckpt is not None, sorted(p.name for p in out.iterdir())
    return torch.load(ckpt / train.TRAIN_STATE, weights_only=True)["step"]


@pytest.fixture(scope="module")
def straight(setup_dir, tmp_path_factory):  # noqa: F811
    """An uninterrupted run with COMMON's settings."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_main(base_args(setup_dir, out, *COMMON))
    return out


@pytest.fixture(scope="module")
def killed_between_renames(setup_dir, tmp_path_factory):  # noqa: F811
    """A run killed between ckpt -> ckpt.old and ckpt.tmp -> ckpt of the step-2 save: only ckpt.old (step 1) is left."""
    out = tmp_path_factory.mktemp("between") / "run"
    run_killed(base_args(setup_dir, out, *COMMON), "ckpt-moved-to-old:2")
    assert not (out / train.CKPT).exists() and train.find_checkpoint(out) == out / train.CKPT_OLD
    assert checkpoint_step(out) == 1
    return out


def resume_matches_straight(setup_dir, out: Path, straight: Path, from_step: int, capsys):  # noqa: F811
    """--resume starts at from_step and ends exactly as the straight run, with every metrics line kept."""
    assert checkpoint_step(out) == from_step
    capsys.readouterr()
    assert run_main(base_args(setup_dir, out, *COMMON, "--resume"))["step"] == 3
    assert f"from step {from_step}" in capsys.readouterr().out
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(straight)], rel=1e-4)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == [train.CKPT]
    assert checkpoint_step(out) == 3
    expected = load_file(str(straight / "adapter.safetensors"))
    for directory in (out, out / train.CKPT):
        resumed = load_file(str(directory / "adapter.safetensors"))
        assert resumed.keys() == expected.keys()
        for k in expected:
            # Steps ran in another process: rounding differs, and Adam can blow a near-cancelling gradient's rounding
            # up to ~lr on a rare element. A checkpoint of the wrong step would move nearly every element by ~lr.
            same = torch.isclose(resumed[k], expected[k], rtol=1e-4, atol=1e-6)
            assert same.float().mean() > 0.97, (k, same.float().mean())


def test_straight_run_lr_follows_transformers(straight):
    """The logged lr of each step is transformers' cosine schedule with ceil(3% of 3) = 1 warmup step."""
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-3)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, 1, 3)
    expected = []
    for _ in range(3):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [m["lr"] for m in metrics(straight)] == expected


@pytest.mark.parametrize("save_step", train.SAVE_STEPS)
def test_kill_at_each_save_step_keeps_a_checkpoint(setup_dir, straight, tmp_path, capsys, save_step):  # noqa: F811
    """Killed at any step of the step-2 save (ckpt/ of step 1 in place): --resume continues from step 1 or 2."""
    out = tmp_path / "run"
    run_killed(base_args(setup_dir, out, *COMMON), f"{save_step}:2")
    assert [m["step"] for m in metrics(out)] == [1, 2]
    resume_matches_straight(setup_dir, out, straight, 2 if train.SAVE_STEPS.index(save_step) >= SWAPPED else 1, capsys)


@pytest.mark.parametrize("save_step", train.SAVE_STEPS)
def test_kill_at_each_save_step_after_resuming_from_ckpt_old(setup_dir, straight, killed_between_renames, tmp_path,  # noqa: F811
                                                             capsys, save_step):
    """Resumed from ckpt.old (no ckpt/), then killed at any step of its first save: ckpt.old is not lost."""
    out = tmp_path / "run"
    shutil.copytree(killed_between_renames, out)
    run_killed(base_args(setup_dir, out, *COMMON, "--resume"), f"{save_step}:2")
    assert [m["step"] for m in metrics(out)] == [1, 2]
    resume_matches_straight(setup_dir, out, straight, 2 if train.SAVE_STEPS.index(save_step) >= SWAPPED else 1, capsys)


def test_kill_in_the_first_save_leaves_metrics_and_refuses_resume(setup_dir, tmp_path, capsys):  # noqa: F811
    """Killed before any checkpoint exists: --resume is an error (exit 2, one line), and metrics.jsonl is kept."""
    out = tmp_path / "run"
    run_killed(base_args(setup_dir, out, *COMMON), "state-written:1")
    assert train.find_checkpoint(out) is None
    logged = (out / train.METRICS).read_text()
    assert [m["step"] for m in metrics(out)] == [1]
    for extra in (["--resume"], []):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(base_args(setup_dir, out, *COMMON, *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("train.py: error: "), err
        assert (out / train.METRICS).read_text() == logged


def test_ctrl_c_exits_130_and_keeps_a_usable_checkpoint(setup_dir, tmp_path, capsys):  # noqa: F811
    """A real SIGINT mid-run: exit code 130, no traceback, one line naming the checkpoint; --resume finishes the run."""
    out = tmp_path / "run"
    args = base_args(setup_dir, out, *SETTINGS, "--max-steps", 12)
    proc = train_process(args)
    deadline = time.monotonic() + 300
    while not (out / train.METRICS).exists() or len((out / train.METRICS).read_text().splitlines()) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ckpt = train.find_checkpoint(out)
    assert err.strip().splitlines()[-1] == f"train.py: interrupted; --resume continues from {ckpt}"
    step = checkpoint_step(out)
    assert 1 <= step < 12 and len(metrics(out)) >= step
    capsys.readouterr()
    assert run_main([*args, "--resume"])["step"] == 12
    assert f"from step {step}" in capsys.readouterr().out
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))


def test_resume_from_an_older_checkpoint_with_the_optimizer_in_train_state(setup_dir, straight, killed_between_renames,  # noqa: F811
                                                                          tmp_path, capsys):
    """A checkpoint of the earlier format (the whole optimizer state inside train_state.pt, no optimizer/) still
    resumes exactly."""
    from test_train import read_optimizer_state

    out = tmp_path / "run"
    shutil.copytree(killed_between_renames, out)
    ckpt = out / train.CKPT_OLD
    state = torch.load(ckpt / train.TRAIN_STATE, weights_only=False)
    state["optimizer"] = read_optimizer_state(ckpt)
    shutil.rmtree(ckpt / train.OPTIMIZER_DIR)
    (out / "optimizer.pt").unlink()
    train.write_train_state(ckpt / train.TRAIN_STATE, state)
    resume_matches_straight(setup_dir, out, straight, 1, capsys)
    assert (out / train.CKPT / train.OPTIMIZER_DIR).is_dir()  # its next save is in the sharded format


def test_ctrl_c_inside_the_optimizer_write_is_raised_after_it():
    """A SIGINT inside sigint_held_back (around torch.distributed.checkpoint, which would wrap the KeyboardInterrupt
    in a CheckpointException) lets the block finish, then raises KeyboardInterrupt."""
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with train.sigint_held_back():
            signal.raise_signal(signal.SIGINT)
            finished = True
    assert finished and signal.getsignal(signal.SIGINT) is signal.default_int_handler
