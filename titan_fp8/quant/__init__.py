"""Quantisation for serving and QAT: one quantised-weight format, fake quantisation built on the same
functions, model passes (prepare / convert / kernels) and the safetensors artifact. See docs/qat.md.

Imports only torch, titan_fp8.loss (torch only: a QAT output head computes the loss like the model's own),
titan_fp8.torch_support (torch-only capability probes) and, lazily for the artifact, safetensors.
"""

from .artifact import (CONFIG_FILE, FORMAT, FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE, ArtifactError,
                       install_state_, read_artifact, save_artifact, sha256_file)
from .converter import QATConverter, build_qat_converter
from .primitives import QuantFormat, fake_quantize, fake_quantize_learned_scale, pack_int4, unpack_int4
from .qat import (LEARNED_SCALE_NAME, SCALE_INITS, FakeQuantEmbedding, FakeQuantLinear, QuantReport,
                  calibrate_learned_scales_, initialize_learned_scales_, mse_scales,
                  prepare_for_inference_, prepare_qat_, quantize_, reset_learned_scales_, set_fake_quant_, skip_reason,
                  weight_memory_bytes)
from .schemes import GROUP_SIZES, SCHEMES, QuantScheme
from .tensor import KERNELS, QuantizedTensor, choose_kernel

__all__ = [
    "ArtifactError", "CONFIG_FILE", "TOKENIZER_FILE", "WEIGHTS_FILE", "FORMAT", "FORMAT_VERSION", "install_state_", "read_artifact", "save_artifact", "sha256_file",
    "QATConverter", "build_qat_converter", "QuantFormat", "fake_quantize", "fake_quantize_learned_scale", "pack_int4", "unpack_int4",
    "FakeQuantEmbedding", "FakeQuantLinear", "QuantReport", "prepare_for_inference_", "prepare_qat_", "quantize_",
    "set_fake_quant_", "initialize_learned_scales_", "calibrate_learned_scales_", "mse_scales", "SCALE_INITS", "reset_learned_scales_", "LEARNED_SCALE_NAME", "skip_reason", "weight_memory_bytes", "GROUP_SIZES", "SCHEMES", "QuantScheme", "KERNELS",
    "QuantizedTensor", "choose_kernel",
]
