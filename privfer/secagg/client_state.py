"""A secure-aggregation client's state as bytes, for frameworks that run each protocol stage in a fresh process.

:func:`export_state` writes the client's whole protocol state (the round's
private keys, the self-mask seed, the Shamir shares it holds for its peers,
the roster it saw and the unmask request it signed); :func:`restore` rebuilds
the client and re-checks what it can (lengths, the group within the roster,
the signed request against the state), raising :class:`CorruptState` that
names the field and never its (secret) value. Keep the bytes where the client
keeps its keys, never send or log them, and drop them when the round ends.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING

from privfer.secagg import shamir
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import CorruptState, InvalidInput, WrongStage
from privfer.secagg.identity import Enrollment
from privfer.secagg.idsets import check_runs, in_runs
from privfer.secagg.keys import KEY_BYTES, KeyPairs, private_bytes
from privfer.secagg.messages import decode
from privfer.secagg.payload import PayloadLayout
from privfer.secagg.prg import SEED_BYTES
from privfer.secagg.randomness import SYSTEM, Randomness
from privfer.secagg.statements import CONTEXT_BYTES

if TYPE_CHECKING:
    from privfer.secagg.client import SecAggClient

STAGES = ("new", "advertised", "shared", "masked", "signed", "unmasked")
STATE_MAGIC = b"PFSC"
STATE_VERSION = 3  # 2: the roster's ids (members); 3: roster digest, context, the signed unmask request


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64decode(text: str, length: int | None) -> bytes:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if length is not None and len(raw) != length:
        raise ValueError(f"{len(raw)} bytes, expected {length}")
    return raw


def export_state(client: "SecAggClient") -> bytes:
    """The client's whole protocol state as bytes, for frameworks that run each stage in a fresh process.

    The state holds the round's private keys, the self-mask seed and the
    Shamir shares this client holds for its peers: keep it where the client
    keeps its keys (Flower: the node's ``Context.state``), never send or log
    it, and drop it when the round ends. ``restore`` is the inverse. A
    deterministic test ``randomness`` is not saved; a restored client draws
    from the OS CSPRNG unless one is passed again.
    """
    if client.stage == "aborted":
        raise WrongStage(f"client {client.client_id} aborted its round; there is no state to save")
    b64 = _b64encode
    document = {
        "client_id": client.client_id,
        "config": client.config.model_dump(mode="json"),
        "round_id": client.round_id,
        "shapes": [list(shape) for shape in client.layout.shapes],
        "stage": client.stage,
        "keys": None if client._keys is None else [b64(private_bytes(client._keys.c_private)),
                                                 b64(private_bytes(client._keys.s_private))],
        "roster": {str(c): [b64(a), b64(b)] for c, (a, b) in client._roster.items()},
        "group": sorted(client._group),
        "members": [list(run) for run in client._members],
        "peers": sorted(client._peers),
        "held": {str(owner): [b64(shamir.share_to_bytes(seed)), b64(shamir.share_to_bytes(key))]
                 for owner, (seed, key) in client._held.items()},
        "self_seed": b64(client._self_seed),
        "roster_digest": b64(client._roster_digest),
        "context": b64(client.context),
        "request": b64(client._request),
    }
    return STATE_MAGIC + bytes([STATE_VERSION]) + json.dumps(document, separators=(",", ":")).encode("utf-8")


def restore(cls: type["SecAggClient"], state: bytes, randomness: Randomness = SYSTEM, *,
            enrollment: Enrollment | None = None) -> "SecAggClient":
    """Rebuild a client from :meth:`export_state`'s bytes; raises :class:`CorruptState` naming what is wrong.

    The state never holds the member's identity key: under active security pass ``enrollment`` again."""
    if not isinstance(state, (bytes, bytearray)) or bytes(state[:4]) != STATE_MAGIC:
        raise CorruptState("not a privfer secure-aggregation client state (bad magic)")
    if len(state) < 5 or state[4] != STATE_VERSION:
        raise CorruptState(f"client state version {state[4] if len(state) > 4 else None}, expected {STATE_VERSION}")
    field = "document"
    try:
        document = json.loads(bytes(state[5:]).decode("utf-8"))
        field = "config"
        config = SecAggConfig(**document["config"])
        field = "shapes"
        layout = PayloadLayout(tuple(tuple(int(d) for d in shape) for shape in document["shapes"]), config)
        field = "context"
        context = _b64decode(document["context"], CONTEXT_BYTES)
        field = "client_id"
        try:
            client = cls(int(document["client_id"]), config, str(document["round_id"]), layout, randomness,
                         enrollment=enrollment, context=context)
        except InvalidInput as exc:
            if config.security == "active":
                raise CorruptState(f"the state's client cannot be restored with this enrollment: {exc}") from None
            raise
        field = "stage"
        if document["stage"] not in STAGES:
            raise ValueError(document["stage"])
        client.stage = document["stage"]
        field = "keys"
        if document["keys"] is not None:
            c_raw, s_raw = (_b64decode(k, KEY_BYTES) for k in document["keys"])
            client._keys = KeyPairs.from_private_bytes(c_raw, s_raw)
        field = "roster"
        client._roster = {int(c): (_b64decode(a, KEY_BYTES), _b64decode(b, KEY_BYTES))
                          for c, (a, b) in document["roster"].items()}
        field = "group"
        client._group = frozenset(int(c) for c in document["group"])
        field = "members"
        client._members = check_runs(tuple((a, b) for a, b in document["members"]), config.num_clients)
        if client._group and not (in_runs(client._members, client.client_id)
                                  and all(in_runs(client._members, v) for v in client._group)):
            raise ValueError("the group is not within the roster")
        field = "peers"
        client._peers = frozenset(int(c) for c in document["peers"])
        field = "held"
        client._held = {
            int(owner): (shamir.share_from_bytes(_b64decode(seed, shamir.SHARE_BYTES)),
                         shamir.share_from_bytes(_b64decode(key, shamir.SHARE_BYTES)))
            for owner, (seed, key) in document["held"].items()
        }
        field = "self_seed"
        client._self_seed = _b64decode(document["self_seed"], None)
        if client._self_seed and len(client._self_seed) != SEED_BYTES:
            raise ValueError("seed length")
        field = "roster_digest"
        client._roster_digest = _b64decode(document["roster_digest"], None)
        if client._roster_digest and len(client._roster_digest) != 32:
            raise ValueError("digest length")
        field = "request"
        client._request = _b64decode(document["request"], None)
        if client._request:
            client._vet(decode(client._request))  # the signed request, re-checked against the state
    except CorruptState:
        raise
    except Exception as exc:  # any decoding failure names the field, never its (secret) value
        raise CorruptState(f"client state field {field!r} is missing or malformed ({type(exc).__name__})") from None
    if client.stage != "new" and client._keys is None:
        raise CorruptState(f"client state at stage {client.stage!r} has no keys")
    if (client.stage == "signed") != bool(client._request):
        raise CorruptState("client state field 'request' does not match its stage")
    return client


__all__ = ["STAGES", "STATE_MAGIC", "STATE_VERSION", "export_state", "restore"]
