"""Federated learning: clients, strategies (FedAvg, FedPer), secure aggregation in the loop, the simulation."""

from privfer.fl.client import FLClient, LocalTraining, LocalUpdate
from privfer.fl.simulation import Federation, RoundRecord, prepare_federation, simulate
from privfer.fl.strategies import FedAvg, FedPer, Strategy, make_strategy

__all__ = [
    "FLClient",
    "FedAvg",
    "FedPer",
    "Federation",
    "LocalTraining",
    "LocalUpdate",
    "RoundRecord",
    "Strategy",
    "make_strategy",
    "prepare_federation",
    "simulate",
]
