"""`entropy-search train`: a tiny run, --help, and bad input as one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from entropy_search.cli import main
from entropy_search.problem.checkpoint import build_model, load_checkpoint


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
