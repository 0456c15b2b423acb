"""Registries: one per kind of extension (passes, targets, op handlers).

Built-ins register at import time; third-party packages register lazily through
Python entry points (groups ``compressor.passes``, ``compressor.targets``,
``compressor.op_handlers``); a single ``.py`` file can be loaded with
``--plugin``. A duplicate name is an error that names both providers. An entry
point that fails to load is a warning (an error with ``strict=True``).
"""
from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, Literal, TypeVar

from compressor.errors import PluginError, UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")


ProviderKind = Literal["builtin", "entry-point", "file", "runtime"]


@dataclass(frozen=True)
class Provider:
    """Where a registered pass/target/handler came from. ``builtin``: shipped with compressor (a failure in
    it is a pass error, exit 1); anything else is a plugin (a failure is a plugin error, exit 2)."""
    kind: ProviderKind
    where: str = ""  # the module (builtin), "module:attr (dist)" (entry-point), the path (file)

    @property
    def builtin(self) -> bool:
        return self.kind == "builtin"

    def __str__(self) -> str:
        return {"builtin": f"builtin:{self.where}", "file": f"file:{self.where}",
                "entry-point": f"entry-point {self.where}"}.get(self.kind, self.where)

    @classmethod
    def of(cls, value: "Provider | str") -> "Provider":
        """``value`` as a Provider; a string is a plugin's own label (``runtime``) unless it says otherwise:
        ``builtin:MODULE``, ``file:PATH``."""
        if isinstance(value, Provider):
            return value
        if value.startswith("builtin:"):
            return cls("builtin", value.removeprefix("builtin:"))
        if value.startswith("file:"):
            return cls("file", value.removeprefix("file:"))
        return cls("runtime", value)


def builtin(module: str) -> Provider:
    return Provider("builtin", module)


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    provider: Provider


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str, check: Callable[[T], None] | None = None):
        """``check``: the contract every registered object must meet (raises PluginError otherwise)."""
        self.kind = kind
        self.check = check
        self.group = entry_point_group
        self._entries: dict[str, Entry[T]] = {}
        self._entry_points_loaded = False
        self.warnings: list[str] = []

    def register(self, name: str, obj: T, provider: Provider | str) -> None:
        provider = Provider.of(provider)
        if name in self._entries:
            other = self._entries[name]
            if other.obj is obj:
                return
            raise PluginError(
                f"duplicate {self.kind} name {name!r}: provided by {other.provider} and by {provider}"
            )
        if self.check is not None:
            self.check(obj)
        self._entries[name] = Entry(name, obj, provider)

    def load_entry_points(self, strict: bool = False) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            provider = Provider("entry-point", f"{ep.value} ({dist.name if dist else 'unknown dist'})")
            try:
                obj = ep.load()
            except Exception as exc:  # plugin code may raise anything
                msg = f"{self.kind} plugin {ep.name!r} from {provider} failed to load: {type(exc).__name__}: {exc}"
                if strict:
                    raise PluginError(msg) from exc
                log.warning(msg)
                self.warnings.append(msg)
                continue
            try:
                self.register(getattr(obj, "name", ep.name), obj, provider)
            except PluginError as exc:
                if strict:
                    raise
                msg = f"{self.kind} plugin {ep.name!r} from {provider} not registered: {exc}"
                log.warning(msg)
                self.warnings.append(msg)

    def get(self, name: str) -> T:
        self.load_entry_points()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            plural = self.kind + ("es" if self.kind.endswith("s") else "s")
            raise UsageError(f"unknown {self.kind} {name!r}", hint=f"known {plural}: {known}")
        return self._entries[name].obj

    def entry(self, name: str) -> Entry[T]:
        self.get(name)
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self.load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        self.load_entry_points()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def unregister(self, name: str) -> None:
        """For tests and for unloading a --plugin file."""
        self._entries.pop(name, None)
