"""Channel dependency analysis for structured pruning (``prune.channels``).

* ``graph``: the networkx channel-space graph, pruning groups and their units,
* ``registry``: the op-handler registry (entry-point group ``compressor.op_handlers``),
* ``handlers``: the built-in handlers (importing this package registers them).
"""
from __future__ import annotations

from passes.channel_deps import handlers as _handlers  # noqa: F401  (registers the built-ins)
from passes.channel_deps.graph import Barrier, Coupling, DepGraph, Group, Param, Visit, build
from passes.channel_deps.registry import HANDLERS, lookup, register_handler

__all__ = ["Barrier", "Coupling", "DepGraph", "Group", "HANDLERS", "Param", "Visit", "build", "lookup", "register_handler"]
