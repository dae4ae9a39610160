"""A node's lifetime privacy ledger on its own disk: every round it contributed to, across runs and restarts,
against its lifetime budget (schema ``privfer.node_ledger/1``). A round that would pass the budget is refused
before the node trains; a round's spend is written, atomically and under a lock, before its input leaves."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from privfer.config import MAX_EPSILON
from privfer.privacy.node import UNITS, BudgetExhausted, NodeLedgerError, NodePrivacy
from privfer.privacy.noise import LEGACY, NoiseFamily, NoiseSteps, noise_family
from privfer.privacy.rdp import ORDERS
from privfer.runs import atomic_write_json

LEDGER_SCHEMA = "privfer.node_ledger/1"
MAX_LEDGER_BYTES = 1 << 20  # a larger file is refused before it is read
MAX_LEDGER_ENTRIES = 1024  # distinct step mechanisms (the entry without its steps); rounds with the same plan merge into one entry,
# and the rounds of plans beyond this many are folded into one composed RDP vector ("folded")


class NodeLedger:
    """A node's lifetime privacy ledger on its own disk (schema ``privfer.node_ledger/1``, JSON)."""

    def __init__(self, policy: NodePrivacy) -> None:
        self.policy = policy
        self.path = policy.ledger.resolve()  # a symlinked ledger is written through to its target
        if not self.path.parent.is_dir():  # an unmounted disk must not read as a fresh, unspent ledger
            raise NodeLedgerError(f"privfer node ledger {policy.ledger}: its directory does not exist; refusing "
                                  "to train (create it to start a new ledger)")

    @property
    def lifetime(self) -> float:
        """The budget in force: the policy's, or the smaller one the ledger was created with (pinned)."""
        stored = self.load().get("lifetime_epsilon")
        return min(self.policy.lifetime_epsilon, float(stored)) if isinstance(stored, (int, float)) \
            else self.policy.lifetime_epsilon

    def load(self) -> dict[str, Any]:
        """The ledger (a fresh one if the file does not exist); NodeLedgerError for anything else wrong."""
        path = self.path
        if not path.exists():
            return {"schema": LEDGER_SCHEMA, "unit": self.policy.unit, "mechanism_id": UNITS[self.policy.unit].id,
                    "noise": self.policy.noise, "delta": self.policy.delta,
                    "lifetime_epsilon": self.policy.lifetime_epsilon, "rounds": 0, "epsilon": 0.0, "history": [],
                    "last": []}
        where = f"privfer node ledger {path}"
        try:
            if path.stat().st_size > MAX_LEDGER_BYTES:
                raise NodeLedgerError(f"{where} is larger than {MAX_LEDGER_BYTES} bytes; refusing to train")
            ledger = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NodeLedgerError(f"{where} cannot be read ({exc.__class__.__name__}): the node's spent budget is "
                                  "unknown, so it refuses to train until its operator restores the file") from None
        if not isinstance(ledger, dict) or ledger.get("schema") != LEDGER_SCHEMA:
            raise NodeLedgerError(f"{where} is not a {LEDGER_SCHEMA} file; refusing to train")
        if ledger.get("unit") != self.policy.unit:
            raise NodeLedgerError(f"{where} protects the unit {ledger.get('unit')!r}, this node's policy the "
                                  f"{self.policy.unit!r}; a ledger is kept for one unit")
        if ledger.get("noise", LEGACY) != self.policy.noise:  # without the field: written when it was the only one
            raise NodeLedgerError(f"{where} accounts {ledger.get('noise')!r} noise, this node's policy "
                                  f"{self.policy.noise!r}; a ledger is kept for one noise family")
        if ledger.get("delta") != self.policy.delta:
            raise NodeLedgerError(f"{where} accounts at delta {ledger.get('delta')!r}, this node's policy at "
                                  f"{self.policy.delta!r}; a ledger is kept at one delta")
        history = ledger.get("history")
        rounds = ledger.get("rounds")
        lifetime = ledger.get("lifetime_epsilon")
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime <= MAX_EPSILON:
            raise NodeLedgerError(f"{where} has no valid 'lifetime_epsilon'; refusing to train")
        if not isinstance(history, list) or len(history) > MAX_LEDGER_ENTRIES or isinstance(rounds, bool) \
                or not isinstance(rounds, int) or rounds < 0:
            raise NodeLedgerError(f"{where} has no valid 'history' (a list of at most {MAX_LEDGER_ENTRIES}) or "
                                  "'rounds'; refusing to train")
        folded = ledger.get("folded")
        if folded is not None:
            vector = folded.get("rdp") if isinstance(folded, dict) else None
            count = folded.get("rounds") if isinstance(folded, dict) else None
            if not (isinstance(folded, dict) and folded.get("orders") == list(ORDERS)
                    and isinstance(vector, list) and len(vector) == len(ORDERS)
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                            for x in vector)
                    and isinstance(count, int) and not isinstance(count, bool) and 0 < count <= rounds):
                raise NodeLedgerError(f"{where} field 'folded' is not {{'orders': this accountant's orders, 'rdp': "
                                      f"[{len(ORDERS)} finite numbers >= 0], 'rounds': its rounds}}; refusing to "
                                      "train")
        family = self.family
        for index, item in enumerate(history):
            try:
                family.parse_entry(item)
            except ValueError:
                raise NodeLedgerError(f"{where} field 'history[{index}]' is not [{', '.join(family.fields)}]; "
                                      "refusing to train") from None
        return ledger

    @property
    def family(self) -> NoiseFamily:
        return noise_family(self.policy.noise)

    def _entries(self, ledger: dict[str, Any]) -> list[NoiseSteps]:
        return [self.family.parse_entry(item) for item in ledger["history"]]

    @staticmethod
    def _folded(ledger: dict[str, Any]) -> Any:
        folded = ledger.get("folded")
        return None if folded is None else [float(x) for x in folded["rdp"]]

    def spent(self) -> float:
        """The node's epsilon so far, recomputed from its history (and folded rounds) at its delta."""
        ledger = self.load()
        return self.family.epsilon(self._entries(ledger), self.policy.delta, self._folded(ledger))[0]

    def after(self, step: NoiseSteps) -> float:
        """The node's epsilon if it took part in one more round of ``step``'s mechanism."""
        ledger = self.load()
        return self.family.epsilon([*self._entries(ledger), step], self.policy.delta, self._folded(ledger))[0]

    def check(self, step: NoiseSteps) -> float:
        """BudgetExhausted if one more round would pass the lifetime budget; else the epsilon it would leave."""
        epsilon = self.after(step)
        lifetime = self.lifetime
        if epsilon > lifetime + 1e-9:
            raise BudgetExhausted(
                f"this node has spent epsilon {self.spent():.3f} of its lifetime {lifetime:g} "
                f"(delta {self.policy.delta:g}); another round would take it to {epsilon:.3f}: refused")
        return epsilon

    def charge(self, step: NoiseSteps, round_id: str) -> float:
        """Record one round of ``step`` (atomically, under an exclusive lock so that concurrent processes cannot
        both pass the check), before the node's input is even computed; returns the new epsilon."""
        import fcntl

        with open(self.path.with_name(self.path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._charge(step, round_id)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _charge(self, step: NoiseSteps, round_id: str) -> float:
        epsilon = self.check(step)
        ledger = self.load()
        ledger["lifetime_epsilon"] = self.lifetime  # pinned: a later, larger policy does not raise it
        ledger["noise"] = self.policy.noise  # (a ledger written before the field was the legacy family's, checked)
        family = self.family
        key = family.entry_key(step)
        at = family.fields.index("steps")
        for item in ledger["history"]:
            if family.entry_key(family.parse_entry(item)) == key:
                item[at] = int(item[at]) + step.steps
                break
        else:
            if len(ledger["history"]) >= MAX_LEDGER_ENTRIES:
                # A server varying its plan by an ulp each round must not grow the file without bound: past this
                # many distinct plans, a round's RDP is added to one composed vector (exact, just not itemized).
                folded = ledger.get("folded") or {"rdp": [0.0] * len(ORDERS), "rounds": 0}
                vector = [a + b for a, b in zip(folded["rdp"], family.history_rdp([step]).tolist())]
                ledger["folded"] = {"orders": list(ORDERS), "rdp": vector, "rounds": int(folded["rounds"]) + 1}
            else:
                ledger["history"].append(family.entry(step))
        ledger["rounds"] = int(ledger["rounds"]) + 1
        ledger["epsilon"] = epsilon
        ledger["last"] = [round_id, time.time()]
        atomic_write_json(self.path, ledger)
        return epsilon


__all__ = ["LEDGER_SCHEMA", "MAX_LEDGER_BYTES", "MAX_LEDGER_ENTRIES", "NodeLedger"]
