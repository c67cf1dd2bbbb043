"""Turns streamed token ids into streamed text, and ends the text at a stop string.

Text is decoded incrementally (a prefix window, as TGI and vLLM do, so a multi-byte character
split across tokens is never emitted half-done) and any tail that could still grow into a stop
string is held back until it cannot.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (not yet cut at a stop string)
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that can be shown now ('' if none)."""
        self.ids.extend(token_ids)
        new = self._pending_text()
        if new and not new.endswith("\ufffd"):
            self.text += new
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The request ended: return whatever was held back, an unfinished character included."""
        self.text += self._pending_text()
        self._prefix_offset = self._read_offset = len(self.ids)
        return self._release(final=True)

    def _pending_text(self) -> str:
        """Text the tokens after `_read_offset` add, decoded with a few tokens of left context (a
        token's text can depend on its neighbours)."""
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        return full[len(prefix):]

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stop:
            search_from = max(0, self._emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end -= self._held_back()
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
