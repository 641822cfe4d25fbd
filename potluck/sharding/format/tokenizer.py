"""Tokenization from a GGUF's own vocabulary through llama.cpp (``Llama(vocab_only=True)``).

Using llama.cpp's tokenizer keeps token ids identical to the llama.cpp backend and to the
reference in the equivalence tests; ``vocab_only`` loads no weights.
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path

from potluck.errors import ModelError, ModelFileError

log = logging.getLogger(__name__)


class GGUFTokenizer:
    """Tokenizer and detokenizer of a GGUF file.

    Raises:
        ModelError: llama-cpp-python is missing.
        ModelFileError: llama.cpp cannot read the vocabulary.
    """

    def __init__(self, path: Path) -> None:
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelError("llama-cpp-python is not installed: run scripts/install.sh") from exc
        try:
            self._llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(f"llama.cpp could not read the vocabulary of {path}: {exc}") from exc
        vocab = self._llm._model.vocab
        n_vocab = self._llm.n_vocab()
        self.eog_ids = {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self.bos_text = self._llm.detokenize([self._llm.token_bos()], special=True).decode(errors="replace")
        self.eos_text = self._llm.detokenize([self._llm.token_eos()], special=True).decode(errors="replace")

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens parsed; no second BOS if the text starts with one)."""
        if add_bos and self.bos_text and text.startswith(self.bos_text):
            add_bos = False
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token contributes to the text."""
        return bytes(self._llm.detokenize([token]))

    def detokenize(self, tokens: list[int]) -> str:
        """Text of a token sequence (invalid UTF-8 replaced)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return "".join(decoder.decode(self.token_bytes(t)) for t in tokens) + decoder.decode(b"", final=True)

    def close(self) -> None:
        self._llm.close()
