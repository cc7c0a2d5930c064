"""List ``phi3_v`` in transformers' Auto tables when they load, without importing transformers or torch ourselves.

``import phi3v_core`` must stay light (the planner and ``--help`` paths never load torch), yet
``import phi3v_core; AutoModelForCausalLM.from_pretrained(folder)`` must work without ``trust_remote_code``. So
``phi3v_core`` installs a small import hook. When transformers' ``configuration_auto`` / ``modeling_auto`` modules
finish loading, the hook adds ``phi3_v`` to their name tables, exactly where transformers lists its own models
(``CONFIG_MAPPING_NAMES``, ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), and points the tables' module cache at a proxy
that imports ``phi3v_core.config`` / ``phi3v_core.model`` on first lookup. Nothing is imported while transformers is
still loading (which could meet half-initialised modules); the classes load when a checkpoint asks for them. When
those modules were imported before ``phi3v_core``, the tables are filled at once.

Importing ``phi3v_core.model`` also registers through the public ``AutoConfig.register`` /
``AutoModelForCausalLM.register``, which transformers looks up first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["install"]

MODEL_TYPE = "phi3_v"
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"


class _LazyClasses(ModuleType):
    """Stands in for ``transformers.models.phi3_v``: its two class names import our modules on first access."""

    _HOMES = {"Phi3VConfig": "phi3v_core.config", "Phi3VForCausalLM": "phi3v_core.model"}

    def __getattr__(self, name: str) -> Any:
        if name not in self._HOMES:
            raise AttributeError(name)
        return getattr(importlib.import_module(self._HOMES[name]), name)


_PROXY = _LazyClasses("phi3v_core.auto_classes")


def _list_config(module: ModuleType) -> None:
    module.CONFIG_MAPPING_NAMES.setdefault(MODEL_TYPE, "Phi3VConfig")
    module.CONFIG_MAPPING._modules.setdefault(module.model_type_to_module_name(MODEL_TYPE), _PROXY)


def _list_model(module: ModuleType) -> None:
    module.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MODEL_TYPE, "Phi3VForCausalLM")
    mapping = module.MODEL_FOR_CAUSAL_LM_MAPPING
    # Built from CONFIG_MAPPING_NAMES when modeling_auto loaded, which may predate _list_config.
    mapping._reverse_config_mapping.setdefault("Phi3VConfig", MODEL_TYPE)
    mapping._modules.setdefault(MODEL_TYPE, _PROXY)


_ACTIONS: dict[str, Callable[[ModuleType], None]] = {_CONFIG_AUTO: _list_config, _MODELING_AUTO: _list_model}


class _ThenList(importlib.abc.Loader):
    """Wraps the real loader of one Auto module; fills its tables right after the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _ACTIONS[self._name](module)


class _AutoHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for the two Auto modules and wraps their loaders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _ACTIONS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenList(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Fill the tables of the Auto modules already imported and hook the others (idempotent)."""
    for name in sorted(_ACTIONS):  # configuration_auto first
        if name in sys.modules:
            _ACTIONS[name](sys.modules[name])
    if not all(name in sys.modules for name in _ACTIONS) and not any(isinstance(f, _AutoHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoHook())
