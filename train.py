"""Entry point: `python train.py --config configs/debug.toml [--section.key value ...]` (or under torchrun)."""

import logging
import os
import sys

from titan_fp8.config import ConfigError, help_text, load_config


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[titan_fp8 r{rank}] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # Imported after parsing so that --help and config errors answer at once, before torch loads.
    import torch.distributed as dist

    from titan_fp8.checkpoint import CheckpointError
    from titan_fp8.trainer import NonFiniteError, Trainer

    try:
        Trainer(config).train()
    except (ValueError, FileNotFoundError, CheckpointError, NotImplementedError) as e:
        # Bad input found while building (data files, tokenizer, checkpoints, degrees, features not built
        # yet): one line, exit 2.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
