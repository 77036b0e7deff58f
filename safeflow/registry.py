"""One small registry shared by every pluggable base class.

A base class mixes in :class:`Registered` and gets ``create(name, **config)`` and
``available()``; an implementation registers itself by subclassing with a name::

    class HFExtractor(Extractor, name="hf"): ...
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound="Registered")


class Registry:
    """Maps names to implementation classes for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}

    def add(self, name: str, cls: type) -> None:
        if name in self._classes and self._classes[name] is not cls:
            raise ConfigError(
                f"{self.kind} name {name!r} is already registered to {self._classes[name].__qualname__}; "
                "choose another name for your implementation"
            )
        self._classes[name] = cls

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            valid = ", ".join(repr(n) for n in self.names()) or "(none registered yet)"
            raise ConfigError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)


class Registered:
    """Mixin giving a base class its own registry, ``create`` and ``available``."""

    registry: ClassVar[Registry]
    registered_name: ClassVar[str | None] = None

    def __init_subclass__(cls, *, name: str | None = None, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:  # a new base class: give it a fresh registry
            cls.registry = Registry(kind)
        if name is not None:
            cls.registered_name = name
            cls.registry.add(name, cls)

    @classmethod
    def create(cls: type[T], name: str, **config: Any) -> T:
        """Build the implementation registered under ``name`` with ``config`` (an argument its
        constructor does not take raises :class:`ConfigError` naming the valid ones)."""
        impl = cls.implementation(name)
        impl.check_options(config)
        return impl(**config)

    @classmethod
    def constructor_options(cls) -> list[str]:
        """The names of the arguments this class's constructor takes by keyword, in order."""
        params = inspect.signature(cls).parameters.values()
        return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` if ``options`` hold a keyword argument this class's constructor
        does not take, naming the ones it does (a constructor with ``**kwargs`` takes any)."""
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()):
            return
        valid = cls.constructor_options()
        unknown = [k for k in options if k not in valid]
        if unknown:
            what = f"{cls.registry.kind} {cls.registered_name!r}" if cls.registered_name else cls.__name__
            raise ConfigError(f"the {what} takes no option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; valid: {', '.join(valid) or '(none)'}")

    @classmethod
    def implementation(cls: type[T], name: str) -> type[T]:
        """The class registered under ``name`` (:class:`ConfigError` listing the valid names)."""
        found: type[T] = cls.registry.get(name)
        return found

    @classmethod
    def available(cls) -> list[str]:
        """Registered names, sorted."""
        return cls.registry.names()
