"""Model converters (float8 training, QAT) with the hooks the trainer calls.

A converter changes the model before parallelism (`convert`), may need its buffers initialised once the
meta-device model is materialised (`init_buffers`), runs once per step before forward (`pre_step`, then
`calibrate` with a function that runs the step's first micro-batch) and after `optimizer.step()`
(`post_optimizer_hook`), and turns training modules into serving ones (`finalize`).
The float8 and quant packages know nothing of the job config: this module translates the config into
their narrow arguments.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch.nn as nn

from titan_fp8.config import JobConfig

logger = logging.getLogger(__name__)


class ModelConverter:
    name = "base"

    def convert(self, model: nn.Module) -> None:
        raise NotImplementedError

    def init_buffers(self, model: nn.Module) -> None:
        pass

    def pre_step(self, model: nn.Module, step: int) -> None:
        pass

    def calibrate(self, model: nn.Module, run_forward: Callable[[], object]) -> None:
        """Before each step's first forward: `run_forward()` runs the model on that micro-batch (no grad)."""
        pass

    def post_optimizer_hook(self, model: nn.Module) -> None:
        pass

    def finalize(self, model: nn.Module) -> None:
        pass


def fqn_filter(filter_fqns: list[str]):
    """module_filter_fn keeping Linears whose name contains none of `filter_fqns` and whose dims fit fp8 GEMMs."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if any(f and f in fqn for f in filter_fqns):
            return False
        if isinstance(module, nn.Linear):
            return module.in_features % 16 == 0 and module.out_features % 16 == 0
        return True

    return keep


class Float8Converter(ModelConverter):
    name = "float8"

    def __init__(self, *, recipe_name: str, filter_fqns: list[str], enable_fsdp_float8_all_gather: bool,
                 precompute_scale: bool, amax_history_len: int, margin: int, amax_compute_algo: str,
                 emulate: bool, process_group=None, filter_small_gemms: bool = False,
                 tokens_per_microbatch: Optional[int] = None, cast_backend: Optional[str] = None,
                 save_float8_for_backward: Optional[bool] = None, reuse_float8_weight: bool = False):
        import dataclasses

        from titan_fp8.float8 import Float8LinearConfig

        base = Float8LinearConfig.from_recipe_name(recipe_name)
        overrides = dict(emulate=emulate, enable_fsdp_float8_all_gather=enable_fsdp_float8_all_gather,
                         reuse_float8_weight=reuse_float8_weight)
        # None keeps the recipe's choice (rowwise: the Triton casts and the saved fp8 input).
        if cast_backend is not None:
            overrides["cast_backend"] = cast_backend
        if save_float8_for_backward is not None:
            overrides["save_float8_for_backward"] = save_float8_for_backward
        if recipe_name == "delayed":
            overrides.update(amax_history_len=amax_history_len, margin=margin, amax_compute_algo=amax_compute_algo)
        self.config = dataclasses.replace(base, **overrides)
        self.recipe_name = recipe_name
        self.filter_fqns = list(filter_fqns)
        self.precompute_scale = precompute_scale and enable_fsdp_float8_all_gather
        self.process_group = process_group
        if filter_small_gemms and not tokens_per_microbatch:
            raise ValueError("float8.filter_small_gemms needs the tokens per micro-batch (local_batch_size x seq_len)")
        self.filter_small_gemms = filter_small_gemms
        self.tokens_per_microbatch = tokens_per_microbatch
        self.reuse_float8_weight = reuse_float8_weight

    def convert(self, model: nn.Module) -> None:
        from titan_fp8.float8 import Float8Linear, convert_to_float8_training, small_gemm_filter

        if self.filter_small_gemms:
            # Also skips by name and by dims; each skip is logged with the predicted speedup.
            module_filter_fn = small_gemm_filter(self.config, self.tokens_per_microbatch, filter_fqns=self.filter_fqns)
        else:
            module_filter_fn = fqn_filter(self.filter_fqns)
        convert_to_float8_training(model, config=self.config, module_filter_fn=module_filter_fn)
        n = sum(isinstance(m, Float8Linear) for m in model.modules())
        if n == 0:
            why = " and float8.filter_small_gemms (see the log for each Linear)" if self.filter_small_gemms else ""
            raise ValueError(f"float8.filter_fqns={self.filter_fqns}{why}: no Linear was converted to float8")
        logger.info("float8: %d Linears converted, recipe %s", n, self.recipe_name)

    def init_buffers(self, model: nn.Module) -> None:
        from titan_fp8.float8 import Float8Linear

        for m in model.modules():
            if isinstance(m, Float8Linear):
                m.reset_float8_buffers()

    def pre_step(self, model: nn.Module, step: int) -> None:
        if self.reuse_float8_weight:
            from titan_fp8.float8 import precompute_float8_weights

            # One fp8 cast of each weight for all of this step's micro-batches.
            precompute_float8_weights(model)

    def post_optimizer_hook(self, model: nn.Module) -> None:
        from titan_fp8.float8 import (
            invalidate_float8_weights,
            precompute_float8_dynamic_scale_for_fsdp,
            sync_float8_amax_and_scale_history,
        )

        if self.reuse_float8_weight:
            invalidate_float8_weights(model)  # the weights just changed
        if self.recipe_name == "delayed":
            sync_float8_amax_and_scale_history(model, process_group=self.process_group)
        if self.precompute_scale:
            precompute_float8_dynamic_scale_for_fsdp(model)


def build_converters(config: JobConfig, process_group=None, fsdp_enabled: bool = False) -> list[ModelConverter]:
    """Converters named by the config. `process_group`: the data-parallel group delayed-scaling amaxes are
    synchronised over; `fsdp_enabled`: whether FSDP shards the model (the fp8 all-gather needs it)."""
    converters: list[ModelConverter] = []
    if config.qat_enabled:
        from titan_fp8.quant.converter import build_qat_converter

        if config.float8_enabled:
            raise ValueError("qat.enable: QAT and float8 training cannot be combined; enable one of them")
        converters.append(build_qat_converter(scheme=config.qat.scheme, group_size=config.qat.group_size,
                                              start_step=config.qat.start_step, filter_fqns=config.qat.filter_fqns,
                                              range_learning=config.qat.range_learning,
                                              scale_init=config.qat.scale_init, process_group=process_group))
    if config.float8_enabled:
        f8 = config.float8
        all_gather = f8.enable_fsdp_float8_all_gather and fsdp_enabled
        if f8.enable_fsdp_float8_all_gather and not fsdp_enabled:
            logger.info("float8.enable_fsdp_float8_all_gather: one rank, no FSDP all-gather to run in fp8")
        precompute = f8.precompute_float8_dynamic_scale_for_fsdp
        if f8.reuse_float8_weight and fsdp_enabled:
            raise ValueError("float8.reuse_float8_weight is not supported with FSDP (sharded weights are gathered "
                             "for every forward); disable it or run without data-parallel sharding")
        t = config.training
        converters.append(Float8Converter(
            recipe_name=f8.recipe_name, filter_fqns=f8.filter_fqns,
            enable_fsdp_float8_all_gather=all_gather,
            precompute_scale=precompute, amax_history_len=f8.amax_history_len,
            margin=f8.margin, amax_compute_algo=f8.amax_compute_algo, emulate=f8.emulate,
            process_group=process_group, filter_small_gemms=f8.filter_small_gemms,
            tokens_per_microbatch=t.local_batch_size * t.seq_len, cast_backend=f8.cast_backend,
            save_float8_for_backward=f8.save_float8_for_backward, reuse_float8_weight=f8.reuse_float8_weight))
    return converters
