"""Distributed DP-FedAvg at person level: each selected client's clipped whole update (or zeros, by its secret
coin) plus a noise share, summed securely; the server steps on the mean over a public denominator."""

from privfer.privacy.mechanisms.base import PrivacyMechanism

MECHANISM = PrivacyMechanism(
    id="distributed_person",
    unit="person",
    selected_by="distributed",
    title="distributed DP-FedAvg (person level, noise in the secure sum)",
    accounting="secure_sum",
    takes_local_steps=True,  # each selected client trains locally, then its whole update is clipped
    per_sample_gradients=False,
    backends=("masking",),
    counted="persons",
    statement={
        "mechanism": "distributed DP-FedAvg: each selected client's whole update clipped to max_grad_norm (the "
        "person's update bound, privacy.max_update_norm), or zeros by its secret coin (heads with probability "
        "sample_rate, privacy.participation), randomized rounding to integers, {noise} noise shares summed inside "
        "secure aggregation; the server divides by sample_rate x the included clients",
        "neighbouring_relation": "replace everything one person (client) contributes by zeros (zero-out): all of "
        "their clips at once; who is selected and sends messages stays public",
        "public": [
            "who is selected and takes part in each round (the server sees who sends messages); the ledger's "
            "rounds_trained counts every round a person was selected in, whatever its coin said",
            "the number of persons in the federation ('persons', what delta is judged against); no person's record "
            "count, weight, loss or metric is released (entries say records: null)",
        ],
        "secret_participation": "each selected client flips its own coin from its secret ChaCha20 stream and "
        "submits either its clipped update or zeros, always with its noise share; the masked input, its length, "
        "the protocol messages and the public denominator are the same either way, so the coin is accounted as "
        "Poisson subsampling at rate sample_rate over the rounds the person is selected in. Not covered: a client "
        "whose timing, dropout or energy use depends on its coin (a deployed client trains either way)",
    },
)
