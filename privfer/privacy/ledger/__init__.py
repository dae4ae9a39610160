"""The privacy ledger of a run: per client, everything needed to recompute its epsilon without privfer.

Schema ``privfer.privacy_ledger/2`` (documented in docs/privacy-accounting.md;
``/1`` ledgers are ``local`` ledgers without the ``mechanism_id`` field). A
ledger is a typed, validated model — one per accounting, each with its own
entry type:

* :class:`OpacusLedger` (:mod:`.opacus`): local DP-SGD, and runs without DP;
  an entry holds the client's Opacus history.
* :class:`SecureSumLedger` (:mod:`.secure_sum`): the noise in the secure sum,
  record or person level; each phase's plan, and per entry the history in its
  noise family's fields.

:mod:`.document` is the one module that reads and writes them
(:func:`read_ledger`, :func:`parse_ledger`, :func:`write_ledger`); the
trainers keep :mod:`.accounts` while a run trains. A client's history
composes every round it took part in, so its epsilon is its spend over the
whole run.
"""

from __future__ import annotations

from privfer.privacy.ledger.accounts import ClientAccount, DistributedAccount, History, account_from_state
from privfer.privacy.ledger.base import (LEGACY_SCHEMAS, MAX_CLIENTS, MAX_HISTORY, MAX_LEDGER_BYTES, SCHEMA,
                                         LedgerBase, LedgerError)
from privfer.privacy.ledger.document import (LEDGER_FILE, LOCAL, MODELS, Ledger, ledger_file, mechanism_of, parse_ledger, read_ledger, write_ledger)
from privfer.privacy.ledger.opacus import OpacusEntry, OpacusLedger, build_ledger
from privfer.privacy.ledger.secure_sum import PhasePlan, SecureSumLedger, SumEntry, build_distributed_ledger

__all__ = ["LEDGER_FILE", "LEGACY_SCHEMAS", "LOCAL", "MAX_CLIENTS", "MAX_HISTORY", "MAX_LEDGER_BYTES", "MODELS",
           "SCHEMA", "ClientAccount", "DistributedAccount", "History", "Ledger", "LedgerBase", "LedgerError",
           "OpacusEntry", "OpacusLedger", "PhasePlan", "SecureSumLedger", "SumEntry", "account_from_state",
           "build_distributed_ledger", "build_ledger", "ledger_file", "mechanism_of",
           "parse_ledger", "read_ledger", "write_ledger"]
