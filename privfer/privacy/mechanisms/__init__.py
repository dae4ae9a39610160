"""The registry of privacy mechanisms: one file each, registered by one line in ``_MODULES``.

A new mechanism is a file defining ``MECHANISM`` (a :class:`~privfer.privacy.mechanisms.base.PrivacyMechanism`),
plus its trainer under ``privfer/fl/mechanisms/``; config selection, the ledger, the audit, the Flower node and the
CLI find it here. Importing this package needs no torch.
"""

from __future__ import annotations

import importlib

from privfer.privacy.mechanisms.base import ACCOUNTINGS, UNITS, PlanInputs, PrivacyMechanism

_MODULES = (  # one line per mechanism
    "local",
    "distributed",
    "distributed_person",
)

MECHANISMS: dict[str, PrivacyMechanism] = {}
for _module in _MODULES:
    _mechanism = importlib.import_module(f"{__name__}.{_module}").MECHANISM
    if _mechanism.id in MECHANISMS or any((m.selected_by, m.unit) == (_mechanism.selected_by, _mechanism.unit)
                                          for m in MECHANISMS.values()):
        raise RuntimeError(f"two mechanisms claim the id {_mechanism.id!r} or the selection "
                           f"({_mechanism.selected_by!r}, {_mechanism.unit!r})")
    MECHANISMS[_mechanism.id] = _mechanism

SELECTORS = tuple(dict.fromkeys(m.selected_by for m in MECHANISMS.values()))  # privacy.mechanism's values


def privacy_mechanism(mechanism_id: str) -> PrivacyMechanism:
    """The registered mechanism of a ledger's ``mechanism_id`` (ValueError naming the known ones)."""
    try:
        return MECHANISMS[mechanism_id]
    except (KeyError, TypeError):
        raise ValueError(f"unknown privacy mechanism {mechanism_id!r}; known: {sorted(MECHANISMS)}") from None


def select(selected_by: str | None, unit: str) -> PrivacyMechanism | None:
    """The mechanism a config's privacy.mechanism (resolved: None without DP) and privacy.unit select; ValueError
    when no mechanism protects that unit that way."""
    if selected_by is None:
        return None
    for mechanism in MECHANISMS.values():
        if (mechanism.selected_by, mechanism.unit) == (selected_by, unit):
            return mechanism
    raise ValueError(f"no privacy mechanism protects a {unit} with privacy.mechanism {selected_by!r}; registered: "
                     + ", ".join(f"{m.selected_by}/{m.unit}" for m in MECHANISMS.values()))


def units_of(selected_by: str) -> tuple[str, ...]:
    """The units the mechanisms selected by ``selected_by`` protect."""
    return tuple(m.unit for m in MECHANISMS.values() if m.selected_by == selected_by)


__all__ = ["ACCOUNTINGS", "MECHANISMS", "SELECTORS", "UNITS", "PlanInputs", "PrivacyMechanism", "privacy_mechanism",
           "select", "units_of"]
