"""``python -m trainer_client.nnunet``: the same as ``trainctl-nnunet``."""

from trainer_client.nnunet.cli import main

# nnU-Net's final validation starts a spawn pool, which imports the main
# module again: without this guard it would start another training.
if __name__ == "__main__":
    raise SystemExit(main())
