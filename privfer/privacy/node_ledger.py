"""A node's lifetime privacy ledger on its own disk: every round it contributed to, across runs and restarts,
against its lifetime budget (schema ``privfer.node_ledger/1``, the typed
:class:`~privfer.privacy.ledger.node.NodeLedgerRecord`, validated when read and before it is written). A round
that would pass the budget is refused before the node trains; a round's spend is written, atomically and under a
lock, before its input leaves."""

from __future__ import annotations

import time

from privfer.privacy.ledger.node import (MAX_NODE_ENTRIES, NODE_SCHEMA, NodeLedgerRecord, UnreadableLedger,
                                         fresh_node_ledger, node_ledger_from, parse_node_ledger)
from privfer.privacy.node import UNITS, BudgetExhausted, NodeLedgerError, NodePrivacy
from privfer.privacy.noise import NoiseFamily, NoiseSteps, noise_family
from privfer.privacy.rdp import ORDERS
from privfer.runs import atomic_write_json

LEDGER_SCHEMA = NODE_SCHEMA
MAX_LEDGER_BYTES = 1 << 20  # a larger file is refused before it is read
MAX_LEDGER_ENTRIES = MAX_NODE_ENTRIES  # distinct step mechanisms (the entry without its steps); rounds with the same plan merge into one entry,
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
        return min(self.policy.lifetime_epsilon, float(self.load().lifetime_epsilon))

    def load(self) -> NodeLedgerRecord:
        """The ledger, validated (a fresh one if the file does not exist); NodeLedgerError naming the file and the
        field for anything else wrong, or for a ledger of another unit, noise family or delta than the policy's."""
        path, policy = self.path, self.policy
        where = f"privfer node ledger {path}"
        if not path.exists():
            try:
                return fresh_node_ledger(policy.unit, UNITS[policy.unit].id, policy.noise, policy.delta,
                                         policy.lifetime_epsilon)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise NodeLedgerError(f"{where}: this node's policy makes no valid ledger ({exc.__class__.__name__})"
                                      ) from None
        try:
            if path.stat().st_size > MAX_LEDGER_BYTES:
                raise NodeLedgerError(f"{where} is larger than {MAX_LEDGER_BYTES} bytes; refusing to train")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise NodeLedgerError(f"{where} cannot be read ({exc.__class__.__name__}): the node's spent budget is "
                                  "unknown, so it refuses to train until its operator restores the file") from None
        try:
            ledger = parse_node_ledger(text, where)
        except UnreadableLedger as exc:
            raise NodeLedgerError(f"{exc}: the node's spent budget is unknown, so it refuses to train until its "
                                  "operator restores the file") from None
        except ValueError as exc:
            raise NodeLedgerError(f"{exc}; refusing to train") from None
        if ledger.unit != policy.unit:
            raise NodeLedgerError(f"{where} protects the unit {ledger.unit!r}, this node's policy the "
                                  f"{policy.unit!r}; a ledger is kept for one unit")
        if ledger.noise != policy.noise:  # without the field: written when it was the only one
            raise NodeLedgerError(f"{where} accounts {ledger.noise!r} noise, this node's policy "
                                  f"{policy.noise!r}; a ledger is kept for one noise family")
        if ledger.delta != policy.delta:
            raise NodeLedgerError(f"{where} accounts at delta {ledger.delta!r}, this node's policy at "
                                  f"{policy.delta!r}; a ledger is kept at one delta")
        return ledger

    @property
    def family(self) -> NoiseFamily:
        return noise_family(self.policy.noise)

    def spent(self) -> float:
        """The node's epsilon so far, recomputed from its history (and folded rounds) at its delta."""
        ledger = self.load()
        return self._epsilon(ledger, ledger.entries())

    def after(self, step: NoiseSteps) -> float:
        """The node's epsilon if it took part in one more round of ``step``'s mechanism."""
        ledger = self.load()
        return self._epsilon(ledger, [*ledger.entries(), step])

    def _epsilon(self, ledger: NodeLedgerRecord, entries: list[NoiseSteps]) -> float:
        """The family's epsilon of ``entries`` (and the folded rounds) at the policy's delta; an arithmetic failure
        (a damaged file's numbers) refuses to train instead of raising past the node."""
        try:
            return self.family.epsilon(entries, self.policy.delta, ledger.folded_rdp())[0]
        except (ArithmeticError, ValueError) as exc:  # OverflowError, FloatingPointError, math domain errors
            raise NodeLedgerError(f"privfer node ledger {self.path}: its history cannot be accounted "
                                  f"({exc.__class__.__name__}); refusing to train") from None

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
        ledger = self.load().document()
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
        try:
            record = node_ledger_from(ledger, f"privfer node ledger {self.path}")
        except ValueError as exc:  # e.g. a round id no ledger can hold: refuse the round, keep the file as it was
            raise NodeLedgerError(f"{exc}; the round is refused and the ledger is unchanged") from None
        atomic_write_json(self.path, record.document())
        return epsilon


__all__ = ["LEDGER_SCHEMA", "MAX_LEDGER_BYTES", "MAX_LEDGER_ENTRIES", "NodeLedger"]
