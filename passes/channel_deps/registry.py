"""Registry of channel op-handlers, keyed by ONNX op type and opset range.

A handler is a stateless object with

  * ``name`` (unique registry key), ``ops`` (op types), ``opsets`` ((min, max) of the default-domain opset),
    ``domain`` (``""`` for the default domain),
  * ``visit(node, space, view) -> Visit``: the couplings from ``space`` (a (tensor, axis) channel space of one
    of the node's inputs or outputs) to the node's other spaces, and the constant inputs that hold slices of
    ``space``; raise ``Barrier(reason)`` when channels cannot pass on that axis,
  * optional ``seeds(node, view) -> list[Space]``: output-channel spaces created by a constant weight,
  * optional ``fix(node, removed, new_shape, view) -> None``: rewrite attributes or shape constants
    (Conv ``group``, Reshape target shape, Slice starts/ends, Split sizes) after channels are removed.

Built-ins live in ``passes.channel_deps.handlers``; plugins register through the entry-point group
``compressor.op_handlers`` (the entry point names a handler object or class) or ``register_handler``.
"""
from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs

from compressor.registry import Registry

HANDLERS: Registry[Any] = Registry("op handler", "compressor.op_handlers")


def register_handler(handler: Any, provider: str = "runtime") -> None:
    h = handler() if isinstance(handler, type) else handler
    HANDLERS.register(h.name, h, provider)


def lookup(node: gs.Node, opset: int) -> Any | None:
    """The handler for ``node`` under ``opset``; None when there is none (a barrier)."""
    domain = node.domain or ""
    for entry in HANDLERS:
        h = entry.obj if not isinstance(entry.obj, type) else entry.obj()
        lo, hi = getattr(h, "opsets", (1, 10**6))
        if node.op in h.ops and getattr(h, "domain", "") in (domain, "ai.onnx" if domain == "" else domain) and lo <= opset <= hi:
            return h
    return None
