"""Stop strings over a stream of text pieces: emit what is safe, hold back what might match."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.word = ""  # the stop string that matched

    def feed(self, piece: str) -> str:
        """Text that can be emitted now; sets ``stopped`` when a stop string completes."""
        if not self.stops:
            return piece
        text = self._held + piece
        first = -1
        for s in self.stops:
            i = text.find(s)
            if i != -1 and (first == -1 or i < first):
                first, self.word = i, s
        if first != -1:
            self._held = ""
            self.stopped = True
            return text[:first]
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
