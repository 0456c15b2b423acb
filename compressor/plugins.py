"""Loading a user's plugin from a single ``.py`` file (``--plugin path.py``).

Every ``Pass`` subclass with a ``name`` and every ``Target`` subclass with a
``name`` defined in the file is registered, with the provider ``file:PATH``.
Plugin packages use entry points instead (see registry.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from compressor.errors import PluginError, UsageError
from compressor.pass_base import Pass
from compressor.registry import Provider


def load_plugin_file(path: Path) -> list[str]:
    """Import ``path`` and register what it defines; returns the registered names."""
    from passes import PASSES
    from targets import TARGETS
    from targets.base import Target

    if not path.is_file() or path.suffix != ".py":
        raise UsageError(f"plugin file not found or not a .py file: {path}")
    # a stable name (not hash(): salted per process): the compile child (compressor.isolated)
    # loads the same file and must find the plugin's classes under the same module name
    mod_name = f"compressor_plugin_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    if mod_name in sys.modules and getattr(sys.modules[mod_name], "__file__", None) == str(path):
        module = sys.modules[mod_name]
        return [n for n, obj in inspect.getmembers(module, inspect.isclass)
                if obj.__module__ == mod_name and getattr(obj, "name", "")]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise PluginError(f"plugin {path} raised while loading: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
    names = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if obj.__module__ != mod_name or not getattr(obj, "name", ""):
            continue
        if issubclass(obj, Pass):
            PASSES.register(obj.name, obj, Provider("file", str(path)))
            names.append(obj.name)
        elif issubclass(obj, Target):
            TARGETS.register(obj.name, obj(), Provider("file", str(path)))
            names.append(obj.name)
    if not names:
        raise PluginError(f"plugin {path} defines no Pass or Target subclass with a name")
    return names
