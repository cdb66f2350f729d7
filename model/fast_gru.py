"""A faster inference forward for :class:`~model.gru.PriceGRU`, with the same weights.

``nn.GRU`` on CPU runs a generic kernel that does not know the input is one number per
step. Here the single-layer GRU is written out cell by cell (PyTorch's gate order r, z, n)::

    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h  =  n + z * (h - n)

With ``input_size == 1`` the input projection ``W_i x`` is a broadcast, not a matmul, and
``b_hr``/``b_hz`` fold into the input bias; each step is then one ``[B, H] @ [H, 3H]``
matmul (``addmm``) plus element-wise gate math. :class:`FastGRUForward` runs that loop
as one TorchScript function (:func:`tiled_cell_loop`), and optionally compiles the step
with ``torch.compile`` (inductor fuses the gate math of each step into one C++ kernel) in
a background thread, serving the TorchScript loop until the compiled step is ready.
Models it does not cover (``num_layers > 1``) fall back to the module's own forward.

Why TorchScript: the daemon runs the forward in a worker thread while its event loop
decodes and publishes in the main thread. An eager loop is ~600 small ops per batch, and
each op takes the GIL back from the event loop, which costs up to a switch interval every
time; the scripted loop runs all steps of all tiles inside one call that holds no GIL.
On one thread it also walks the batch in tiles of :data:`TILE_ROWS` rows, so each tile's
gate tensors stay in cache.

FLOPs per window (multiply-add = 2), hidden size H, window T, input size 1::

    T * (3H*H*2        hidden projection, h @ W_hh^T
         + 3H*2        input projection x * W_ih + b  (broadcast)
         + 3H          hidden bias of the n gate / gate adds
         + ~10H)       sigmoid/tanh/products of the update (counted as 1 FLOP each)
    + 2H + 1           the linear head

For H=64, T=60: 60 * (24,576 + 384 + 192 + 640) + 129 ~= 1.55 MFLOP; :func:`gru_flops`
computes it.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from model.gru import PriceGRU

logger = logging.getLogger(__name__)

CompileState = Literal["off", "compiling", "ready", "failed"]


def gru_flops(hidden_size: int = 64, window_length: int = 60) -> int:
    """Floating-point operations of one PriceGRU forward for one window (see module doc)."""
    h = hidden_size
    per_step = 3 * h * h * 2 + 3 * h * 2 + 3 * h + 10 * h
    return window_length * per_step + 2 * h + 1


def supports(model: PriceGRU) -> bool:
    """True when the explicit cell loop reproduces this model (one layer, input size 1)."""
    gru = model.gru
    return (
        gru.num_layers == 1
        and gru.input_size == 1
        and gru.batch_first
        and not gru.bidirectional
        and gru.bias
        and getattr(gru, "proj_size", 0) == 0
    )


def gru_step(
    x_t: torch.Tensor,
    h: torch.Tensor,
    w_i: torch.Tensor,
    b_i: torch.Tensor,
    w_hh_t: torch.Tensor,
    b_h: torch.Tensor,
) -> torch.Tensor:
    """One GRU step: ``x_t`` [B, 1], ``h`` [B, H] -> next ``h`` [B, H].

    ``w_i`` [3H] is W_ih[:, 0]; ``b_i`` [3H] is b_ih with b_hr and b_hz folded in;
    ``w_hh_t`` [H, 3H] is W_hh transposed; ``b_h`` [3H] is zero but for the n gate's
    hidden bias b_hn, so the matmul adds it. Seven ops, fused where PyTorch has a fused op
    (addcmul, addmm, lerp) and in place where a temporary dies at once: on one thread the
    step is op-overhead bound, and this form is ~15 % faster than the gate math written
    out term by term (tickcast bench's forward at 256-row tiles: ~48k vs ~41k windows/s).
    """
    hidden = h.shape[1]
    gi = torch.addcmul(b_i, x_t, w_i)
    gh = torch.addmm(b_h, h, w_hh_t)
    rz = gh[:, : 2 * hidden].add_(gi[:, : 2 * hidden]).sigmoid_()
    n = torch.addcmul(gi[:, 2 * hidden :], rz[:, :hidden], gh[:, 2 * hidden :]).tanh_()
    return torch.lerp(n, h, rz[:, hidden:])  # n + z * (h - n)


def gru_step_unfused(
    x_t: torch.Tensor,
    h: torch.Tensor,
    w_i: torch.Tensor,
    b_i: torch.Tensor,
    w_hh_t: torch.Tensor,
    b_h: torch.Tensor,
) -> torch.Tensor:
    """:func:`gru_step` written term by term, without in-place ops: what ``torch.compile``
    gets, since inductor fuses the gate math into one kernel itself and in-place updates
    of views only hinder it (both compiled, batch 2048 on 2 threads, runs interleaved:
    44,000-60,000 windows/s for this form, 34,000-38,000 for the fused-op one)."""
    hidden = h.shape[1]
    gi = x_t * w_i + b_i
    gh = h @ w_hh_t + b_h
    rz = torch.sigmoid(gi[:, : 2 * hidden] + gh[:, : 2 * hidden])
    r = rz[:, :hidden]
    z = rz[:, hidden:]
    n = torch.tanh(gi[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
    return n + z * (h - n)


Step = Callable[..., torch.Tensor]
_COMPILE_LOCK = threading.Lock()  # guards the per-process compiled and scripted forwards


def first_hidden(
    x_0: torch.Tensor, w_i: torch.Tensor, b_i: torch.Tensor, b_h: torch.Tensor
) -> torch.Tensor:
    """Step 0: h = 0, so the hidden projection is zero and only the bias ``b_h`` survives."""
    hidden = b_h.shape[0] // 3
    gi = torch.addcmul(b_i, x_0, w_i)
    z = torch.sigmoid(gi[:, hidden : 2 * hidden])
    n = torch.tanh(gi[:, 2 * hidden :] + torch.sigmoid(gi[:, :hidden]) * b_h[2 * hidden :])
    return n - z * n


def head(
    h: torch.Tensor,
    x_last: torch.Tensor,
    head_w: torch.Tensor,
    head_b: torch.Tensor,
    residual: bool,
) -> torch.Tensor:
    """The linear head on the last hidden state (plus the last input when residual)."""
    out = h @ head_w + head_b
    if residual:
        out = out + x_last
    return out


def cell_loop(
    x: torch.Tensor,
    w_i: torch.Tensor,
    b_i: torch.Tensor,
    w_hh_t: torch.Tensor,
    b_h: torch.Tensor,
    head_w: torch.Tensor,
    head_b: torch.Tensor,
    residual: bool,
    step: Step = gru_step,
) -> torch.Tensor:
    """The GRU + head on scaled inputs ``x`` [B, T] float32 -> [B] float32 (scaled)."""
    h = first_hidden(x[:, 0:1], w_i, b_i, b_h)
    for t in range(1, x.shape[1]):
        h = step(x[:, t : t + 1], h, w_i, b_i, w_hh_t, b_h)
    return head(h, x[:, -1], head_w, head_b, residual)


# One thread: a 256-row tile's [tile, 3H] gate tensors stay in L2 (tickcast bench on a
# 2-core AVX-512 VM: 44,000 windows/s in 256-row tiles, 29,000 for 1,024 rows at once).
# More threads: every op needs enough rows per thread, so the batch goes in whole.
TILE_ROWS = 256


def tiled_cell_loop(
    x: torch.Tensor,
    w_i: torch.Tensor,
    b_i: torch.Tensor,
    w_hh_t: torch.Tensor,
    b_h: torch.Tensor,
    head_w: torch.Tensor,
    head_b: torch.Tensor,
    residual: bool,
    tile_rows: int,
) -> torch.Tensor:
    """:func:`cell_loop` with :func:`gru_step`, ``tile_rows`` rows at a time (scriptable)."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], tile_rows):
        tile = x[start : start + tile_rows]
        h = first_hidden(tile[:, 0:1], w_i, b_i, b_h)
        for t in range(1, tile.shape[1]):
            h = gru_step(tile[:, t : t + 1], h, w_i, b_i, w_hh_t, b_h)
        out[start : start + tile.shape[0]] = head(h, tile[:, -1], head_w, head_b, residual)
    return out


_SCRIPTED: list[Callable[..., torch.Tensor] | None] = []


def scripted_tiled_cell_loop() -> Callable[..., torch.Tensor] | None:
    """:func:`tiled_cell_loop` under TorchScript, scripted once per process.

    None when this PyTorch cannot script it (TorchScript is deprecated upstream in favour
    of torch.compile, whose compiled code still returns to Python between kernels): the
    caller then runs the same loop eagerly.
    """
    with _COMPILE_LOCK:
        if not _SCRIPTED:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # the deprecation notice
                    _SCRIPTED.append(torch.jit.script(tiled_cell_loop))
            except Exception as exc:  # any failure leaves the eager loop serving
                logger.warning("TorchScript unavailable (%s); the GRU loop runs eagerly", exc)
                _SCRIPTED.append(None)
        return _SCRIPTED[0]


def tile_rows_for(threads: int) -> int:
    """Rows per tile for ``threads`` intra-op threads (see :data:`TILE_ROWS`)."""
    return TILE_ROWS if threads == 1 else 1 << 30


_COMPILED_STEPS: dict[tuple[str, str | None], Step] = {}


def compiled_step(device: torch.device, mode: str | None = None) -> Step:
    """``torch.compile(gru_step)`` with a dynamic batch dimension, compiled once per process.

    The weights are arguments, not constants, so every checkpoint (hot swaps included)
    shares one compiled step; the first call with a new shape family compiles.
    """
    key = (device.type, mode)
    with _COMPILE_LOCK:
        step = _COMPILED_STEPS.get(key)
        if step is None:
            step = torch.compile(gru_step_unfused, mode=mode, dynamic=True, fullgraph=True)
            _COMPILED_STEPS[key] = step
        return step


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value.detach()


CompileUnit = Literal["step", "loop"]


class FastGRUForward:
    """Scaled windows [B, T, 1] -> scaled predictions [B], like ``PriceGRU.forward``.

    ``compile`` names what ``torch.compile`` compiles, in a daemon thread, while calls
    keep running the eager loop until it is ready (and for good if it fails):

    * ``"step"``: one GRU step, dynamic batch dimension, shared by every model in the
      process; a few seconds to compile, the 60-step loop stays in Python.
    * ``"loop"``: the whole unrolled 60-step forward, static shapes, one compilation per
      batch-size bucket (batches are zero-padded up to a bucket); fastest per call but
      minutes of C++ compilation on a small machine.

    Until then (or without ``compile``) calls run :func:`tiled_cell_loop`, scripted
    unless ``script=False``. Those keep no state between calls, so several threads may
    call at once; the compiled paths are meant for one caller.
    """

    def __init__(
        self,
        model: PriceGRU,
        *,
        compile: CompileUnit | None = None,
        compile_mode: str | None = None,
        buckets: tuple[int, ...] = (256, 1024, 4096),
        script: bool = True,
    ) -> None:
        self.model = model
        self.supported = supports(model)
        self.residual = model.config.residual
        self.window_length = model.config.window_length
        self.compile_unit = compile
        self.buckets = tuple(sorted(buckets))
        self.compile_mode = compile_mode
        self.compile_state: CompileState = "off"
        self.compile_seconds: float | None = None
        self.compile_error: str | None = None
        self._loop: Callable[..., torch.Tensor] | None = None
        self._step: Step | None = None
        self._scripted: Callable[..., torch.Tensor] | None = None
        self._ready = threading.Event()
        if not self.supported:
            return
        if script:
            self._scripted = scripted_tiled_cell_loop()
        gru = model.gru
        hidden = gru.hidden_size
        with torch.no_grad():
            w_ih, w_hh, b_ih, b_hh = (
                _tensor(gru, name)
                for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
            )
            b_i = b_ih.clone()
            b_i[: 2 * hidden] += b_hh[: 2 * hidden]
            b_h = torch.zeros_like(b_hh)
            b_h[2 * hidden :] = b_hh[2 * hidden :]
            self._params = (
                w_ih[:, 0].contiguous(),
                b_i.contiguous(),
                w_hh.t().contiguous(),
                b_h,
                model.head.weight.detach()[0].contiguous(),
                model.head.bias.detach()[0].clone(),
            )
        self.device = self._params[0].device
        if compile is not None:
            self.compile_state = "compiling"
            threading.Thread(target=self._compile, name="tickcast-compile-gru", daemon=True).start()

    # ------------------------------------------------------------------ compile
    def _compile(self) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                if self.compile_unit == "step":
                    step = compiled_step(self.device, self.compile_mode)
                    # Two sizes: the first compiles, the second proves the batch is dynamic.
                    for size in (64, 33):
                        cell_loop(self._warm_input(size), *self._params, self.residual, step)
                    self._step = step
                else:
                    loop = torch.compile(cell_loop, mode=self.compile_mode, fullgraph=True)
                    for size in self.buckets:
                        loop(self._warm_input(size), *self._params, self.residual, gru_step_unfused)
                    self._loop = loop
            self.compile_seconds = time.perf_counter() - started
            self.compile_state = "ready"
            logger.info("compiled the GRU %s in %.1fs", self.compile_unit, self.compile_seconds)
        except Exception as exc:  # whatever went wrong, eager serving goes on
            self.compile_error = f"{type(exc).__name__}: {exc}"
            self.compile_state = "failed"
            logger.warning("torch.compile of the GRU failed; serving eagerly: %s", exc)
        finally:
            self._ready.set()

    def _warm_input(self, size: int) -> torch.Tensor:
        return torch.rand(size, self.window_length, device=self.device)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Block until compilation ended; True when the compiled path is in use."""
        if self.compile_state == "off":
            return False
        self._ready.wait(timeout)
        return self.compile_state == "ready"

    @property
    def path(self) -> str:
        """Which forward serves calls right now (for logs and the bench)."""
        if not self.supported:
            return "nn.GRU"
        if self._loop is not None:
            return "compiled-loop"
        if self._step is not None:
            return "compiled-step"
        return "scripted-cell" if self._scripted is not None else "eager-cell"

    def bucket_for(self, batch: int) -> int | None:
        """The smallest bucket holding ``batch`` rows, or None when larger than all."""
        for size in self.buckets:
            if size >= batch:
                return size
        return None

    # ------------------------------------------------------------------ forward
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.supported:
            return self.model(inputs)
        x = inputs[..., 0] if inputs.ndim == 3 else inputs
        loop = self._loop
        if loop is not None:
            return self._bucketed(loop, x)
        step = self._step
        if step is not None:
            return cell_loop(x, *self._params, self.residual, step)
        loop = self._scripted or tiled_cell_loop
        return loop(x, *self._params, self.residual, tile_rows_for(torch.get_num_threads()))

    def _bucketed(self, loop: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        largest = self.buckets[-1]
        parts = []
        for start in range(0, x.shape[0], largest):
            part = x[start : start + largest]
            n = part.shape[0]
            size = self.bucket_for(n)
            assert size is not None
            if size != n:
                part = torch.cat([part, part.new_zeros((size - n, part.shape[1]))])
            parts.append(loop(part, *self._params, self.residual, gru_step_unfused)[:n])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def eager_reference(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model(inputs)`` under inference mode: the nn.GRU path the fast one must match."""
    with torch.inference_mode():
        return model(inputs)
