"""The registry of generators the Train page lists and the CLI accepts by name."""

from __future__ import annotations

from engine.generators.base import Generator

REGISTRY: dict[str, type[Generator]] = {}


def register(cls: type[Generator]) -> type[Generator]:
    """Class decorator: add a generator to the registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


# The registry (and the Train page) lists the built-in generators in this order.
BUILTIN_MODULES = ("engine.generators.mock_generator", "engine.generators.dp_nmf",
                   "engine.generators.cae", "engine.generators.diffusion",
                   "engine.generators.bayes_nb")


def _load_builtin() -> None:
    # Importing a generator module registers it; kept lazy so importing the registry is cheap.
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def list_generators() -> list[type[Generator]]:
    """Return every registered generator class: the built-in ones in the order of
    :data:`BUILTIN_MODULES` (whatever imported them first), then others as registered."""
    _load_builtin()
    rank = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    ordered = sorted(enumerate(REGISTRY.values()),
                     key=lambda item: (rank.get(item[1].__module__, len(rank)), item[0]))
    return [cls for _, cls in ordered]


def get_generator(name: str) -> type[Generator]:
    """Return the generator class called ``name``; ValueError listing the known names."""
    _load_builtin()
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"Unknown generator {name!r}; known generators: {known}.") from None
