"""The noise families of distributed DP, by name: the registry ``privacy.noise`` and the ledger's ``noise`` read.

A new family is one file defining a :class:`~privfer.privacy.noise.base.NoiseFamily`
subclass and one line in :data:`_MODULES`; nothing else in privfer names a family
(the config validates against :func:`names`, plans and ledgers carry the name,
the audit and a Flower node look the family up here).
"""

from __future__ import annotations

import importlib

from privfer.privacy.noise.base import TAIL_FAILURE, NoiseFamily, NoiseSteps

_MODULES = (  # one line per family; the first is the default
    "skellam",
    "discrete_gaussian",
)

FAMILIES: dict[str, NoiseFamily] = {}
for _module in _MODULES:
    _loaded = importlib.import_module(f"{__name__}.{_module}")
    for _family in _loaded.__all__:
        _instance = getattr(_loaded, _family)()
        FAMILIES[_instance.name] = _instance

DEFAULT = next(iter(FAMILIES))
LEGACY = "skellam"  # the family of every distributed ledger written before the 'noise' field existed (pinned)


def names() -> list[str]:
    return list(FAMILIES)


def noise_family(name: str) -> NoiseFamily:
    """The family called ``name``; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown noise family {name!r}; known: {', '.join(FAMILIES)}") from None


__all__ = ["DEFAULT", "FAMILIES", "LEGACY", "NoiseFamily", "NoiseSteps", "TAIL_FAILURE", "names", "noise_family"]
