"""Race checks for Triton kernels run by Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs a launch's programs one after another, so two programs that store to one
address (on a GPU, where they run at once: a lost update, or whichever writes last wins) still
give the right answer under it, in every test. Two context managers make such races visible on
a CPU:

- ``record_stores()`` logs, per program, the bytes each store writes (a masked store: only its
  active lanes) and the bytes each load reads. At the end of every launch it raises
  ``RaceError`` if two programs stored to one byte, or if one program read a byte that another
  program of the same launch stored: on a GPU that read may see the old or the new value,
  whatever the interpreter's order showed. A program reading back what it stored itself is no
  race (the loss kernel accumulates its own dW_d rows that way). It also raises it for any byte
  read or stored outside every tensor argument (each tensor's span through its strides): on
  a GPU, an out-of-bounds access; in the interpreter, often a read of memory that happens to
  hold something.
- ``reverse_grid()`` runs a launch's programs in reverse order, so a last-writer-wins race that
  the interpreter's own order hides changes an oracle test's result instead.

Atomic read-modify-writes (``tl.atomic_add``, ``tl.atomic_cas``) are not recorded: sharing an
address is what they are for. None of the package's kernels uses them.

Both patch Triton's interpreter, here and nowhere else, for the duration of the ``with`` block.
Every load and store of interpreted code goes through ``InterpreterBuilder.create_masked_load``
and ``create_masked_store`` (plain, block-pointer and descriptor accesses alike), and
``GridExecutor.__call__`` runs one launch by calling ``set_grid_idx(x, y, z)`` for each program
in nested loops: true of triton 3.6 to 3.9, checked by ``_interpreter()`` before patching.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import triton

# The triton releases whose interpreter these patches were checked against (inclusive).
_TESTED = ((3, 6), (3, 9))

# Conflicts listed in a RaceError's message (the count says how many there were).
_SHOWN = 4


class RaceError(AssertionError):
    """Two programs of one launch stored to one address, or one read what another stored; or a
    program accessed a byte outside every tensor argument of the launch (out of bounds)."""


@dataclasses.dataclass
class Launch:
    """What ``record_stores`` saw of one launch (all of it race-free, or it would have raised)."""

    kernel: str
    grid: tuple[int, int, int]
    order: list[tuple[int, int, int]]  # programs that accessed memory, in the order they ran
    stored_bytes: int  # distinct bytes stored (with no race: each by one program)
    loads: list[tuple[tuple[int, int, int], np.ndarray]]  # per program, the distinct byte addresses it read

    def readers(self, t: torch.Tensor) -> set[tuple[int, int, int]]:
        """The programs that read any byte of ``t`` (masked-off lanes read nothing)."""
        lo, hi = _byte_span(t)
        return {pid for pid, addrs in self.loads if ((addrs >= lo) & (addrs < hi)).any()}


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """(first byte, one past the last byte) of ``t`` through its strides; empty: (p, p)."""
    elements = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + elements * t.element_size()


def _interpreter():
    """Triton's interpreter module, after checking that it works as the patches assume."""
    version = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    executor = getattr(interpreter, "GridExecutor", None)
    usable = (
        _TESTED[0] <= version <= _TESTED[1]
        and builder is not None
        and executor is not None
        and all(hasattr(builder, n) for n in ("create_masked_load", "create_masked_store", "set_grid_idx"))
        and "set_grid_idx(x, y, z)" in inspect.getsource(executor.__call__)
    )
    if not usable:
        raise RuntimeError(
            f"tests/triton_interp_tools.py was written for the interpreter of triton "
            f"{_TESTED[0][0]}.{_TESTED[0][1]} to {_TESTED[1][0]}.{_TESTED[1][1]} (every load and store through "
            "InterpreterBuilder.create_masked_load / create_masked_store, the grid walked by "
            f"GridExecutor.__call__ with set_grid_idx(x, y, z)); triton {triton.__version__} differs: check "
            "triton/runtime/interpreter.py and update the patches and _TESTED"
        )
    return interpreter


def _swap(owner, name: str, new) -> Callable[[], None]:
    """Set ``owner.name = new``; return what undoes it (nested patches undo in reverse order)."""
    own = vars(owner)
    had, old = name in own, own.get(name)
    setattr(owner, name, new)

    def undo() -> None:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)

    return undo


def _active_bytes(ptrs, mask) -> np.ndarray:
    """The byte addresses an access touches: each active lane's element, all of its bytes."""
    addrs = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addrs = addrs[np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)]
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    return (addrs.reshape(-1, 1) + np.arange(size, dtype=np.uint64)).reshape(-1)


def _pairs(chunks: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(address, program) pairs without repeats, sorted by address: parallel arrays."""
    if not chunks:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    addrs = np.concatenate([a for _, a in chunks])
    progs = np.concatenate([np.full(a.shape, p, np.int64) for p, a in chunks])
    order = np.lexsort((progs, addrs))
    addrs, progs = addrs[order], progs[order]
    keep = np.ones(addrs.shape, bool)
    keep[1:] = (addrs[1:] != addrs[:-1]) | (progs[1:] != progs[:-1])
    return addrs[keep], progs[keep]


def _first_distinct(lines) -> list[str]:
    """The first ``_SHOWN`` distinct lines (the bytes of one element give one line each)."""
    shown: list[str] = []
    for line in lines:
        if line not in shown:
            shown.append(line)
            if len(shown) == _SHOWN:
                break
    return shown


class _LaunchLog:
    """The accesses of one launch, per program, and the race check at its end."""

    def __init__(self, kernel: str, names: list[str], values: list, grid_dim: Callable[[], tuple]):
        self.kernel = kernel
        # Tensor arguments by name, to say which buffer and element a conflicting address is.
        self.tensors = [(n, v) for n, v in zip(names, values) if isinstance(v, torch.Tensor)]
        self.grid_dim = grid_dim
        self.order: list[tuple[int, int, int]] = []
        self.current: Optional[tuple[int, int, int]] = None
        self.pending: dict[str, list[np.ndarray]] = {"store": [], "load": []}
        self.done: dict[str, list[tuple[int, np.ndarray]]] = {"store": [], "load": []}

    def access(self, kind: str, pid: tuple[int, int, int], ptrs, mask) -> None:
        if pid != self.current:
            self._flush()
            self.current = pid
            self.order.append(pid)
        self.pending[kind].append(_active_bytes(ptrs, mask))

    def _flush(self) -> None:
        # One program's accesses, deduplicated when it ends: a kernel rereads its inputs often.
        if self.current is None:
            return
        _, gy, gz = self.grid_dim()
        x, y, z = self.current
        linear = (x * gy + y) * gz + z
        for kind, chunks in self.pending.items():
            if chunks:
                self.done[kind].append((linear, np.unique(np.concatenate(chunks))))
            chunks.clear()

    def _program(self, linear: int) -> tuple[int, int, int]:
        _, gy, gz = self.grid_dim()
        return (linear // (gy * gz), (linear // gz) % gy, linear % gz)

    def _spans(self) -> list[tuple[str, torch.Tensor, int, int]]:
        """(name, tensor, first byte, one past its last byte) of each tensor argument."""
        return [(name, t, *_byte_span(t)) for name, t in self.tensors]

    def _outside(self, addrs: np.ndarray) -> np.ndarray:
        """Which of ``addrs`` lie in no tensor argument (an access out of bounds)."""
        spans = sorted((lo, hi) for _, _, lo, hi in self._spans() if hi > lo)
        if not spans:
            return np.ones(addrs.shape, bool)
        starts = np.array([lo for lo, _ in spans], np.uint64)
        reach = np.maximum.accumulate(np.array([hi for _, hi in spans], np.uint64))  # spans may nest
        idx = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        return (idx < 0) | (addrs >= reach[np.maximum(idx, 0)])

    def _where(self, addr: int) -> str:
        for name, t, lo, hi in self._spans():
            if lo <= addr < hi:
                offset = (addr - lo) // t.element_size()
                if t.is_contiguous():
                    return f"{name}[{', '.join(str(int(i)) for i in np.unravel_index(offset, tuple(t.shape)))}]"
                return f"{name} + {offset} elements"
        return f"address {addr:#x} (in no tensor argument)"

    def finish(self) -> Launch:
        self._flush()
        s_addr, s_prog = _pairs(self.done["store"])
        l_addr, l_prog = _pairs(self.done["load"])
        problems = []

        # Write-write: one address among the stores of two programs.
        shared = np.flatnonzero(s_addr[1:] == s_addr[:-1])
        if shared.size:
            lines = _first_distinct(
                f"{self._where(int(s_addr[i]))} stored by programs {self._program(int(s_prog[i]))} "
                f"and {self._program(int(s_prog[i + 1]))}"
                for i in shared
            )
            problems.append(f"{np.unique(s_addr[shared]).size} byte(s) stored by more than one program, e.g.\n    "
                            + "\n    ".join(lines))

        # Read-write: a program reads a byte that another program stores. Writers of a byte are
        # s_prog[lo:hi]; name the first, or the second when the first is the reader itself.
        lo = np.searchsorted(s_addr, l_addr, side="left")
        hi = np.searchsorted(s_addr, l_addr, side="right")
        if s_prog.size:
            last = s_prog.size - 1
            first, second = s_prog[np.minimum(lo, last)], s_prog[np.minimum(lo + 1, last)]
            writer = np.where((first == l_prog) & (hi - lo > 1), second, first)
            cross = (hi > lo) & (writer != l_prog)
        else:
            writer, cross = l_prog, np.zeros(l_prog.shape, bool)
        if cross.any():
            lines = _first_distinct(
                f"{self._where(int(l_addr[i]))} read by program {self._program(int(l_prog[i]))}, stored by "
                f"program {self._program(int(writer[i]))}"
                for i in np.flatnonzero(cross)
            )
            problems.append(f"{np.unique(l_addr[cross]).size} byte(s) read by one program and stored by another, "
                            "e.g.\n    " + "\n    ".join(lines))

        # Out of bounds: a byte no tensor argument holds (masked-off lanes access nothing).
        for kind, addrs, progs in (("stored", s_addr, s_prog), ("read", l_addr, l_prog)):
            out = np.flatnonzero(self._outside(addrs))
            if out.size:
                lines = _first_distinct(
                    f"address {int(addrs[i]):#x} {kind} by program {self._program(int(progs[i]))}" for i in out
                )
                problems.append(f"{np.unique(addrs[out]).size} byte(s) {kind} outside every tensor argument, e.g.\n    "
                                + "\n    ".join(lines))

        grid = tuple(self.grid_dim())
        if problems:
            raise RaceError(f"{self.kernel} (grid {grid}): " + "\n  ".join(problems))
        return Launch(self.kernel, grid, list(self.order), int(np.unique(s_addr).size),
                      [(self._program(p), a) for p, a in self.done["load"]])


@contextlib.contextmanager
def record_stores() -> Iterator[list[Launch]]:
    """Check every interpreted launch in the block for races between its programs.

    Yields the list of ``Launch`` records, filled as launches end; raises ``RaceError`` at the
    end of a launch with a race (naming the buffer, the element and the programs), and
    ``AssertionError`` at the end of a block that ran no interpreted launch (it checked
    nothing: the kernels were compiled, or the block launched none).
    """
    interp = _interpreter()
    builder = interp.interpreter_builder
    executor = interp.GridExecutor
    launches: list[Launch] = []
    log: list[Optional[_LaunchLog]] = [None]  # the launch running now, if any

    run_launch = executor.__call__
    masked_load = builder.create_masked_load
    masked_store = builder.create_masked_store

    def launch(self, *args, **kwargs):
        names = list(self.arg_names[: len(args)]) + list(kwargs)
        outer, log[0] = log[0], _LaunchLog(
            getattr(self.fn, "__name__", "kernel"), names, [*args, *kwargs.values()], lambda: builder.grid_dim
        )
        try:
            result = run_launch(self, *args, **kwargs)
            launches.append(log[0].finish())
            return result
        finally:
            log[0] = outer

    def load(ptrs, mask, *rest, **kw):
        if log[0] is not None:
            log[0].access("load", tuple(builder.grid_idx), ptrs, mask)
        return masked_load(ptrs, mask, *rest, **kw)

    def store(ptrs, value, mask, *rest, **kw):
        if log[0] is not None:
            log[0].access("store", tuple(builder.grid_idx), ptrs, mask)
        return masked_store(ptrs, value, mask, *rest, **kw)

    launch.__wrapped__ = run_launch  # inspect.getsource (the version check) reads the original
    undo = [
        _swap(executor, "__call__", launch),
        _swap(builder, "create_masked_load", load),
        _swap(builder, "create_masked_store", store),
    ]
    try:
        yield launches
    finally:
        for u in reversed(undo):
            u()
    if not launches:
        raise AssertionError("record_stores: no interpreted Triton launch ran in this block, so nothing was checked")


@contextlib.contextmanager
def reverse_grid() -> Iterator[None]:
    """Run every interpreted launch in the block with its programs in reverse order.

    The interpreter's loops visit each (x, y, z) once, in order; mapping each to
    (nx - 1 - x, ny - 1 - y, nz - 1 - z) visits each program once, in exactly the reverse order.
    """
    builder = _interpreter().interpreter_builder
    set_grid_idx = builder.set_grid_idx

    def mirrored(x, y, z):
        nx, ny, nz = builder.grid_dim
        return set_grid_idx(nx - 1 - x, ny - 1 - y, nz - 1 - z)

    undo = _swap(builder, "set_grid_idx", mirrored)
    try:
        yield
    finally:
        undo()
