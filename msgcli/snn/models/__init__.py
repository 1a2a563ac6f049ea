"""Backbone registry; importing this package registers every model family."""

from msgcli.snn.models import resnet, vgg  # noqa: F401  (registration)
from msgcli.snn.models.registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
