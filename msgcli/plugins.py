"""Plugins: a user's own Python code that registers backbones, surrogates and datasets, loaded by name.

A plugin is a ``.py`` file (``--plugin path/to/plugin.py``) or an importable module
(``--plugin package.module``) that imports msgcli and calls ``register_model``,
``register_surrogate`` or ``register_dataset`` when it is imported. Installed packages
announce theirs in the entry-point group ``msgsnn.plugins``; those load in every process.

The config's ``plugins:`` list names a run's plugins (files by absolute path), so every process
that reads the config (``eval``, ``export``, ``--resume``, each sweep point, Ray workers) loads
them first: :func:`load` runs before the config is validated, so names a plugin registered pass.
A plugin that fails to import stops with one line naming it and its error. This module imports
nothing from msgcli but its errors, so the configuration can call it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import sys
import traceback
from pathlib import Path

from msgcli.errors import UserError

ENTRY_POINT_GROUP = "msgsnn.plugins"

_loaded: set[str] = set()  # normalised specs already imported in this process
_entry_points_loaded = False


class PluginError(UserError):
    """A plugin that cannot be found or fails to import; the message names it and its error."""

    exit_code = 2


def is_file(spec: str) -> bool:
    """Whether ``spec`` names a file (``x.py``, or any path with a slash) rather than a module (``package.module``)."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def normalise(spec: str) -> str:
    """A file as its absolute path (so the run's config works from any folder); a module name as given."""
    spec = spec.strip()
    if not spec:
        raise PluginError("plugin: an empty name; give a file (plugin.py) or a module (package.module)")
    return str(Path(spec).expanduser().resolve()) if is_file(spec) else spec


def _failure(spec: str, err: BaseException) -> PluginError:
    """One line: the plugin, where in its own code it failed (file and line, when known) and the error."""
    where = ""
    if isinstance(err, SyntaxError) and err.filename:
        where = f" ({err.filename}, line {err.lineno})"
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "importlib" not in f.filename]
        if frames:
            where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
    message = str(err).splitlines()[0] if str(err) else ""
    return PluginError(f"plugin {spec} failed to import{where}: {type(err).__name__}{': ' + message if message else ''}")


FILE_MODULE_PREFIX = "msgsnn_plugin_"


def module_name(path: str) -> str:
    """A plugin file's module name: stable per file, so a second load of the same file is the same module."""
    return f"{FILE_MODULE_PREFIX}{Path(path).stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


class PluginFileFinder(importlib.abc.MetaPathFinder):
    """Imports a plugin file's module by its name in a process that never loaded the plugin: a DataLoader
    worker started from a fork server unpickles a plugin's dataset, whose classes and functions name that
    module. The file is found in a folder on ``sys.path``, where loading the plugin put it."""

    def find_spec(self, name: str, path=None, target=None):
        if path is not None or not name.startswith(FILE_MODULE_PREFIX):
            return None
        stem = name[len(FILE_MODULE_PREFIX):].rsplit("_", 1)[0]
        for folder in sys.path:
            file = str(Path(folder or ".").resolve() / f"{stem}.py")
            if module_name(file) == name and Path(file).is_file():
                return importlib.util.spec_from_file_location(name, file)
        return None


sys.meta_path.append(PluginFileFinder())


def _import_file(path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise PluginError(f"plugin {path}: no such file")
    name = module_name(path)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if str(file.parent) not in sys.path:  # its sibling modules import, as when Python runs a script
        sys.path.append(str(file.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise _failure(path, err) from None


def _import_module(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):  # the plugin itself, not a module it imports
            raise PluginError(f"plugin {name}: no module named {err.name!r}; install it or add its folder to PYTHONPATH, "
                              f"or give the file: --plugin path/to/{name.rsplit('.', 1)[-1]}.py") from None
        raise _failure(name, err) from None
    except Exception as err:
        raise _failure(name, err) from None


def load_entry_points() -> None:
    """Import every installed package's plugin (entry-point group ``msgsnn.plugins``), once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:
            raise _failure(f"{entry.value} (entry point {entry.name!r} of {ENTRY_POINT_GROUP})", err) from None


def load(specs: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Import the installed packages' plugins, then each of ``specs`` not imported yet; returns ``specs`` normalised
    (files absolute, duplicates dropped), as the config records them."""
    load_entry_points()
    normalised = list(dict.fromkeys(normalise(spec) for spec in specs))
    for spec in normalised:
        if spec in _loaded:
            continue
        _import_file(spec) if is_file(spec) else _import_module(spec)
        _loaded.add(spec)
    return normalised
