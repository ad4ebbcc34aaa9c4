"""``trainctl-nnunet D C F [--c]``: train one nnU-Net fold under training control.

Builds `nnUNetTrainerControlled` directly, as ``nnUNetv2_train`` would,
without nnU-Net's search for the trainer by name: that search imports
torchvision, which fails beside a CPU-only torch. The client is configured by
the TRAINCTL_* environment variables, nnU-Net by its own.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from collections.abc import Sequence

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from trainer_client.errors import ControlSetupError
from trainer_client.nnunet.trainer import nnUNetTrainerControlled

__all__ = ["build_trainer", "main"]


def build_trainer(
    dataset_name_or_id: str,
    configuration: str,
    fold: str | int,
    plans_identifier: str = "nnUNetPlans",
    *,
    continue_training: bool = False,
    device: torch.device | None = None,
    trainer_class: type[nnUNetTrainerControlled] = nnUNetTrainerControlled,
) -> nnUNetTrainerControlled:
    """Instantiate the trainer as ``nnUNetv2_train`` would, without its search by name."""
    dataset: str | int = dataset_name_or_id
    if not dataset_name_or_id.startswith("Dataset"):
        try:
            dataset = int(dataset_name_or_id)
        except ValueError:
            raise ValueError(
                "dataset must be an id or a name like Dataset042_Disc, "
                f"but got {dataset_name_or_id!r}."
            ) from None
    if fold != "all":
        fold = int(fold)
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans = load_json(join(folder, plans_identifier + ".json"))
    # nnUNetTrainer.__init__ pops it: it tells its logger whether to resume.
    plans["continue_training"] = continue_training
    dataset_json = load_json(join(folder, "dataset.json"))
    return trainer_class(
        plans=plans,
        configuration=configuration,
        fold=fold,
        dataset_json=dataset_json,
        device=device if device is not None else torch.device("cuda"),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainctl-nnunet",
        description="Train nnU-Net v2 (nnUNetTrainerControlled) under a training-control server. "
        "The client is configured by TRAINCTL_* environment variables; nnU-Net by its own "
        "(nnUNet_raw, nnUNet_preprocessed, nnUNet_results).",
    )
    parser.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    parser.add_argument("configuration", help="e.g. 2d, 3d_fullres")
    parser.add_argument("fold", help="0-4 or 'all'")
    parser.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument(
        "--val", action="store_true", help="only run the final validation of a finished training"
    )
    parser.add_argument("--device", choices=("cuda", "cpu", "mps"), default="cuda")
    parser.add_argument("--epochs", type=int, help="number of epochs (nnU-Net: 1000)")
    parser.add_argument("--iterations", type=int, help="train iterations per epoch (250)")
    parser.add_argument("--val-iterations", type=int, help="validation iterations per epoch (50)")
    parser.add_argument(
        "--save-every", type=int, help="write checkpoint_latest every N epochs (50)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: all cores on cpu, 1 on cuda)"
    )
    parser.add_argument("--npz", action="store_true", help="save softmax of the final validation")
    parser.add_argument(
        "--no-final-validation", action="store_true", help="skip the final validation"
    )
    parser.add_argument(
        "--disable-checkpointing", action="store_true", help="write no checkpoints (testing)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``trainctl-nnunet``: train (or continue) one fold under control; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "iterations", "val_iterations", "save_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {value}")
    if args.c and args.val:
        parser.error("--c and --val exclude each other")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        # nnU-Net's choice: more threads do not help a GPU training.
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    try:
        trainer = build_trainer(
            args.dataset,
            args.configuration,
            args.fold,
            args.plans,
            continue_training=args.c,
            device=torch.device(args.device),
        )
    except (ValueError, OSError, RuntimeError) as error:
        print(f"trainctl-nnunet: {error}", file=sys.stderr)
        return 2
    # Before initialize(): the LR schedule is built for num_epochs.
    if args.epochs is not None:
        trainer.num_epochs = args.epochs
    if args.iterations is not None:
        trainer.num_iterations_per_epoch = args.iterations
    if args.val_iterations is not None:
        trainer.num_val_iterations_per_epoch = args.val_iterations
    if args.save_every is not None:
        trainer.save_every = args.save_every
    trainer.disable_checkpointing = args.disable_checkpointing

    from nnunetv2.run.run_training import maybe_load_checkpoint

    maybe_load_checkpoint(trainer, args.c, args.val, None)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not args.val:
        try:
            trainer.run_training()
        except ControlSetupError as error:
            # Raised before the first epoch: one line naming the variable to fix.
            print(f"trainctl-nnunet: {error}", file=sys.stderr)
            return 2
    if not args.no_final_validation:
        trainer.perform_actual_validation(args.npz)
    else:
        trainer.finish_control()
    return 0


# nnU-Net's final validation starts a spawn pool, which imports the main
# module again: without this guard it would start another training.
if __name__ == "__main__":
    raise SystemExit(main())
