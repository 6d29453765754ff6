"""Pipelines kept loaded in a worker: an LRU under a memory budget, sharing modules via ``from_pipe``.

A worker holds one ``ResidentPipelines`` in ``PipelineContext.shared["resident"]`` so every feature
on that device reuses the same base models. A derived entry (``derive``) is built from a resident
base with diffusers' ``from_pipe``: it shares the base's modules, costs no extra memory and goes
when its base goes.
"""
from __future__ import annotations

import gc
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")
SHARED_KEY = "resident"  # where a worker keeps its ResidentPipelines in PipelineContext.shared


def modules_of(obj: Any) -> list[nn.Module]:
    """Return the torch modules an entry holds (its own ``resident_modules()``, a pipeline's components)."""
    if hasattr(obj, "resident_modules"):
        return list(obj.resident_modules())
    if isinstance(obj, nn.Module):
        return [obj]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [m for m in components.values() if isinstance(m, nn.Module)]
    return []


def _storages(modules: Iterable[nn.Module]) -> dict[int, int]:
    """Map each distinct tensor storage of the modules to its size in bytes."""
    sizes: dict[int, int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sizes


def resident_bytes_of(objs: Iterable[Any]) -> int:
    """Return the bytes the objects' tensors occupy, each shared storage counted once."""
    return sum(_storages(m for obj in objs for m in modules_of(obj)).values())


@dataclass
class _Entry:
    value: Any
    base: str | None = None
    derived: set[str] = field(default_factory=set)


class ResidentPipelines:
    """An LRU of loaded pipelines; least recently used bases go first when over the budget."""

    def __init__(self, budget_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes  # 0: no limit
        self.loads: Counter[str] = Counter()  # builds per key, so callers can prove reuse
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """Return the resident keys, least recently used first."""
        return list(self._entries)

    def get(self, key: str, build: Callable[[], T]) -> T:
        """Return the resident value for key, building (and maybe evicting others) when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                log.info("loading resident pipeline %s", key)
                entry = _Entry(build())
                self.loads[key] += 1
                self._entries[key] = entry
                self._enforce_budget(keep=key)
            self._touch(key)
            return entry.value

    def derive(self, key: str, base_key: str, make: Callable[[Any], T]) -> T:
        """Return a pipeline made from the resident base (``Cls.from_pipe(base)``), sharing its modules."""
        with self._lock:
            base = self._entries.get(base_key)
            if base is None:
                raise KeyError(f"base pipeline {base_key!r} is not resident")
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(make(base.value), base=base_key)
                self.loads[key] += 1
                base.derived.add(key)
                self._entries[key] = entry
            self._touch(key)
            return entry.value

    def peek(self, key: str) -> Any | None:
        """Return the resident value for key without marking it used."""
        entry = self._entries.get(key)
        return entry.value if entry else None

    def evict(self, key: str) -> None:
        """Drop key (and whatever was derived from it) and free its memory."""
        with self._lock:
            self._drop(key)
            _free_memory()

    def clear(self) -> None:
        """Drop every resident pipeline."""
        with self._lock:
            self._entries.clear()
            _free_memory()

    def resident_bytes(self) -> int:
        """Return the bytes held by resident pipelines, shared modules counted once."""
        return resident_bytes_of(e.value for e in self._entries.values())

    def _touch(self, key: str) -> None:
        entry = self._entries[key]
        self._entries.move_to_end(key)
        if entry.base is not None:
            self._entries.move_to_end(entry.base)  # using a derived pipeline uses its base
            self._entries.move_to_end(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for child in list(entry.derived):
            self._drop(child)
        if entry.base is not None and entry.base in self._entries:
            self._entries[entry.base].derived.discard(key)
        log.info("evicted resident pipeline %s", key)

    def _enforce_budget(self, keep: str) -> None:
        if not self.budget_bytes:
            return
        while self.resident_bytes() > self.budget_bytes:
            victims = [k for k, e in self._entries.items() if k != keep and e.base is None]
            if not victims:
                log.warning("pipeline %s alone exceeds the memory budget of %d bytes", keep, self.budget_bytes)
                return
            self._drop(victims[0])
            _free_memory()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
