"""What the Flower integration's modules share: the flwr import guard, the logger, record names, defaults."""

from __future__ import annotations

import logging
from typing import Any

from privfer.secagg.errors import SecAggError

try:
    from flwr.common import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Error,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.server import Grid
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'privfer.integrations.flower needs Flower: pip install "privfer[flower]" (flwr>=1.20,<1.42)'
    ) from exc

log = logging.getLogger("privfer.flower")

RECORD = "privfer.secagg"  # the ConfigRecord that carries privfer's protocol messages
STATE = "privfer.secagg.state"  # the node's protocol state, in Context.state (never sent)
PLAN_FIELD = "dp"  # distributed DP: the advertise_keys record field holding the round's plan (JSON)
COUNT_RECORD = "privfer.dp"  # record level: the array record of the count word the nodes append
DEFAULTS: dict[str, Any] = {"modulus_bits": 64, "clipping_range": 8.0, "max_examples": 1 << 16}


class UnprotectedMessage(SecAggError):
    """A message that must travel under secure aggregation arrived without it."""


__all__ = ["DEFAULTS", "RECORD", "STATE", "Array", "ArrayRecord", "ConfigRecord", "Context", "Error", "Grid", "Message",
           "MetricRecord", "RecordDict", "UnprotectedMessage", "log"]
