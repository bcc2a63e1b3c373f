"""`entropy-search train`: a tiny run, --help, bad input as one line with exit status 2, and a training killed
for real and resumed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from entropy_search import train as training
from entropy_search.cli import main
from entropy_search.problem.checkpoint import build_model, load_checkpoint
from entropy_search.train import read_training_state, save_training_state


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tiny_training_run_saves_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "runs" / "baseline.pt"
    code = main(["train", "--epochs", "2", "--width", "8", "--out", str(out), "--no-progress", "--threads", "1",
                 "--seed", "3"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "test accuracy:" in stdout and str(out) in stdout
    ckpt = load_checkpoint(out)
    assert ckpt.model_name == "digits_cnn" and ckpt.model_kwargs == {"width": 8} and ckpt.data == "digits"
    assert ckpt.config["epochs"] == 2 and ckpt.config["seed"] == 3 and ckpt.config["lr"] == 0.05
    assert 0.0 <= ckpt.metrics["test_acc"] <= 1.0 and "heldout_acc" in ckpt.metrics
    assert f"{100 * ckpt.metrics['test_acc']:.2f}%" in stdout
    build_model(ckpt)


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--model", "--data", "--epochs", "--out", "--lr", "--batch-size", "--seed", "--device",
                   "--data-root", "--download", "--width"):
        assert option in help_text


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_net"], "unknown model 'no_such_net'"),
    (["--data", "no_such_data"], "unknown data set 'no_such_data'"),
    (["--model-arg", "oops"], "KEY=VALUE"),
    (["--epochs", "1", "--model-arg", "depth=3"], "does not accept"),
    (["--epochs", "-1"], "epochs must be 0 or more"),
    (["--device", "tpu9"], "unknown device"),
    (["--out", "."], "is a directory"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    out = tmp_path / "never.pt"
    code = main(["train", "--out", str(out), "--no-progress", "--threads", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("entropy-search train: error:")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    code = main(["train", "--data", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "CIFAR-10 not found" in err and "--download" in err and "Traceback" not in err


def test_console_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "entropy_search.cli", "train", "--model", "no_such_net", "--out", str(tmp_path / "x.pt")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown model 'no_such_net'" in proc.stderr


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["train", "--out", str(blocker / "sub" / "x.pt"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and "not a writable folder" in captured.err and "training" not in captured.out


def _equal_weights(a, b) -> bool:
    first, second = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_killed_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """`entropy-search train` killed (SIGKILL) after a few epochs: without --resume it refuses to start over
    the interrupted training; with --resume it continues from the state of its last finished epoch and ends
    with the weights, bit for bit, of an uninterrupted run of the same arguments. About 15 s on 2 cores."""
    args = [sys.executable, "-m", "entropy_search.cli", "train", "--epochs", "24", "--width", "48", "--threads", "1",
            "--no-progress", "--seed", "5"]
    subprocess.run([*args, "--out", str(tmp_path / "whole.pt")], check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed.pt"
    state = tmp_path / "killed.pt.state"
    proc = subprocess.Popen([*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    try:
        while proc.poll() is None and done < 3:  # waits on the training's progress (pytest-timeout)
            if state.exists():
                done = len(read_training_state(state)["history"])
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and 3 <= done < 24, "the training ended before it could be killed"
    assert not killed.exists()
    again = subprocess.run([*args, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = subprocess.run([*args, "--out", str(killed), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {state}" in resumed.stdout
    assert _equal_weights(killed, tmp_path / "whole.pt")
    assert not state.exists()  # the checkpoint holds the finished training
    ckpt = load_checkpoint(killed)
    assert ckpt.metrics["train_seconds"] > 0 and ckpt.config["epochs"] == 24
    # with no interrupted training to continue, --resume trains from the first epoch
    assert main(["train", "--epochs", "2", "--width", "8", "--threads", "1", "--no-progress",
                 "--out", str(tmp_path / "small.pt"), "--resume"]) == 0


def test_a_training_state_of_other_arguments_is_refused(tmp_path, capsys, monkeypatch):
    """The state a 3-epoch training saved after its first epoch resumes that training only: other arguments,
    or a file that is no training state, are one line and exit status 2. About 3 s."""
    state = tmp_path / "b.pt.state"
    kept = []

    def keep_first(path, key, history, parts, generator):
        save_training_state(path, key, history, parts, generator)
        if len(history) == 1:
            kept.append(Path(path).read_bytes())

    base = ["train", "--width", "8", "--threads", "1", "--no-progress", "--out", str(tmp_path / "b.pt")]
    monkeypatch.setattr(training, "save_training_state", keep_first)
    assert main([*base, "--epochs", "3"]) == 0
    monkeypatch.undo()
    whole = tmp_path / "whole.pt"
    Path(tmp_path / "b.pt").rename(whole)
    state.write_bytes(kept[0])
    assert main([*base, "--epochs", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another training" in err and "epochs: 3 there, 4 here" in err and "Traceback" not in err
    assert main([*base, "--epochs", "3", "--resume"]) == 0  # the same arguments: resumed, same weights
    assert _equal_weights(tmp_path / "b.pt", whole)
    state.write_bytes(b"not a state")
    assert main([*base, "--epochs", "3", "--resume"]) == 2
    assert "unreadable" in capsys.readouterr().err
