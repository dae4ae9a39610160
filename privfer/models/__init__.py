"""Models: the VFER (video) and IFER (frame) classifiers, and the fast DP-SGD LSTM."""

from privfer.models.dp_lstm import FastDPLSTM

from privfer.models.vfer import IFER, VFER, fit_ifer, ifer_from_config

__all__ = ["FastDPLSTM", "IFER", "VFER", "fit_ifer", "ifer_from_config"]
