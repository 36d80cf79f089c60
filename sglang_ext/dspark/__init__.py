"""Engine-independent DSpark core (no sglang imports): drafter, sampling, verification,
STS calibration, prefix scheduler, SPS table, training.  See each module's docstring."""

from __future__ import annotations

from .calibration import STSCalibration, expected_calibration_error, fit_sts
from .config import DSparkConfig, DSparkConfigError, default_target_layer_ids
from .drafter import DraftBlock, DraftContext, DSparkDrafter
from .sampling import SamplingParams, process_logits, sample_block_sequential
from .scheduler import (
    SchedulerInput,
    prefix_survival,
    schedule_algorithm1,
)
from .sps import SPSTable, machine_fingerprint
from .verify import VerifyResult, verify_block

__all__ = [
    "DSparkConfig", "DSparkConfigError", "DSparkDrafter", "DraftBlock",
    "DraftContext", "SPSTable", "STSCalibration", "SamplingParams", "SchedulerInput", "VerifyResult",
    "default_target_layer_ids", "expected_calibration_error", "fill_top_k",
    "fit_sts", "machine_fingerprint", "prefix_survival", "process_logits", "sample_block_sequential",
    "schedule_algorithm1", "verify_block",
]
