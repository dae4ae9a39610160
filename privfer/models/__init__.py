"""Models: the VFER (video) and IFER (frame) classifiers."""

from privfer.models.vfer import IFER, VFER, fit_ifer, ifer_from_config

__all__ = ["IFER", "VFER", "fit_ifer", "ifer_from_config"]
