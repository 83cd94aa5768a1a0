"""The two measurements: wall time of callables run interleaved, and bytes saved for backward."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Timing:
    """The timed runs of one callable, in seconds, in the order they ran."""

    runs_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


def time_interleaved(
    callables: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time every callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Each round calls every callable once, so slow drifts of the machine (frequency scaling,
    other load) spread over all of them instead of biasing whichever would have run last. The
    warm-up rounds go in the mapping's order; each timed round in an order of its own, shuffled
    by a generator of fixed seed (the same orders every run), so that no callable always follows
    the same one. What ran just before matters at small sizes: after a long pure-Python loop or
    a pause, the threads sleep and the caches are cold, and a sub-millisecond call takes up to
    twice as long (measured: the same S call 0.6 ms after itself, 1.3 ms after the naive loop);
    a fixed order, or a rotation of it (which keeps every callable's predecessor), would hand
    that cost to whichever implementation always came next. A run's time is ``clock()`` after
    the call minus ``clock()`` before it.

    Returns:
        For each name, a :class:`Timing` of its ``repeats`` timed runs.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        for fn in callables.values():
            fn()
    runs: dict[str, list[float]] = {name: [] for name in callables}
    order = list(callables.items())
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name, fn in order:
            start = clock()
            fn()
            runs[name].append(clock() - start)
    return {name: Timing(tuple(times)) for name, times in runs.items()}


@dataclass(frozen=True)
class SavedBytes:
    """Bytes that autograd keeps for backward after one forward pass.

    ``total`` counts every saved storage; ``excluding_parameters`` leaves out the storages of
    the given parameters, which stay resident whether or not backward needs them, so it is the
    fair figure to compare implementations by.
    """

    total: int
    excluding_parameters: int


def saved_bytes(forward: Callable[[], object], parameters: Iterable[Tensor]) -> SavedBytes:
    """Count what ``forward()`` saves for backward, via ``saved_tensors_hooks``.

    Each distinct storage is counted once, by its full size in bytes: a tensor saved twice,
    or several views of one storage (``w.t()``, ``h0[k]``), keep exactly that storage alive.
    For a tensor that owns its storage this is ``numel() * element_size()``. Storages are told
    apart by address, which is sound because a saved storage lives as long as the graph that
    ``forward()`` is building.

    Only tensors saved through autograd's saved-tensor mechanism are seen (built-in ops'
    saved variables and ``ctx.save_for_backward``); tensors a custom ``Function`` stashes as
    plain ``ctx`` attributes are not.
    """
    sizes: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    total = sum(sizes.values())
    in_parameters = sum(n for ptr, n in sizes.items() if ptr in parameter_storages)
    return SavedBytes(total=total, excluding_parameters=total - in_parameters)
