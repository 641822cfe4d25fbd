"""GBNF grammars on llama.cpp: check one compiles before it reaches the sampler.

llama.cpp's grammar sampler (``llama_sampler_init_grammar``, ``grammars/README.md`` in llama.cpp)
returns NULL for a grammar it cannot parse; handing that to a sampler chain would crash the
process. A grammar can arrive from a peer over RPC, so every one is compiled once here first.
"""

from __future__ import annotations

from typing import Any

from potluck.errors import RequestError

MAX_GRAMMAR_CHARS = 256 << 10


def checked_grammar(vocab: Any, gbnf: str) -> Any:
    """A ``llama_cpp.LlamaGrammar`` for ``gbnf``, known to compile for ``vocab``.

    Args:
        vocab: the model's ``llama_vocab`` pointer (``Llama._model.vocab``).
        gbnf: the grammar text; its start rule is ``root``.

    Raises:
        RequestError: the grammar is too long or llama.cpp cannot parse it (``param="grammar"``).
    """
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise RequestError(f"grammar of {len(gbnf)} characters exceeds {MAX_GRAMMAR_CHARS}", param="grammar")
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise RequestError("llama.cpp could not parse the output grammar (GBNF)", param="grammar")
    llama_cpp.llama_sampler_free(sampler)
    return LlamaGrammar.from_string(gbnf)
