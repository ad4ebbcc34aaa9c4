"""One training of the outcome benchmark, seeded: ``outcome_train.py SEED stock|controlled ARGS``.

Seeds Python's, NumPy's and torch's generators, then trains one fold either
with nnU-Net's own `nnUNetTrainer` (no control at all) or through
``trainctl-nnunet`` (our `nnUNetTrainerControlled`, configured by TRAINCTL_*).
With ``nnUNet_n_proc_DA=0`` the augmentation runs in this process, so the seed
fixes the network's initialisation, the batches and their augmentation: two
arms trained with the same seed and fold differ only by what control did
(up to the non-determinism of float sums across threads).

ARGS are trainctl-nnunet's (dataset, configuration, fold, --epochs, ...); the
stock trainer understands the subset the benchmark uses. The stock trainer is
built directly, as trainctl-nnunet builds ours: nnU-Net's search by name
imports torchvision, which fails beside a CPU-only torch.
"""

from __future__ import annotations

import argparse
import random
import sys


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_stock(argv: list[str]) -> int:
    """Train one fold with nnU-Net's own trainer and run its final validation."""
    import torch
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from trainer_client.nnunet.cli import build_trainer

    parser = argparse.ArgumentParser(prog="outcome_train.py SEED stock")
    parser.add_argument("dataset")
    parser.add_argument("configuration")
    parser.add_argument("fold")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--val-iterations", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--disable-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trainer = build_trainer(
        args.dataset,
        args.configuration,
        args.fold,
        device=torch.device(args.device),
        trainer_class=nnUNetTrainer,  # type: ignore[arg-type]  # the base class on purpose
    )
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.disable_checkpointing = args.disable_checkpointing
    maybe_load_checkpoint(trainer, False, False, None)
    trainer.run_training()
    trainer.perform_actual_validation(False)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("stock", "controlled"):
        print("usage: outcome_train.py SEED stock|controlled ARGS...", file=sys.stderr)
        return 2
    seed_everything(int(argv[0]))
    if argv[1] == "stock":
        return train_stock(argv[2:])
    from trainer_client.nnunet.cli import main as trainctl_main

    return trainctl_main(argv[2:])


# nnU-Net's final validation starts a spawn pool, which imports the main module again.
if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
