"""The CKKS backend's config and parameters, the bounds on untrusted ciphertexts, and TenSEAL's loading."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from privfer.errors import ConfigError
from privfer.secagg.errors import MessageError

HE_PROTOCOL_VERSION = 2  # 2: signed updates; the key authority sums them itself
DIGIT = 1 << 10  # the clipped-value count travels as three base-1024 digits, each summed exactly
COUNT_DIGITS = 3
HE_MAGIC = b"PFHE"
# SEAL's largest total coefficient-modulus bits for 128-bit security (HomomorphicEncryption.org standard).
MAX_MODULUS_BITS = {8192: 218, 16384: 438}
MAX_CIPHERTEXT_BYTES = 1 << 27
MIN_GRID_BITS = 8


class InvalidCiphertext(MessageError):
    """Bytes that do not parse as a CKKS ciphertext (or context) of this round's parameters."""


class CKKSConfig(BaseModel):
    """CKKS parameters and the aggregation policy, checked when the config is made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["ckks"] = "ckks"
    num_clients: int = Field(..., ge=2, le=1_000_000, description="Most clients in one aggregate.")
    min_clients: int = Field(
        2, ge=2, description="The key authority decrypts only aggregates of at least this many (one would release a "
        "client's update in the clear)."
    )
    grid_bits: int | None = Field(
        None, ge=MIN_GRID_BITS, le=30,
        description="Clients' values are stochastically rounded to multiples of 2^-grid_bits; the key authority "
        "rounds each decryption to that grid, so what it releases carries no CKKS noise. None: the finest grid "
        "whose half-step is at least twice the decryption error bound.",
    )
    poly_modulus_degree: Literal[8192, 16384] = Field(8192, description="Ring degree N; N / 2 slots per ciphertext.")
    coeff_mod_bit_sizes: tuple[int, ...] = Field((60, 40, 40, 60), description="Bit sizes of the coefficient moduli.")
    scale_bits: int = Field(40, ge=20, le=60, description="log2 of the CKKS scale.")
    clipping_range: float = Field(8.0, gt=0, description="Update values are clipped to [-c, c] (and counted).")
    max_examples: int = Field(
        4096, ge=1, description="Largest example count a client may report (sums must fit the plaintext headroom)."
    )
    metrics: tuple[str, ...] = Field((), description="Names of per-client metrics summed under encryption.")
    metric_range: float = Field(1e3, gt=0, description="Metric values are clipped to [-m, m].")

    @model_validator(mode="after")
    def _check(self) -> "CKKSConfig":
        moduli = self.coeff_mod_bit_sizes
        limit = MAX_MODULUS_BITS[self.poly_modulus_degree]
        if len(moduli) < 2 or any(not 20 <= b <= 60 for b in moduli):
            raise ValueError("coeff_mod_bit_sizes needs at least two moduli of 20..60 bits each")
        if sum(moduli) > limit:
            raise ValueError(
                f"coeff_mod_bit_sizes sum to {sum(moduli)} bits; poly_modulus_degree {self.poly_modulus_degree} "
                f"allows at most {limit} for 128-bit security"
            )
        if any(b < self.scale_bits for b in moduli[1:-1]):
            raise ValueError(
                f"scale_bits {self.scale_bits} exceeds an intermediate modulus of {min(moduli[1:-1])} bits; "
                "the scale must fit every rescaling modulus"
            )
        headroom = moduli[0] - self.scale_bits  # bits left for the integer part of a plaintext
        largest = self.num_clients * max(self.clipping_range, self.max_examples, self.metric_range, DIGIT - 1)
        if largest >= 2 ** (headroom - 1):
            raise ValueError(
                f"a sum of {self.num_clients} clients can reach {largest:.4g}, but the first modulus "
                f"({moduli[0]} bits) minus scale_bits ({self.scale_bits}) leaves {headroom} bits: values must stay "
                f"below 2^{headroom - 1} = {2 ** (headroom - 1)}; raise the first modulus or lower scale_bits"
            )
        if self.error_bound(self.num_clients) >= 0.25:
            raise ValueError(
                f"scale_bits {self.scale_bits} is too coarse for {self.num_clients} clients: the error bound "
                f"{self.error_bound(self.num_clients):.3g} would blur the exact counts; raise scale_bits"
            )
        finest = self.finest_grid_bits()
        if finest < MIN_GRID_BITS:
            raise ValueError(
                f"scale_bits {self.scale_bits} leaves a release grid of 2^-{finest} for {self.num_clients} clients "
                f"(the grid's half-step must be twice the decryption error bound); at least 2^-{MIN_GRID_BITS} "
                "is needed: raise scale_bits"
            )
        if self.grid_bits is not None and self.grid_bits > finest:
            raise ValueError(f"grid_bits {self.grid_bits} is finer than the decryption error allows for "
                             f"{self.num_clients} clients (at most {finest})")
        largest = self.num_clients * max(self.clipping_range, self.max_examples, self.metric_range, DIGIT - 1)
        if largest * 2.0 ** self.grid >= 2.0**53:
            raise ValueError(f"sums up to {largest:.4g} on a grid of 2^-{self.grid} exceed float64's exact integers")
        if self.min_clients > self.num_clients:
            raise ValueError(f"min_clients {self.min_clients} exceeds num_clients {self.num_clients}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metric names must be distinct")
        return self

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def error_bound(self, clients: int) -> float:
        """Stated bound on |decrypted sum - float sum| per coordinate.

        Encoding and fresh encryption add noise of several thousand units at
        scale 2^s: measured worst cases per value and client are about 2^(12.5 - s)
        at N = 8192 and 2^(13.8 - s) at N = 16384. Sums add the clients' noise.
        We state clients x 2^(16 - s), at least 4x the worst measured error
        (tests/test_secagg_he.py checks it over random shapes and client counts).
        """
        return clients * 2.0 ** (16 - self.scale_bits)

    def finest_grid_bits(self) -> int:
        """The largest g with error_bound(num_clients) <= 2^-(g + 2): the decryption error stays below half of
        half a grid step, so rounding to the grid recovers the exact sum of the clients' grid values."""
        return min(30, math.floor(-math.log2(self.error_bound(self.num_clients))) - 2)

    @property
    def grid(self) -> int:
        """grid_bits, resolved."""
        return self.grid_bits if self.grid_bits is not None else self.finest_grid_bits()

    def release_error_bound(self, clients: int) -> float:
        """|released sum - float sum| per coordinate: the clients' stochastic rounding to the grid only."""
        return clients * 2.0 ** -self.grid


def make_ckks_config(**settings: object) -> CKKSConfig:
    """Build a :class:`CKKSConfig`, turning validation failures into :class:`ConfigError`."""
    from pydantic import ValidationError

    try:
        return CKKSConfig(**settings)
    except ValidationError as exc:
        parts = [f"{'.'.join(map(str, e['loc'])) or 'ckks'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise ConfigError("invalid CKKS config: " + "; ".join(parts)) from None


def _tenseal():
    import tenseal

    return tenseal


def _load_context(raw: bytes):
    try:
        return _tenseal().context_from(raw)
    except Exception:  # TenSEAL raises ValueError or RuntimeError on bad bytes
        raise InvalidCiphertext("bytes do not parse as a TenSEAL context") from None
