"""Build objects from stored configs without running code: only registered classes, only plain values.

A checkpoint or an exported ``config.json`` is data written by someone else. Handing its config to
Hydra's ``instantiate`` would call whatever ``_target_`` it names (``builtins.exec``, ``torch.load``
with ``weights_only: false``, ...), so loading a model or a dataset goes through :func:`build`
instead, which

* looks ``_target_`` up in a registry (:data:`MIXERS`, :data:`DATASETS`) — nothing is imported by name;
* accepts only the keys the class's ``__init__`` declares, so a misspelt option fails here, naming it;
* accepts only plain values (None, bool, int, float, str and lists/mappings of them); a nested
  mapping with a ``_target_`` (or any ``_``-prefixed key) is refused.

Every refusal is a :class:`UnsafeConfigError` whose one-line message names the key. A new mixer or
datamodule registers itself with :func:`register_mixer` / :func:`register_dataset` (docs/architecture.md).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

from serengeti.errors import UnsafeConfigError

#: Hydra keys that carry no constructor argument. ``_partial_`` is how configs mark a mixer factory.
_HYDRA_FLAGS = {"_target_", "_partial_", "_convert_"}
_PLAIN_SCALARS = (type(None), bool, int, float, str)

MIXERS: dict[str, type] = {}
DATASETS: dict[str, type] = {}


#: module paths a stored config may still name after a module moved: {current module: former modules}
FORMER_MODULES: dict[str, tuple[str, ...]] = {"serengeti.data.text": ("serengeti.data.lm",)}


def _register(registry: dict[str, type], cls: type) -> type:
    """``cls`` under its module path, its package's re-export and its modules' former paths."""
    public = cls.__module__.rsplit(".", 1)[0]  # serengeti.mixers.hyena.Hyena is also serengeti.mixers.Hyena
    modules = (cls.__module__, public, *FORMER_MODULES.get(cls.__module__, ()))
    for module in modules:
        registry[f"{module}.{cls.__qualname__}"] = cls
    return cls


def register_mixer(cls: type) -> type:
    """Allow ``cls`` as ``model.mixer._target_`` (by its module path and re-export)."""
    return _register(MIXERS, cls)


def register_dataset(cls: type) -> type:
    """Allow ``cls`` as ``dataset._target_`` (by its module path and re-export)."""
    return _register(DATASETS, cls)


def check_plain(value: Any, key: str) -> None:
    """Raise :class:`UnsafeConfigError` unless ``value`` is built from plain scalars, lists and mappings
    whose keys are strings not starting with ``_``."""
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{key}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("_"):
                raise UnsafeConfigError(f"{key}.{k}: only plain options are allowed here, not {k!r} "
                                        "(stored configs cannot name callables)")
            check_plain(v, f"{key}.{k}")
        return
    raise UnsafeConfigError(f"{key}: expected a number, string, bool, list or mapping, got {type(value).__name__}")


def accepted_options(cls: type) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts; ``None`` = any.

    ``**kwargs`` are followed to the class named by ``kwargs_class`` (a class attribute, e.g.
    HyenaS5 passes them to S5), else up the class hierarchy.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
        forwarded = klass.__dict__.get("kwargs_class")
        if forwarded is not None:
            inner = accepted_options(forwarded)
            return None if inner is None else names | inner
    return None


def check_options(cls: type, options: Mapping[str, Any], key: str, exclude: set[str] = frozenset()) -> None:
    """Every option is a plain value and a keyword of ``cls`` (bar ``exclude``, which the caller supplies)."""
    allowed = accepted_options(cls)
    for name, value in options.items():
        if name in exclude or (allowed is not None and name not in allowed):
            known = ", ".join(sorted((allowed or set()) - set(exclude)))
            raise UnsafeConfigError(f"{key}.{name}: {cls.__name__} has no option {name!r} (options: {known})")
        check_plain(value, f"{key}.{name}")


def build(cfg: Mapping[str, Any], registry: Mapping[str, type], key: str, *, exclude: set[str] = frozenset(),
          require_partial: bool = False, **extra: Any) -> Any:
    """Construct ``registry[cfg["_target_"]](**options, **extra)`` after checking every option.

    With ``_partial_: true`` returns a ``functools.partial`` (the mixer factories). ``exclude`` names
    keywords the caller passes itself (``d_model``, ``layer_idx`` ... for mixers), which a stored
    config may not set; ``require_partial`` refuses a config without ``_partial_: true``.
    """
    if not isinstance(cfg, Mapping):
        raise UnsafeConfigError(f"{key}: expected a mapping with a _target_, got {type(cfg).__name__}")
    target = cfg.get("_target_")
    if not isinstance(target, str) or target not in registry:
        known = ", ".join(sorted({f"{c.__module__.rsplit('.', 1)[0]}.{c.__qualname__}" for c in registry.values()}))
        raise UnsafeConfigError(f"{key}._target_: {target!r} is not a registered class (registered: {known})")
    bad_flags = [k for k in cfg if k.startswith("_") and k not in _HYDRA_FLAGS]
    if bad_flags:
        raise UnsafeConfigError(f"{key}.{bad_flags[0]}: not allowed in a stored config")
    if require_partial and cfg.get("_partial_") is not True:
        raise UnsafeConfigError(f"{key}._partial_: must be true (a factory is built here, called later)")
    cls = registry[target]
    options = {k: v for k, v in cfg.items() if not k.startswith("_")}
    check_options(cls, options, key, exclude)
    if cfg.get("_partial_", False):
        return functools.partial(cls, **options, **extra)
    return cls(**options, **extra)

