"""Named quantisation schemes: a weight format plus an optional dynamic activation format.

| scheme                                  | weights                                   | activations (dynamic)        |
| --------------------------------------- | ----------------------------------------- | ---------------------------- |
| `int4_weight_only`                      | int4 asymmetric per group, bf16 scales,   | -                            |
|                                         | uint8 zero points in [0, 15]              |                              |
| `int8_weight_only`                      | int8 symmetric per output channel, fp32   | -                            |
| `int8_dynamic_activation_int4_weight`   | int4 symmetric per group, bf16 scales     | int8 asymmetric per token    |
| `float8_dynamic`                        | float8 e4m3 per output row, fp32 scales   | float8 e4m3 per token (row)  |

Group sizes 32, 64, 128, 256 (int4 schemes only). Embedding tables, when quantised, use the scheme's
weight format (a lookup has no activation to quantise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .primitives import QuantFormat

__all__ = ["QuantScheme", "SCHEMES", "GROUP_SIZES"]

SCHEMES = ("int4_weight_only", "int8_weight_only", "int8_dynamic_activation_int4_weight", "float8_dynamic")
GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantScheme:
    name: str
    weight: QuantFormat
    activation: Optional[QuantFormat] = None

    @classmethod
    def from_name(cls, name: str, group_size: int = 32) -> "QuantScheme":
        """The named scheme; group_size applies to the int4 schemes (32, 64, 128 or 256)."""
        if name not in SCHEMES:
            raise ValueError(f"quantisation scheme: expected one of {', '.join(SCHEMES)}, got {name!r}")
        if name in ("int4_weight_only", "int8_dynamic_activation_int4_weight") and group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: expected one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
        if name == "int4_weight_only":
            return cls(name, QuantFormat("int4", symmetric=False, group_size=group_size, scale_dtype=torch.bfloat16))
        if name == "int8_weight_only":
            return cls(name, QuantFormat("int8", symmetric=True, group_size=0, scale_dtype=torch.float32))
        if name == "int8_dynamic_activation_int4_weight":
            return cls(name, QuantFormat("int4", symmetric=True, group_size=group_size, scale_dtype=torch.bfloat16),
                       QuantFormat("int8", symmetric=False, group_size=0, scale_dtype=torch.float32))
        return cls(name, QuantFormat("float8_e4m3", group_size=0, scale_dtype=torch.float32),
                   QuantFormat("float8_e4m3", group_size=0, scale_dtype=torch.float32))

    @property
    def group_size(self) -> int:
        """The weight group size (0 = per output channel)."""
        return self.weight.group_size

    def describe(self) -> str:
        act = self.activation.describe() + " (dynamic)" if self.activation else "none"
        return f"{self.name}: weights {self.weight.describe()}; activations {act}"
