"""Local DP-SGD: each client runs Opacus DP-SGD and adds all its noise itself, as if the server saw its update."""

from privfer.privacy.mechanisms.base import PrivacyMechanism

MECHANISM = PrivacyMechanism(
    id="local",
    unit="record",
    selected_by="local",
    title="local DP-SGD (each client adds all its noise)",
    accounting="opacus",
    takes_local_steps=True,
    per_sample_gradients=True,
    statement={
        "mechanism": "DP-SGD (Opacus): per-example gradient clipping, Poisson-subsampled Gaussian noise",
        "neighbouring_relation": "add or remove one record (clip) of one client",
        "public": [
            "each client's record count: it sets the client's sample rate, steps and FedAvg weight, and is "
            "written here",
        ],
    },
)
