"""Exceptions of the secure-aggregation protocol: one type per way a round can go wrong.

Every malformed or out-of-place message raises a specific subclass of
:class:`MessageError`; a round that cannot finish safely raises
:class:`RoundAborted`. A caller's own invalid input (an update of the wrong
shape or type, a non-finite value, an example count that is not a
non-negative integer, an empty round) raises a subclass of
:class:`InvalidInput` *before* anything is sent or any state changes, so the
client can be given a corrected input. None of them carries secret material
in its text.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-aggregation failure."""


class MessageError(SecAggError, ValueError):
    """A protocol message is invalid; the subclass says how."""


class MalformedMessage(MessageError):
    """The bytes do not decode as a message of the expected kind (truncated, bad magic, bad lengths)."""


class UnsupportedVersion(MessageError):
    """The message speaks another protocol version."""


class WrongRound(MessageError):
    """The message belongs to another round (a replay or a cross-round message)."""


class WrongStage(MessageError):
    """The message arrives at a stage where it is not expected, or a stage is repeated."""


class UnknownSender(MessageError):
    """The sender (or a referenced client) is not a participant of this stage."""


class DuplicateSender(MessageError):
    """The same client sent this stage's message twice, or a list names a client twice."""


class WrongVectorLength(MessageError):
    """A masked vector (or a share) does not have the agreed length."""


class InvalidInput(SecAggError, ValueError):
    """The caller's own input is invalid; nothing was sent and the client's state is unchanged."""


class ShapeMismatch(InvalidInput):
    """An update's arrays do not match the agreed shapes (or their number)."""


class InvalidUpdate(InvalidInput):
    """An update holds values that cannot be summed as claimed: NaN or infinity, complex, boolean, text or
    object values, or floats where the integer encoding expects integers (nothing is truncated or dropped)."""


class InvalidExampleCount(InvalidInput):
    """An example count that is not an integer in the allowed range (a float such as 2.7, a bool, a negative)."""


class InvalidRoundArguments(InvalidInput):
    """The recipe's arguments do not describe a round: no updates, more than num_clients, bad client ids,
    dropouts of unknown clients or stages."""


class ShareAuthenticationError(SecAggError):
    """An encrypted share failed AES-GCM authentication: tampered, misrouted, or from another round."""


class UnsafeUnmaskRequest(SecAggError):
    """A client refuses an unmask request that could reveal an individual input."""


class RoundAborted(SecAggError):
    """Too few clients remain for the threshold; no partial sum is ever produced."""


class NotEnoughShares(SecAggError):
    """Fewer than the threshold of Shamir shares were given for a reconstruction."""


class InconsistentShares(SecAggError):
    """Shares disagree with their dealer's commitments, or reconstruct a secret other than the committed one.

    ``senders`` names the clients at fault: the holders whose returned shares do not match what their dealer
    committed to, or the dealer whose shares are inconsistent. A round that cannot reconstruct every secret from
    shares that verify aborts with it; a round with enough verified shares left completes, exactly.
    """

    def __init__(self, message: str, senders: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.senders = tuple(sorted(senders))


class CorruptState(SecAggError):
    """A saved client state does not restore: wrong magic or version, missing or malformed fields."""


class InvalidSignature(MessageError):
    """A signature does not verify: a key advertisement or a consistency statement not signed by the enrolled
    member it names (forged, altered, or made for another round or study)."""


class UnenrolledClient(MessageError):
    """A roster entry, sender or signer that the enrollment authority's certificate does not list (a sybil the
    server made up), or listed with another key."""


class InvalidCertificate(SecAggError):
    """A roster certificate that is malformed, not signed by the pinned enrollment authority, for another study,
    or outside its validity period."""


class ConsistencyCheckFailed(SecAggError):
    """Too few enrolled members signed exactly this client's statement (round, roster, survivors, model and plan
    digest): the server showed clients different views, or gave them different models; the client reveals no
    share. ``disagreeing`` names the members whose forwarded signatures do not verify on this client's statement
    (they signed another one, or the server altered them)."""

    def __init__(self, message: str, disagreeing: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.disagreeing = tuple(sorted(disagreeing))


class OutOfRangeSum(SecAggError):
    """The unmasked sum holds a coordinate, count or metric that the included clients could not have produced had
    each sent an in-range input (a client sent a forged or out-of-range one): the round is refused, nothing is
    released. The bound is on the sum: one client may still use the headroom of all the included ones, and an
    in-range wrong input cannot be told from an honest one without zero-knowledge proofs."""
