"""Datasets by name: event clips ``[T, 2, size, size]`` or images ``[C, H, W]`` with labels.

Importing this package registers every dataset; :func:`build_datasets` builds one
from a :class:`~msgcli.config.RunConfig`. :func:`register_dataset` adds a user's own.
"""

from . import digits, events, folders, images, synthetic  # noqa: F401  (each registers its datasets)
from .custom import EventFiles, register_dataset
from .registry import DataBundle, DatasetInfo, build_datasets, check_datasets, list_datasets, resolve_root, resolve_workers

__all__ = ["DataBundle", "DatasetInfo", "EventFiles", "build_datasets", "check_datasets", "list_datasets",
           "register_dataset", "resolve_root", "resolve_workers"]
