"""The nnunet package's `__all__` is honest: every export resolves, each from its module."""

from __future__ import annotations

import importlib

import pytest

import trainer_client.nnunet as nnunet


def test_all_is_honest() -> None:
    home = vars(nnunet)["_HOME"]
    assert set(nnunet.__all__) == set(home)
    for name in nnunet.__all__:
        module = importlib.import_module(f"trainer_client.nnunet.{home[name]}")
        assert name in module.__all__
        assert getattr(nnunet, name) is getattr(module, name)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        nnunet.no_such_name  # noqa: B018
