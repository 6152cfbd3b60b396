"""Swap nn.Linear submodules for Float8Linear, in place, and say what was (not) converted."""

from __future__ import annotations

import logging
from typing import Callable, Optional

from torch import nn

from .config import Float8LinearConfig
from .linear import Float8Linear, unconvertible_reason

logger = logging.getLogger(__name__)

ModuleFilterFn = Callable[[nn.Module, str], bool]


def convert_to_float8_training(
    module: nn.Module,
    *,
    config: Optional[Float8LinearConfig] = None,
    module_filter_fn: Optional[ModuleFilterFn] = None,
) -> nn.Module:
    """Replace every chosen ``nn.Linear`` in ``module`` by a ``Float8Linear`` sharing its
    parameters (same Parameter objects, device, dtype). Returns ``module`` (or the new
    Float8Linear when ``module`` itself is a Linear).

    module_filter_fn(linear, fqn) -> bool chooses; by default every Linear whose in/out features are
    multiples of 16 is converted and the others are skipped. A Linear the filter chooses but that
    cannot be converted raises ValueError: a float8 run must not quietly train in high precision.

    With ``config.enable_fsdp_float8_all_gather`` the weight Parameter is replaced by one wrapping
    it for the fp8 all-gather (build the optimizer after conversion and sharding, as FSDP needs).
    """
    config = config or Float8LinearConfig()
    converted: list[str] = []
    skipped: list[tuple[str, str]] = []

    def swap(linear: nn.Linear, fqn: str) -> nn.Module:
        reason = unconvertible_reason(linear)
        if module_filter_fn is None:
            if reason is not None:
                skipped.append((fqn, reason))
                return linear
        elif not module_filter_fn(linear, fqn):
            # A filter that can say why (e.g. the small-GEMM auto filter) is quoted in the log.
            explain = getattr(module_filter_fn, "skip_reason", None)
            why = explain(linear, fqn) if callable(explain) else None
            skipped.append((fqn, f"excluded by module_filter_fn: {why}" if why else "excluded by module_filter_fn"))
            return linear
        elif reason is not None:
            raise ValueError(
                f"float8: module_filter_fn selected {fqn or '<root>'} ({linear}) but it cannot be converted: {reason}"
            )
        converted.append(fqn)
        return Float8Linear.from_float(linear, config)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}{name}"
            plain = type(child) is nn.Linear or (isinstance(child, nn.Linear)
                                                 and getattr(child, "float8_convertible", False))
            if plain:
                new = swap(child, fqn)
                if new is not child:
                    setattr(parent, name, new)
            elif isinstance(child, Float8Linear):
                continue
            elif isinstance(child, nn.Linear):
                # Subclasses (e.g. MultiheadAttention's out_proj) may use .weight outside forward; one that sets
                # `float8_convertible = True` declares that it may be replaced by a plain Linear's equivalent.
                skipped.append((fqn, f"{type(child).__name__} is a subclass of nn.Linear; only nn.Linear is converted"))
            else:
                visit(child, f"{fqn}.")

    if type(module) is nn.Linear:
        module = swap(module, "")
    else:
        visit(module, "")

    logger.info("float8: converted %d Linear layer(s) (%s): %s", len(converted), config.short_str(), converted)
    for fqn, reason in skipped:
        logger.info("float8: skipped %s: %s", fqn or "<root>", reason)
    return module
