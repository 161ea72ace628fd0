"""Calibration statistics (input Gram matrices) for activation-aware methods."""
from mpokit.calibration.activations import Activations, offload_activations
from mpokit.calibration.blocks import find_blocks, stream_blocks
from mpokit.calibration.stats import GramAccumulator, InputStats, calibration_batches, collect_input_stats, \
    resolve_calibration

__all__ = ["Activations", "offload_activations", "find_blocks", "stream_blocks", "GramAccumulator", "InputStats",
           "calibration_batches", "collect_input_stats", "resolve_calibration"]
