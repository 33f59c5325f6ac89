"""Tokenize with a GGUF model's own vocabulary through llama.cpp (vocab only: no weights load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.learning.errors import UnsupportedModel


class Tokenizer:
    """The tokenizer of one GGUF file, exactly as llama.cpp tokenizes for serving."""

    def __init__(self, path: str | Path) -> None:
        import llama_cpp

        try:
            self._llm: Any = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        except Exception as exc:
            raise UnsupportedModel(
                f"llama.cpp cannot read the vocabulary of {path}: {exc}"
            ) from exc
        bos = int(self._llm.token_bos())
        self.bos: int | None = bos if bos != -1 and self._llm._model.add_bos_token() else None
        eos = int(self._llm.token_eos())
        self.eos: int | None = eos if eos != -1 else None
        self.n_vocab = int(self._llm.n_vocab())

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Return the token ids of `text` (special tokens parsed), with BOS when asked and used."""
        body = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
        head = [self.bos] if bos and self.bos is not None else []
        return head + [int(t) for t in body]

    def decode(self, tokens: list[int]) -> str:
        """Return the text of `tokens` (invalid UTF-8 replaced)."""
        return bytes(self._llm.detokenize(tokens)).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the vocabulary."""
        self._llm.close()
