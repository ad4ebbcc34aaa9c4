"""Fixtures for the nnU-Net tests: one synthetic dataset per session, trainers, scripted servers.

The dataset (10 synthetic 64x64 PNG cases) is planned and preprocessed once per
session (about 20 s); each test trains in its own nnUNet_results folder with 5
train and 2 validation iterations per epoch on the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.nnunet import build_trainer, nnUNetTrainerControlled
from trainer_client.nnunet.synthetic import make_disc_dataset, nnunet_env, plan_and_preprocess

DATASET_ID = 42
ITERATIONS = 5
VAL_ITERATIONS = 2


@dataclass(frozen=True)
class NnunetData:
    """The session's planned and preprocessed dataset."""

    root: Path
    env: Mapping[str, str]


@pytest.fixture(scope="session")
def nnunet_data(tmp_path_factory: pytest.TempPathFactory) -> NnunetData:
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    make_disc_dataset(Path(env["nnUNet_raw"]), DATASET_ID)
    plan_and_preprocess(DATASET_ID, env)
    return NnunetData(root=root, env=env)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two threads that wait for
    each other make a step 5x slower (0.2 s vs 1.1 s measured), one is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def nnunet_paths(nnunet_data: NnunetData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """nnU-Net's env for this test: the shared dataset, results of its own; returns them."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(key, nnunet_data.env[key])
    monkeypatch.setenv("nnUNet_compile", "0")
    results = tmp_path / "nnUNet_results"
    monkeypatch.setenv("nnUNet_results", str(results))
    for key in ("TRAINCTL_SERVER", "TRAINCTL_RUN_ID", "TRAINCTL_DEADLINE_S", "TRAINCTL_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRAINCTL_FAIL_OPEN", "true")
    return results


class RecordingTrainer(nnUNetTrainerControlled):
    """Records what every train step really used; can crash after a given epoch."""

    #: Raise after this epoch's checkpoint was written (a simulated crash).
    crash_after_epoch: int | None = None

    def initialize(self) -> None:
        # Not in __init__: nnU-Net's bookkeeping needs the base signature there.
        super().initialize()
        #: (epoch, LR of the optimizer, loss weights) for every train step.
        self.steps: list[tuple[int, float, dict[str, float]]] = []
        #: Per epoch, the pre-clip gradient norm of every step.
        self.norms: dict[int, list[float]] = {}
        #: (epoch, network state) at the start of the first epoch after a rollback.
        self.after_rollback: tuple[int, dict[str, torch.Tensor]] | None = None
        #: Sum of all parameters at every epoch's end, before the decision is applied.
        self.checksums: dict[int, float] = {}
        #: The network state at every epoch's end, before the decision is applied.
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.last_rollback is not None and self.after_rollback is None:
            state = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
            self.after_rollback = (self.current_epoch, state)

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.steps.append((self.current_epoch, lr, self.loss.weights))
        return super().train_step(batch)

    def on_epoch_end(self) -> None:
        self.norms[self.current_epoch] = [float(n) for n in self.step_gradient_norms]
        self.checksums[self.current_epoch] = float(
            sum(p.detach().double().sum() for p in self.network.parameters())
        )
        self.states[self.current_epoch] = {
            k: v.detach().clone() for k, v in self.network.state_dict().items()
        }
        super().on_epoch_end()
        if self.crash_after_epoch is not None and self.current_epoch - 1 == self.crash_after_epoch:
            raise RuntimeError(f"simulated crash after epoch {self.crash_after_epoch}")

    def lr_of(self, epoch: int) -> float:
        """The one LR every step of `epoch` used."""
        lrs = {lr for e, lr, _ in self.steps if e == epoch}
        assert len(lrs) == 1, f"epoch {epoch} ran at LRs {sorted(lrs)}"
        return lrs.pop()

    def weights_of(self, epoch: int) -> list[dict[str, float]]:
        return [w for e, _, w in self.steps if e == epoch]


@pytest.fixture
def make_trainer(
    nnunet_paths: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., RecordingTrainer]:
    """Build a RecordingTrainer for `epochs` epochs that reports to `server` (None: nobody)."""

    def make(
        *,
        epochs: int,
        server: str | None,
        deadline_s: float = 5.0,
        continue_training: bool = False,
        save_every: int = 50,
        env: Mapping[str, str] | None = None,
        trainer_class: type[RecordingTrainer] = RecordingTrainer,
        plot: bool = False,
    ) -> RecordingTrainer:
        # Port 1 on loopback: nothing listens there, connections are refused.
        monkeypatch.setenv("TRAINCTL_SERVER", server or "127.0.0.1:1")
        monkeypatch.setenv("TRAINCTL_DEADLINE_S", str(deadline_s))
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        trainer = build_trainer(
            str(DATASET_ID),
            "2d",
            0,
            continue_training=continue_training,
            device=torch.device("cpu"),
            trainer_class=trainer_class,
        )
        assert isinstance(trainer, RecordingTrainer)
        trainer.num_epochs = epochs
        trainer.num_iterations_per_epoch = ITERATIONS
        trainer.num_val_iterations_per_epoch = VAL_ITERATIONS
        trainer.save_every = save_every
        if not plot:
            # progress.png takes 1-2 s per epoch here; one test checks it.
            trainer.logger.plot_progress_png = lambda folder: None
        return trainer

    return make


# --- a scripted control server -----------------------------------------------------------


class ScriptedControl(pb_grpc.TrainingControlServicer):  # type: ignore[misc]
    """Answers each epoch with the scripted decision (NONE otherwise); records the reports,
    and the StartRun and FinishRun requests (each StartRun opens the next attempt).

    With ``hang=True`` it never answers: every call waits until the server stops.
    """

    def __init__(self, script: Mapping[int, Mapping[str, Any]], *, hang: bool = False) -> None:
        self.script = script
        self.hang = hang
        self.reports: list[pb.EpochReport] = []
        self.starts: list[pb.StartRunRequest] = []
        self.finishes: list[pb.FinishRunRequest] = []
        self.released = threading.Event()

    def StartRun(
        self, request: pb.StartRunRequest, context: grpc.ServicerContext
    ) -> pb.StartRunResponse:
        self.starts.append(request)
        if self.hang:
            self.released.wait(60)
            context.abort(grpc.StatusCode.UNAVAILABLE, "released")
        attempt = len(self.starts)
        return pb.StartRunResponse(
            attempt=attempt, policy_version="scripted", message=f"scripted attempt {attempt}"
        )

    def FinishRun(
        self, request: pb.FinishRunRequest, context: grpc.ServicerContext
    ) -> pb.FinishRunResponse:
        self.finishes.append(request)
        return pb.FinishRunResponse(status=request.status)

    def ReportEpoch(self, request: pb.EpochReport, context: grpc.ServicerContext) -> pb.Decision:
        self.reports.append(request)
        if self.hang:
            self.released.wait(60)
            context.abort(grpc.StatusCode.UNAVAILABLE, "released")
        fields = dict(self.script.get(request.epoch, {"action": pb.NONE}))
        return pb.Decision(
            decision_id=f"scripted-{request.epoch}",
            run_id=request.run_id,
            epoch=request.epoch,
            source=pb.POLICY,
            policy_version="scripted",
            **fields,
        )


@dataclass
class ScriptedServer:
    servicer: ScriptedControl
    target: str


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedServer]]:
    """Start tiny sync gRPC servers on port 0 whose decisions are scripted per epoch."""
    started: list[tuple[grpc.Server, ScriptedControl]] = []

    def start(script: Mapping[int, Mapping[str, Any]], *, hang: bool = False) -> ScriptedServer:
        servicer = ScriptedControl(script, hang=hang)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_TrainingControlServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, servicer))
        return ScriptedServer(servicer, f"127.0.0.1:{port}")

    yield start
    for server, servicer in started:
        servicer.released.set()
        server.stop(grace=None).wait(10)
