"""One rank of the DDP decision test (run in a spawned process; see test_ddp.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import distributed as dist

from trainer_client.nnunet import build_trainer


def run_rank(rank: int, world_size: int, workdir: str) -> None:
    """Train 2 epochs of 1 + 1 iterations as `rank`; write what the rank used to JSON."""
    torch.set_num_threads(1)
    # nnU-Net's own spelling of its variables.
    os.environ["nnUNet_results"] = str(Path(workdir) / f"results_rank{rank}")  # noqa: SIM112
    # Built before the process group exists: nnU-Net's DDP mode insists on CUDA, and
    # the decision path under test only needs torch.distributed.
    trainer = build_trainer("42", "2d", 0, device=torch.device("cpu"))
    trainer.num_epochs = 2
    trainer.num_iterations_per_epoch = 1
    trainer.num_val_iterations_per_epoch = 1
    trainer.logger.plot_progress_png = lambda folder: None
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        trainer.local_rank = rank
        trainer.run_training()
        result = {
            "rank": rank,
            "lrs": trainer.logger.get_value("lrs", step=None),
            "weights": trainer.loss.weights,
            "interventions": trainer.run_state.intervention_count,
            "outcomes": [e.outcome for e in trainer.control_events],
        }
        (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
