"""Lazy public names for a package: `__getattr__ = lazy_getattr(__name__, {name: module})`.

A package lists its public names with the module that defines each; a name is imported on first use, so importing
the package (and the CLI's start-up) stays cheap."""

from importlib import import_module


def lazy_getattr(package: str, attrs: dict[str, str], modules: frozenset[str] = frozenset()):
    """The module-level `__getattr__` (PEP 562) of `package`: `attrs` maps a name to its defining module;
    `modules` are subpackages returned as modules."""

    def __getattr__(name: str):
        if name in attrs:
            return getattr(import_module(attrs[name]), name)
        if name in modules:
            return import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
