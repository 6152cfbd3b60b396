"""Generate text from a serving artifact written by scripts/export.py.

    python scripts/generate.py --artifact artifacts/debug-8da4w --prompt "def main(" --max_new_tokens 100

Loads the artifact (safetensors + JSON only, verified against its checksums), builds the model, gives
each quantised Linear its low-precision kernel for the device (--reference_kernels: dequantise instead),
then prefills the prompt into a KV cache and decodes one token at a time: greedy by default,
--temperature T with optional --top_k K to sample. Prints the text, then one line of statistics:
prefill and decode speed (tokens/s), weight memory, scheme and kernels.

Errors (bad artifact, bad arguments) are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from titan_fp8.quant import (TOKENIZER_FILE, ArtifactError, install_state_, prepare_for_inference_,  # noqa: E402
                             read_artifact, weight_memory_bytes)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(choice)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError("--device cuda: no CUDA device is available")
    return dev


def load_model(artifact: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               kernels: bool = True, verify_checksum: bool = True):
    """(model, tokenizer or None, config, kernel report) from an artifact directory."""
    from titan_fp8.data import Tokenizer
    from titan_fp8.models import Transformer
    from titan_fp8.models.llama3 import ModelArgs, precompute_rope_cache

    device = torch.device(device)
    config, state = read_artifact(artifact, device=device, dtype=dtype, verify_checksum=verify_checksum)
    try:
        args = ModelArgs(**config["model_args"])
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{artifact}: bad model_args ({e})") from None
    with torch.device("meta"):
        model = Transformer(args)
    install_state_(model, state)
    model.rope_cache = precompute_rope_cache(args, device=device)
    model.eval()
    report = prepare_for_inference_(model) if kernels else None
    tokenizer = None
    if config.get("tokenizer"):
        try:
            tokenizer = Tokenizer(os.path.join(artifact, TOKENIZER_FILE))
        except ValueError as e:
            raise ArtifactError(f"{artifact}: {e}") from None
        if tokenizer.vocab_size > args.vocab_size:
            raise ArtifactError(f"{artifact}: tokenizer has {tokenizer.vocab_size} tokens, the model only {args.vocab_size}")
    return model, tokenizer, config, report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             eos_id: int | None = None, vocab_limit: int | None = None, seed: int = 0) -> tuple[list[int], dict]:
    """Prefill + KV-cache decode of one sequence. Returns (new token ids, timing stats)."""
    device = model.output.weight.device
    total = len(prompt_ids) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_seq_len {model.args.max_seq_len}")
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.make_kv_cache(1, max_seq_len=total)

    def pick(logits: torch.Tensor) -> int:  # logits (V,)
        logits = logits.float()
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[vocab_limit:] = float("-inf")  # padded rows of the embedding were never trained
        if temperature <= 0:
            return int(logits.argmax())
        logits = logits / temperature
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))

    _sync(device)
    t0 = time.perf_counter()
    logits = model(torch.tensor([prompt_ids], device=device), start_pos=0, kv_cache=cache)[0, -1]
    new = [pick(logits)]
    _sync(device)
    t1 = time.perf_counter()
    pos = len(prompt_ids)
    while len(new) < max_new_tokens and new[-1] != eos_id:
        logits = model(torch.tensor([[new[-1]]], device=device), start_pos=pos, kv_cache=cache)[0, -1]
        pos += 1
        new.append(pick(logits))
    _sync(device)
    t2 = time.perf_counter()
    decoded = len(new) - 1  # the first new token came out of the prefill
    stats = {"prompt_tokens": len(prompt_ids), "new_tokens": len(new), "prefill_s": t1 - t0, "decode_s": t2 - t1,
             "prefill_tok_s": len(prompt_ids) / max(t1 - t0, 1e-9),
             "decode_tok_s": decoded / (t2 - t1) if decoded else float("nan"),
             "total_tok_s": len(new) / max(t2 - t0, 1e-9)}
    return new, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="directory written by scripts/export.py")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto",) + tuple(_DTYPES),
                   help="compute dtype (auto: the artifact's, bfloat16 by default; the CPU int4/int8 kernels are "
                        "fast with bfloat16 activations and slow with float32)")
    p.add_argument("--reference_kernels", action="store_true", help="dequantise instead of low-precision kernels")
    p.add_argument("--no_warmup", dest="warmup", action="store_false",
                   help="time the first (cold) generation instead of a warmed-up one")
    p.add_argument("--no_verify", action="store_true", help="skip the sha256 check of the artifact files")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1 or a.temperature < 0 or a.top_k < 0:
        print("error: --max_new_tokens must be >= 1, --temperature and --top_k >= 0", file=sys.stderr)
        return 2
    try:
        device = resolve_device(a.device)
        dtype = _DTYPES[a.dtype] if a.dtype != "auto" else None  # None: the dtype recorded at export
        t0 = time.perf_counter()
        model, tok, config, report = load_model(a.artifact, device=device, dtype=dtype,
                                                kernels=not a.reference_kernels, verify_checksum=not a.no_verify)
        load_s = time.perf_counter() - t0
        if tok is None:
            raise ArtifactError(f"{a.artifact}: no tokenizer in the artifact")
        prompt_ids = [tok.bos_id] + tok.encode(a.prompt)
        if a.warmup:  # first calls pay for allocator growth, kernel selection and (CUDA) context setup
            generate(model, prompt_ids, min(2, a.max_new_tokens), vocab_limit=tok.vocab_size)
        new, stats = generate(model, prompt_ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                              eos_id=tok.eos_id, vocab_limit=tok.vocab_size, seed=a.seed)
    except (ArtifactError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = tok.decode([t for t in new if t != tok.eos_id])
    print(a.prompt + text)
    kernels = collections.Counter(report.converted.values()) if report else collections.Counter()
    if report and report.skipped:
        kernels["reference"] += len(report.skipped)
    kernel_text = ", ".join(f"{k} x{n}" for k, n in sorted(kernels.items())) or "none (float weights)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"--- {stats['new_tokens']} new tokens; prefill {stats['prompt_tokens']} tokens at "
          f"{stats['prefill_tok_s']:.1f} tok/s; decode {stats['decode_tok_s']:.1f} tok/s; "
          f"weights {weight_memory_bytes(model) / 2**20:.2f} MiB ({config['scheme']}, {model.output.weight.dtype}); "
          f"kernels: {kernel_text}; device {name}; load {load_s:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
