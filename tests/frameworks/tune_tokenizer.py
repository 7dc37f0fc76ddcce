"""The tokenizer component the torchtune tests name in their configs (``tune_tokenizer.tiny_tokenizer``).

torchtune 0.6.1 reads a Hugging Face ``tokenizer.json`` with ``HuggingFaceBaseTokenizer``, which lacks the
``pad_id`` and ``max_seq_len`` its recipes and text data sets read; this adds them. Imported inside torchtune's
venv only (the tests put this folder on ``PYTHONPATH`` of ``tune run``).
"""

from __future__ import annotations

from pathlib import Path

from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer

__all__ = ["tiny_tokenizer"]


class _TinyTokenizer(HuggingFaceBaseTokenizer):
    def __init__(self, path: str, max_seq_len: int | None):
        folder = Path(path)
        super().__init__(
            str(folder / "tokenizer.json"), tokenizer_config_json_path=str(folder / "tokenizer_config.json")
        )
        self.pad_id = self.tokenizer.token_to_id(self.config["pad_token"])
        self.max_seq_len = max_seq_len


def tiny_tokenizer(path: str, max_seq_len: int | None = None) -> HuggingFaceBaseTokenizer:
    """The tokenizer saved in ``path`` (a ``save_pretrained`` folder with a ``pad_token``), as torchtune uses it."""
    return _TinyTokenizer(path, max_seq_len)
