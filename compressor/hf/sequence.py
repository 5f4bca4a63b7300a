"""The state of one sequence — its prompt length N0 — kept where the sequence's other state is kept.

A plan's spans are ``S = span(N0 + length_offset)`` (:mod:`plans.span`), fixed once per sequence. N0 lives:

* on the sequence's cache, for any ``transformers.Cache`` (``DynamicCache``, a static cache, :class:`PlanCache`):
  the call that starts the sequence (``q_start == 0``) sets it to the real tokens of that call; the cache's own
  re-indexing operations (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``) re-index it
  with the cache's rows, and ``reset`` clears it (:func:`cache_sequence`);
* for generation without a cache (``generate(use_cache=False)``), in the ``compress_n0`` model kwarg that
  ``generate`` hands to every step: a :class:`SequenceState` with N0 unset, filled by the first forward, so every
  recomputation of the growing sequence uses the prompt's N0, as the cached run does
  (:mod:`compressor.hf.generation`);
* for a forward with neither: the real tokens of the call, unless declared with ``model(..., compress_n0=N)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plans.errors import CompressError

STATE_ATTR = "compress_sequence"


@dataclass
class SequenceState:
    """n0 (B,) long: each row's prompt length (real tokens of the sequence's first forward); None until set."""

    n0: torch.Tensor | None = None


def _reorder(n0: torch.Tensor, beam_idx) -> torch.Tensor:
    return n0.index_select(0, torch.as_tensor(beam_idx, device=n0.device).long())


def _select(n0: torch.Tensor, indices) -> torch.Tensor:
    return n0[torch.as_tensor(indices, device=n0.device)]


def _repeat(n0: torch.Tensor, repeats: int) -> torch.Tensor:
    return n0.repeat_interleave(int(repeats), dim=0)


_REINDEXING = {"reorder_cache": _reorder, "batch_select_indices": _select, "batch_repeat_interleave": _repeat}


@dataclass
class _Reindexing:
    """A cache's own re-indexing method followed by the same re-indexing of its :class:`SequenceState`.

    Set on the cache instance; holds the cache (not a bound method), so ``copy.deepcopy(cache)`` gives a copy whose
    re-indexing acts on the copy."""

    cache: object
    name: str

    def __call__(self, arg):
        getattr(type(self.cache), self.name)(self.cache, arg)
        state = self.cache.__dict__[STATE_ATTR]
        if state.n0 is not None:
            state.n0 = _REINDEXING[self.name](state.n0, arg)


@dataclass
class _Reset:
    cache: object

    def __call__(self):
        type(self.cache).reset(self.cache)
        self.cache.__dict__[STATE_ATTR].n0 = None


def cache_sequence(cache) -> SequenceState:
    """The :class:`SequenceState` of ``cache`` (attached on first use, with the cache's re-indexing and reset wired
    to it)."""
    state = cache.__dict__.get(STATE_ATTR)
    if state is None:
        state = cache.__dict__[STATE_ATTR] = SequenceState()
        for name in _REINDEXING:
            if hasattr(type(cache), name):
                setattr(cache, name, _Reindexing(cache, name))
        if hasattr(type(cache), "reset"):
            cache.reset = _Reset(cache)
    return state


def _as_rows(n0, b: int, device) -> torch.Tensor:
    t = torch.as_tensor(n0, device=device).long().reshape(-1)
    if t.numel() == 1:
        return t.expand(b).clone()
    if t.numel() != b:
        raise CompressError(f"compress_n0 has {t.numel()} values for a batch of {b} rows (give one, or one per row)")
    return t


def prompt_lengths(cache, q_start: int, n_now: torch.Tensor, declared=None) -> torch.Tensor:
    """N0 (B,) for one attention call, ``n_now`` (B,) being the real tokens of each row once the call is done.

    ``declared`` (the ``compress_n0`` kwarg): a number or (B,) tensor fixes N0 (and the cache's state); a
    :class:`SequenceState` (uncached generation) is filled once and then kept. Otherwise the cache's state, set by
    the call that starts the sequence (``q_start == 0``); without a cache, ``n_now``.

    Raises CompressError when a cache's state has another number of rows than the call (a re-indexing the cache
    did not see)."""
    b, dev = n_now.shape[0], n_now.device
    if declared is not None and not isinstance(declared, SequenceState):
        n0 = _as_rows(declared, b, dev)
        if cache is not None:
            cache_sequence(cache).n0 = n0
        return n0
    if isinstance(declared, SequenceState):
        state = declared
    elif cache is None:
        return n_now
    else:
        state = cache_sequence(cache)
        if q_start == 0:
            state.n0 = None
    if state.n0 is None:
        state.n0 = n_now.clone()
    if state.n0.shape[0] != b:
        raise CompressError(f"this sequence's prompt lengths are known for {state.n0.shape[0]} rows but the call has "
                            f"{b}: the cache's rows were changed by an operation that did not re-index its state")
    return state.n0.to(dev)
