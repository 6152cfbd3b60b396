"""The QAT converter the trainer runs (`--qat.enable`): prepare -> fake-quantised training -> convert.

    converter = build_qat_converter(scheme="int8_dynamic_activation_int4_weight", group_size=32,
                                    start_step=100, filter_fqns=["output"])
    converter.convert(model)          # on the meta model, before FSDP/compile: Linears -> FakeQuantLinear
    converter.init_buffers(model)     # after materialisation: learned scales (range learning) start at zero
    converter.pre_step(model, step)   # fake quantisation on from `start_step` (also right after a resume);
                                      # learned scales still at zero start then (`scale_init`)
    converter.calibrate(model, fwd)   # before the step's first forward: with scale_init "activation_mse",
                                      # the step where the scales start runs fwd() once for the statistics
    converter.finalize(model)         # fake-quantised modules -> QuantizedTensor weights (for serving)

Parameter names are unchanged, so a QAT run resumes from (or starts from) any checkpoint of the same model;
range learning adds one `weight_scale` per module, which a checkpoint of a run without it lacks (the
trainer lets them start fresh).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch.nn as nn

from .qat import (SCALE_INITS, calibrate_learned_scales_, count_uninitialised_learned_scales,
                  initialize_learned_scales_, prepare_qat_, quantize_, reset_learned_scales_, set_fake_quant_)
from .schemes import QuantScheme

__all__ = ["QATConverter", "build_qat_converter"]

logger = logging.getLogger(__name__)


class QATConverter:
    name = "qat"

    def __init__(self, scheme: QuantScheme, *, start_step: int = 0, filter_fqns: Iterable[str] = (),
                 range_learning: bool = False, scale_init: str = "range", process_group=None):
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"qat.start_step: must be an integer >= 0, got {start_step!r}")
        if scale_init not in SCALE_INITS:
            raise ValueError(f"qat.scale_init: expected one of {', '.join(SCALE_INITS)}, got {scale_init!r}")
        self.scheme = scheme
        self.start_step = start_step
        self.filter_fqns = list(filter_fqns)
        self.range_learning = range_learning
        self.scale_init = scale_init
        self.process_group = process_group  # data-parallel ranks: their calibration statistics are summed
        self._enabled = None  # unknown until the first pre_step
        self._calibrate_first = False  # pre_step found scales to start from statistics: calibrate() does it

    def convert(self, model: nn.Module) -> None:
        report = prepare_qat_(model, self.scheme, self.filter_fqns, range_learning=self.range_learning)
        if not report.converted:
            raise ValueError(f"qat.filter_fqns={self.filter_fqns}: no Linear or Embedding was prepared for QAT "
                             f"({'; '.join(f'{k}: {v}' for k, v in report.skipped.items()) or 'model has none'})")
        report.log(f"qat {self.scheme.describe()}" + (", learned scales" if self.range_learning else ""))
        self._set(model, self.start_step <= 1)  # the first step is 1

    def init_buffers(self, model: nn.Module) -> None:
        # Plain fake quantisation keeps no state (scales come from the current tensors). Learned scales
        # were materialised uninitialised: zero marks them "start from the weights' ranges".
        reset_learned_scales_(model)

    def pre_step(self, model: nn.Module, step: int) -> None:
        enable = step >= self.start_step
        if (enable and not self._enabled and self.range_learning and self.scale_init == "activation_mse"
                and count_uninitialised_learned_scales(model)):
            # The scales start from the inputs' statistics, which need this step's batch: calibrate() runs one
            # forward of the float model (fake quantisation still off), then switches it on.
            self._set(model, False)
            self._calibrate_first = True
            return
        self._set(model, enable)

    def calibrate(self, model: nn.Module, run_forward: Callable[[], object]) -> None:
        """Called before the step's first forward with a function running the model on that step's first
        micro-batch; does something only on the step where learned scales start from statistics."""
        if not self._calibrate_first:
            return
        self._calibrate_first = False
        n = calibrate_learned_scales_(model, run_forward, self.process_group)
        logger.info("qat: input statistics of %d Linears collected for their learned scales", n)
        self._set(model, True)

    def post_optimizer_hook(self, model: nn.Module) -> None:
        pass

    def finalize(self, model: nn.Module) -> None:
        report = quantize_(model)
        logger.info("qat: converted %d fake-quantised modules to %s QuantizedTensor weights", len(report.converted),
                    self.scheme.name)

    def _set(self, model: nn.Module, enabled: bool) -> None:
        if enabled != self._enabled:
            n = set_fake_quant_(model, enabled)
            if enabled and self.range_learning:
                fresh = initialize_learned_scales_(model, self.scale_init)
                if fresh:
                    logger.info("qat: %d learned scales start from %s", fresh, {
                        "range": "their weights' ranges", "mse": "the least-squared-error clip of their weights",
                        "activation_mse": "the least-squared-error clip of their outputs"}[self.scale_init])
            if self._enabled is not None or enabled:
                logger.info("qat: fake quantisation %s in %d modules", "on" if enabled else "off", n)
            self._enabled = enabled


def build_qat_converter(*, scheme: str, group_size: int, start_step: int, filter_fqns: list[str],
                        range_learning: bool = False, scale_init: str = "range", process_group=None) -> QATConverter:
    return QATConverter(QuantScheme.from_name(scheme, group_size), start_step=start_step, filter_fqns=filter_fqns,
                        range_learning=range_learning, scale_init=scale_init, process_group=process_group)
