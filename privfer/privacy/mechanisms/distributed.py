"""Distributed DP-SGD at record level: one DP-SGD step per secure sum over the union of the cohort's records,
the noise split into shares that add up to the calibrated variance only inside the sum."""

from privfer.privacy.mechanisms.base import PrivacyMechanism

MECHANISM = PrivacyMechanism(
    id="distributed",
    unit="record",
    selected_by="distributed",
    title="distributed DP-SGD (noise in the secure sum)",
    accounting="secure_sum",
    takes_local_steps=False,
    per_sample_gradients=True,
    backends=("masking",),
    statement={
        "mechanism": "distributed DP-SGD: per-example clipping, randomized rounding to integers, {noise} noise "
        "shares summed inside secure aggregation; one DP-SGD step per secure-aggregation round",
        "neighbouring_relation": "add or remove one record (clip) of one client, in the union of the round's "
        "clients' records",
        "public": [
            "each client's record count: the server divides the sum by the expected batch size "
            "(sample_rate x the included clients' records), and it is written here; the guarantee is for "
            "adding or removing a record with the counts treated as public (as in Opacus's DP-SGD), so the "
            "counts themselves are not protected",
            "who took part in each round (the server sees who sends messages)",
        ],
    },
)
