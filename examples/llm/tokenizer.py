"""A toy tokenizer: one token per whitespace-separated word, and a pronounceable word per id.

Real tokenizers need a vocabulary file; this one needs nothing and is exact about counts, which
is what a load test cares about: a prompt of N words is N tokens, and a prompt given as token
ids (as OpenAI's completions API allows) is taken as is.
"""

from __future__ import annotations

import hashlib

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]  # 70


class Tokenizer:
    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError("vocab_size must be at least 2")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [self._id(word) for word in text.split()]

    def _id(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.vocab_size

    def decode(self, token: int) -> str:
        """The text of one generated token: a space and a made-up word."""
        parts = []
        n = int(token)
        while True:
            n, r = divmod(n, len(SYLLABLES))
            parts.append(SYLLABLES[r])
            if n == 0:
                break
        return " " + "".join(reversed(parts))
