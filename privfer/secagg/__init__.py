"""Framework-agnostic secure aggregation: the server learns only the sum of the clients' updates.

Recipe (safe defaults)::

    from privfer.secagg import SecAggConfig, aggregate
    result = aggregate({1: [w1], 2: [w2], 3: [w3]}, SecAggConfig(num_clients=3), dropouts={3: "masked_input"})
    result.total, result.included      # sum over clients 1 and 2

Every backend's config is exported here and runs through the same ``aggregate`` (one
:class:`AggregationResult`): :class:`SecAggConfig` (pairwise masking), :class:`CKKSConfig` (CKKS via TenSEAL;
loaded on first use) and :class:`PlainConfig` (the plain, NOT private, baseline); :data:`BACKENDS` is their
registry (:mod:`privfer.secagg.backends`).

Primitives for deployments: :class:`SecAggClient` and :class:`SecAggServer`,
one method per protocol stage, exchanging the typed messages of
:mod:`privfer.secagg.messages` as bytes. This package imports numpy,
cryptography and pydantic only — never torch.
"""

from privfer.secagg.aggregate import STAGES, AggregationResult, aggregate
from privfer.secagg.backends import BACKENDS, Backend
from privfer.secagg.client import SecAggClient
from privfer.secagg.config import PROTOCOL_VERSION, SecAggConfig, make_config
from privfer.secagg.errors import (
    ConsistencyCheckFailed,
    CorruptState,
    DuplicateSender,
    InconsistentShares,
    InvalidCertificate,
    InvalidExampleCount,
    InvalidInput,
    InvalidRoundArguments,
    InvalidSignature,
    InvalidUpdate,
    MalformedMessage,
    MessageError,
    NotEnoughShares,
    OutOfRangeSum,
    RoundAborted,
    SecAggError,
    ShapeMismatch,
    ShareAuthenticationError,
    UnenrolledClient,
    UnknownSender,
    UnsafeUnmaskRequest,
    UnsupportedVersion,
    WrongRound,
    WrongStage,
    WrongVectorLength,
)
from privfer.secagg.identity import Enrollment, EnrollmentAuthority, Identity, RosterCertificate, enroll_in_process
from privfer.secagg.messages import decode
from privfer.secagg.payload import PayloadLayout
from privfer.secagg.quantize import ClippingReport, ClippingWarning
from privfer.secagg.server import SecAggServer, ServerTranscript

__all__ = [
    "ConsistencyCheckFailed", "Enrollment", "EnrollmentAuthority", "Identity", "InvalidCertificate",
    "InvalidSignature", "RosterCertificate", "UnenrolledClient", "enroll_in_process",
    "AggregationResult", "ClippingReport", "CorruptState", "ClippingWarning", "DuplicateSender", "InconsistentShares", "InvalidExampleCount",
    "InvalidInput", "InvalidRoundArguments", "InvalidUpdate", "MalformedMessage",
    "MessageError", "NotEnoughShares", "OutOfRangeSum", "PROTOCOL_VERSION", "PayloadLayout", "RoundAborted", "STAGES",
    "SecAggClient", "SecAggConfig", "SecAggError", "SecAggServer", "ServerTranscript", "ShapeMismatch",
    "ShareAuthenticationError", "UnknownSender", "UnsafeUnmaskRequest", "UnsupportedVersion", "WrongRound",
    "WrongStage", "WrongVectorLength", "aggregate", "decode", "make_config",
    "BACKENDS", "Backend", "CKKSConfig", "PlainConfig", "make_ckks_config",
]

_LAZY = {"CKKSConfig": "privfer.secagg.he.config", "make_ckks_config": "privfer.secagg.he.config",
         "PlainConfig": "privfer.secagg.plain"}


def __getattr__(name: str):
    """The CKKS and plain backends' configs, imported on first use (the CKKS package takes a second to load)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'privfer.secagg' has no attribute {name!r}")
