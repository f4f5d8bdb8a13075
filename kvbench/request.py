"""The unit of work every trace produces and every engine replays."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


class Request:
    """One request of a trace.

    Token ids are real: two requests that share a prefix share the ids of that prefix, so
    prefix caching in the strategies is exercised for real, not by a flag.

    `output` holds the ids a replay emits (the trace's "answer"), so every engine and every
    strategy sees the same tokens; its length is the request's output length.
    The request's KV footprint when finished is `len(prompt) + len(output) - 1` slots: the last
    output token is produced but never fed back, so it never gets K/V.

    Ids are normally given (``Request(id, arrival_s, prompt, output)``). A request that the
    scheduler will reject for its length (a prompt or output alone longer than the run's
    max_model_len) is made with :meth:`unbuilt`: its lengths are known, its ids are made by
    ``build()`` only if something reads them, so a 10^7-token row costs nothing until then.
    Rejection reads only ``prompt_len``, ``output_len`` and ``kv_len``.
    """

    __slots__ = ("id", "arrival_s", "session", "source", "meta", "prompt_len", "output_len", "kv_len",
                 "_tokens", "_build", "_rebuild", "_drawn", "__weakref__")  # (a LazyTrace's weak cache)

    def __init__(self, id: int, arrival_s: float, prompt: np.ndarray, output: np.ndarray,
                 session: int | None = None, source: str = "", meta: dict | None = None) -> None:
        self._set(id, arrival_s, int(prompt.shape[0]), int(output.shape[0]), session, source, meta)
        # One buffer for all ids; `prompt` and `output` are views of it, so an engine that
        # samples (writes into `output`) is seen by every reader of `tokens`.
        self._tokens = np.concatenate([prompt, output]).astype(np.int32, copy=False)
        self._build = self._rebuild = None
        self._drawn = True

    @classmethod
    def unbuilt(cls, id: int, arrival_s: float, prompt_len: int, output_len: int,
                build: Callable[[], np.ndarray], session: int | None = None, source: str = "",
                meta: dict | None = None, drawn: bool = False) -> Request:
        """A request whose ids ``build() -> [prompt_len + output_len] int32`` makes on first read.

        `drawn`: its ids are already fixed by the trace (drawn from its shared streams, kept as a
        generator state and drawn again by `build`), so it counts as `built`; else (a row left
        for the scheduler to reject) they are made only if read."""
        self = cls.__new__(cls)
        self._set(id, arrival_s, int(prompt_len), int(output_len), session, source, meta)
        self._tokens = None
        self._build = self._rebuild = build
        self._drawn = drawn
        return self

    def _set(self, id, arrival_s, prompt_len, output_len, session, source, meta) -> None:
        if prompt_len < 1 or output_len < 1:
            raise ValueError(f"request {id} ({source}): needs >= 1 prompt and >= 1 output token")
        self.id, self.arrival_s, self.session, self.source = id, arrival_s, session, source
        self.meta = {} if meta is None else meta
        self.prompt_len, self.output_len = prompt_len, output_len
        # slots the request occupies once its last token is produced (a plain field: read every step)
        self.kv_len = prompt_len + output_len - 1

    @property
    def built(self) -> bool:
        """Whether the ids exist yet, or are fixed by the trace's shared streams (`drawn`);
        reading tokens/prompt/output builds them."""
        return self._drawn or self._tokens is not None

    @property
    def tokens(self) -> np.ndarray:
        """[prompt_len + output_len] int32: prompt ++ output. Builds the ids on the first read."""
        if self._tokens is None:
            ids = np.asarray(self._build(), dtype=np.int32)
            if ids.shape != (self.prompt_len + self.output_len,):
                raise ValueError(f"request {self.id} ({self.source}): built {ids.shape} ids, "
                                 f"expected {self.prompt_len + self.output_len}")
            self._tokens, self._build = ids, None
        return self._tokens

    def forget(self) -> None:
        """Drop the ids of a request made `unbuilt` (its `build` is a pure function of the trace's
        seed): the next read builds them again, the same. A replay calls it when the request has
        left, on engines that never write into `output`, so that a run holds the ids of the
        requests in flight, not of the whole trace. No-op for a request given its ids."""
        if self._rebuild is not None:
            self._tokens, self._build = None, self._rebuild

    @property
    def prompt(self) -> np.ndarray:
        """[prompt_len] int32, a view of `tokens`."""
        return self.tokens[:self.prompt_len]

    @property
    def output(self) -> np.ndarray:
        """[output_len] int32, a view of `tokens` (an engine that samples writes here)."""
        return self.tokens[self.prompt_len:]

    def token_ids(self) -> np.ndarray:
        """prompt ++ output: the ids of every token the request will ever hold (no copy)."""
        return self.tokens

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, arrival_s={self.arrival_s}, prompt_len={self.prompt_len}, "
                f"output_len={self.output_len}, session={self.session}, source={self.source!r})")
