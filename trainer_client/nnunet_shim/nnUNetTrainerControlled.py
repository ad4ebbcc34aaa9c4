"""Makes `nnUNetv2_train ... -tr nnUNetTrainerControlled` find the trainer: put this folder on nnUNet_extTrainer."""  # noqa: E501

from trainer_client.nnunet import nnUNetTrainerControlled as nnUNetTrainerControlled
