"""Homomorphic-encryption aggregation (CKKS via TenSEAL) with a key authority the server is not.

Roles (protocols/he/SPEC.md):

* :class:`KeyAuthority` creates the CKKS context and keeps the only secret key.
  It hands out the *public* context (encryption, addition; no decryption) and
  decrypts an aggregate only when it covers at least ``min_clients`` distinct
  clients — which it verifies from an encrypted client-count coordinate.
* :class:`HEClient` encrypts its update, example count and metrics with the
  public context, seals the ciphertexts to the key authority and signs them.
* :class:`HEServer` holds the public context only: it relays the sealed, signed
  updates to the key authority. It cannot decrypt or compute on anything.

Privacy holds unless the server colludes with the key authority — unlike the
common deployment in which every client holds the same secret key, where any
one client colluding with the server reads every update. Version 2: every
client is an enrolled member (a roster certificate from an enrollment authority
that is not the server) and signs its encrypted update for the round; the key
authority verifies every signature, sums the signed updates itself and decrypts
one such sum per round, of at least ``min_clients`` distinct members. A server
that adds its own encryptions (pads) to a victim's ciphertext, duplicates one,
or replays one in another round is refused (protocols/he/SPEC.md, section 1).

The package: ``config.py`` (CKKSConfig, parameters, bounds), ``packing.py`` (HELayout: arrays into slots),
``wire.py`` (sealed updates, signed statements, the message codec), ``roles.py`` (KeyAuthority, HEClient,
HEServer), ``recipe.py`` (:func:`aggregate`, one round in process).
"""

from __future__ import annotations

from privfer.secagg.he.config import (COUNT_DIGITS, DIGIT, HE_MAGIC, HE_PROTOCOL_VERSION, MAX_CIPHERTEXT_BYTES,
                                      MAX_MODULUS_BITS, MIN_GRID_BITS, CKKSConfig, InvalidCiphertext, make_ckks_config)
from privfer.secagg.he.packing import HELayout, to_grid
from privfer.secagg.he.recipe import aggregate
from privfer.secagg.he.roles import (HEClient, HEPlainSum, HEServer, KeyAuthority, add_into, add_updates,
                                     check_vector_framing, parse_chunks)
from privfer.secagg.he.wire import HEMessage, seal_update, update_statement

__all__ = ["COUNT_DIGITS", "DIGIT", "HE_MAGIC", "HE_PROTOCOL_VERSION", "MAX_CIPHERTEXT_BYTES", "MAX_MODULUS_BITS",
           "MIN_GRID_BITS", "CKKSConfig", "HEClient", "HELayout", "HEMessage", "HEPlainSum", "HEServer",
           "InvalidCiphertext", "KeyAuthority", "add_into", "add_updates", "aggregate", "check_vector_framing",
           "make_ckks_config", "parse_chunks", "seal_update", "to_grid", "update_statement"]
