"""Pretrain the small causal LM that the sweep's ``finetune`` task fine-tunes, once: the result is cached.

The model is a Llama from ``train.py``'s config flags, trained with AdamW on the recipe's default text (prompt/
response passages of the standard library's ``pydoc_data.topics``) with its locally trained byte-level BPE; the
folder holds the model and that tokenizer. The folder's name carries a hash of the training argv, so a second call
with the same settings finds it and trains nothing; other settings get another folder. The build writes into a
temporary folder and renames it when done, so an interrupted build is never taken for a finished one.

    python recipes/causal_lm/pretrain.py                 # prints the folder, outputs/pretrained/pydoc-<hash>
    python recipes/causal_lm/pretrain.py --tiny          # a seconds-long model, for plumbing checks
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `recipes.causal_lm.train` resolves as a namespace package from the repo root
    sys.path.insert(0, str(REPO_ROOT))

__all__ = ["CACHE_DIR", "PRETRAIN_ARGV", "TINY_ARGV", "pretrained"]

CACHE_DIR = REPO_ROOT / "outputs" / "pretrained"

# 0.4M parameters (hidden 96, 3 layers; twice the sweep's causal_lm model) for 1,000 steps of 16 passages (about
# 6.5 epochs of pydoc): its English carries over to the tweets, and a fine-tuning step stays near 0.1 s on one
# CPU thread, so the finetune task's ~35 runs fit in about 25 minutes on a shared 2-core machine.
PRETRAIN_ARGV = [
    "--hidden_size",
    "96",
    "--intermediate_size",
    "256",
    "--num_hidden_layers",
    "3",
    "--num_attention_heads",
    "4",
    "--num_key_value_heads",
    "2",
    "--vocab_size",
    "512",
    "--block_size",
    "64",
    "--per_device_train_batch_size",
    "16",
    "--max_steps",
    "1000",
    "--learning_rate",
    "3e-3",
    "--warmup_steps",
    "0.05",
    "--optim",
    "adamw_torch",
    "--seed",
    "0",
]
TINY_ARGV = [
    "--hidden_size",
    "32",
    "--intermediate_size",
    "64",
    "--num_hidden_layers",
    "1",
    "--block_size",
    "64",
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "16",
    "--max_steps",
    "4",
    "--optim",
    "adamw_torch",
    "--seed",
    "0",
]
_MARKER = "pretrain.json"  # written last: the folder is complete


def pretrained(argv: list[str], cache_dir: str | Path = CACHE_DIR) -> Path:
    """The folder of the model ``train.py`` trains with ``argv`` on pydoc, built now unless it is cached.

    ``argv`` is the recipe's argv without output flags; the folder name is ``pydoc-<first 12 hex digits of the
    SHA-256 of argv as JSON>``. Returns that folder, which holds ``config.json``, the weights, the tokenizer and
    ``pretrain.json`` (the argv and the final eval loss on held-out pydoc passages).
    """
    key = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"pydoc-{key}"
    if (folder / _MARKER).is_file():
        return folder
    from recipes.causal_lm import train

    cache_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".pydoc-{key}-", dir=cache_dir))
    try:
        out = ["--output_dir", str(building), "--save_final_model", "true", "--report_to", "none"]
        out += ["--disable_tqdm", "true", "--log_level", "error", "--corpus", "pydoc"]
        result = train.main(argv + out)
        record = {"argv": argv, "eval_loss": result["eval"].get("eval_loss")}
        (building / _MARKER).write_text(json.dumps(record, indent=1))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder)  # a folder without its marker: an earlier build that did not finish
        building.rename(folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--cache_dir", default=str(CACHE_DIR))
    parser.add_argument("--tiny", action="store_true", help="a tiny model in seconds (plumbing checks)")
    args = parser.parse_args(argv)
    folder = pretrained(TINY_ARGV if args.tiny else PRETRAIN_ARGV, args.cache_dir)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
