"""Under DDP only rank 0 reports, and every rank applies the decision it broadcasts.

Two CPU processes on gloo, each a real trainer training 2 tiny epochs. nnU-Net
runs DDP only on CUDA, so the network is not wrapped in DDP here: what is under
test is the decision's path (rank 0 reports, `broadcast_object_list`, every rank
applies), which is the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.nnunet.conftest import ScriptedServer
from tests.nnunet.ddp_worker import run_rank
from trainer_client.api import control_pb2 as pb


@pytest.mark.timeout(180)
def test_rank_0_reports_and_every_rank_applies_the_decision(
    nnunet_paths: Path,
    scripted_server: Callable[..., ScriptedServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = scripted_server(
        {
            0: {
                "action": pb.INTERVENE,
                "lr": 0.004,
                "loss_weights": {"dice": 0.4, "focal": 0.6},
                "intervention_index": 1,
            }
        }
    )
    monkeypatch.setenv("TRAINCTL_SERVER", server.target)
    mp.spawn(run_rank, args=(2, str(tmp_path)), nprocs=2, join=True)

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["lrs"][1] == pytest.approx(0.004, rel=1e-12)
        assert result["weights"] == {"dice": 0.4, "focal": 0.6}
        assert result["interventions"] == 1
        assert result["outcomes"] == ["applied", "none"]
    # One report per epoch, from rank 0 alone.
    assert [r.epoch for r in server.servicer.reports] == [0, 1]
