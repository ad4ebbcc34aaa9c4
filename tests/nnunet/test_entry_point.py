"""`trainctl-nnunet` trains, validates and resumes in its own process; the shim is found by name."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO, ServerThread
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.nnunet import main, nnUNetTrainerControlled

RUN_ID = "Dataset042_Disc__nnUNetTrainerControlled__nnUNetPlans__2d__fold_0"


def trainctl_nnunet(*args: str, server: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRAINCTL_SERVER": server}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer_client.nnunet",
            "42",
            "2d",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--iterations",
            "3",
            "--val-iterations",
            "1",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.timeout(300)
def test_train_then_continue_with_final_validation(
    nnunet_paths: Path, make_server: Callable[..., ServerThread]
) -> None:
    server = make_server()
    first = trainctl_nnunet("--epochs", "2", "--no-final-validation", server=server.target)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # --c continues from checkpoint_final with a longer schedule, then validates; the
    # validation's spawn pool must not start another training (the __main__ guard).
    second = trainctl_nnunet("--c", "--epochs", "3", server=server.target)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed run " + RUN_ID + " at epoch 2" in second.stdout
    assert second.stdout.count("Epoch 2") == 1 and "Epoch 0" not in second.stdout
    assert "Mean Validation Dice" in second.stdout

    with grpc.insecure_channel(server.target) as channel:
        run = pb_grpc.ControlAdminStub(channel).GetRun(pb.GetRunRequest(run_id=RUN_ID), timeout=10)
    assert [e.report.epoch for e in run.epochs] == [0, 1, 2]
    assert run.run.labels.trainer == "nnUNetTrainerControlled"
    # Each process opened an attempt and said how it ended: the first without a final
    # validation, the second (resumed from epoch 1's checkpoint) with its Dice.
    first_attempt, second_attempt = run.attempts
    assert (first_attempt.status, first_attempt.metrics.HasField("mean_dice")) == (
        pb.COMPLETED,
        False,
    )
    assert (second_attempt.status, second_attempt.resume_from_epoch) == (pb.COMPLETED, 1)
    assert 0 <= second_attempt.metrics.mean_dice <= 1
    fold = nnunet_paths / "Dataset042_Disc" / "nnUNetTrainerControlled__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "validation" / "summary.json").is_file()


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["42", "2d", "0", "--epochs", "0"])
    assert exited.value.code == 2
    assert "--epochs must be >= 1, but got 0" in capsys.readouterr().err


def test_the_shim_folder_makes_the_trainer_findable_by_name() -> None:
    # What nnUNetv2_train does with each folder of nnUNet_extTrainer (after its
    # own folders, whose import of torchvision fails beside a CPU-only torch).
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    shim = REPO / "trainer_client" / "nnunet_shim"
    found = recursive_find_python_class(
        str(shim),
        "nnUNetTrainerControlled",
        None,
        base_folder=str(shim),
        cleanup_imports_from_base_folder=True,
    )
    assert found is nnUNetTrainerControlled
