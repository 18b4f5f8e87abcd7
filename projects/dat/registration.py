"""Adding our classes to mmengine's root registries: a name is added, never taken over."""

from typing import Any

from mmengine.registry import Registry


def is_reloaded(registered: Any, cls: type) -> bool:
    """Whether ``registered`` is ``cls`` from an earlier execution of the module that defines it
    (``importlib.reload``): another object with the same module and qualified name.

    Args:
        registered (Any): What a registry holds under ``cls``'s name, or None.
        cls (type): The class about to be registered.
    """
    return (
        registered is not None
        and registered is not cls
        and (registered.__module__, registered.__qualname__) == (cls.__module__, cls.__qualname__)
    )


def register_class(registry: Registry, cls: type) -> type:
    """Register ``cls`` under its name, replacing only its own earlier import (a reload).

    Args:
        registry (Registry): An mmengine registry (``MODELS``, ``HOOKS``, ``RUNNERS``, ...).
        cls (type): The class.

    Returns:
        type: ``cls``.

    Raises:
        KeyError: Where another class holds the name (mmengine's message).
    """
    registered = registry.module_dict.get(cls.__name__)
    if registered is not cls:
        registry.register_module(module=cls, force=is_reloaded(registered, cls))
    return cls
