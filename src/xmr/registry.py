"""One small lazy registry: a name -> "module:Attribute" table per kind (methods, dataset formats, index
backends, task kinds).

Entries are import paths, not objects, so `import xmr` stays light and a method's heavy dependencies load
only when that method is used. A name can be registered once per kind: a second registration of the same
name raises (two plug-ins must not silently shadow each other).

    >>> METHODS.register("mymethod", "mypackage.method:MyMethod")
    >>> METHODS.get("mymethod")          # imports mypackage.method, returns MyMethod
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from xmr.errors import ConfigError


class Registry:
    """Names of one kind of plug-in, each bound to a lazily imported "module:Attribute"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}

    def register(self, name: str, target: str) -> None:
        """Bind `name` to `target` ("package.module:Attribute"); a name already taken raises ValueError."""
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target {target!r} must look like 'package.module:Attribute'")
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is already registered (as {self._targets[name]})")
        self._targets[name] = target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def get(self, name: str) -> Any:
        """The registered object; an unknown name raises ConfigError with the closest known name."""
        if name not in self._targets:
            close = difflib.get_close_matches(str(name), self._targets, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")
        if name not in self._loaded:
            module_name, attribute = self._targets[name].split(":", 1)
            self._loaded[name] = getattr(importlib.import_module(module_name), attribute)
        return self._loaded[name]


METHODS = Registry("method")
FORMATS = Registry("dataset format")
INDEX_BACKENDS = Registry("index backend")
TASKS = Registry("task kind")

METHODS.register("irra", "xmr.methods.irra:IRRA")
METHODS.register("mmref", "xmr.methods.mmref:MMRef")

FORMATS.register("cuhk_pedes", "xmr.data.formats.cuhk_pedes:read")
FORMATS.register("icfg_pedes", "xmr.data.formats.icfg_pedes:read")
FORMATS.register("rstpreid", "xmr.data.formats.rstpreid:read")
FORMATS.register("folder", "xmr.data.formats.folder:read")
FORMATS.register("cub", "xmr.data.formats.cub:read")
FORMATS.register("flowers102", "xmr.data.formats.flowers102:read")

INDEX_BACKENDS.register("faiss", "xmr.index.faiss_index:FaissIndex")
INDEX_BACKENDS.register("milvus", "xmr.index.milvus_index:MilvusIndex")

TASKS.register("person", "xmr.evaluation.tasks:PersonTask")
TASKS.register("image_text", "xmr.evaluation.tasks:ImageTextTask")
TASKS.register("composed", "xmr.evaluation.tasks:ComposedTask")
