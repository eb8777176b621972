"""Row streaming: a convolutional network run band by band, each layer keeping only the rows it still needs.

The pipelined slices of operator grouping (Streamlined Inference): the input is fed in row bands; each
layer turns the rows it has into every output row it can already compute and keeps only the input rows
that later output rows still read (a 3x3 convolution keeps two). Nothing is computed twice (unlike a
band with a halo, which recomputes the halo at every layer), and no layer ever holds more than about one
band of its own resolution. The image's top and bottom zero padding is added as explicit zero rows; the
left and right padding stays the convolution's own, so every output value is the same sum of the same
products as in one call (up to the kernels' floating-point order).

Work is done in pieces of at most `max_rows` output rows per layer, also when the input ends and every
layer's delayed rows come out; each piece is pushed through the rest of the chain at once. A piece is
handed on in a one-element list that the receiver empties, so no caller's frame keeps a finished piece
alive while the layers after it run.

Supported layers: `nn.Conv2d` (zero padding, no dilation), nearest `nn.Upsample` by an integer factor,
pointwise activations, `nn.Sequential` and TAESD's residual `AutoencoderTinyBlock`. Anything else raises
`ValueError` (normalisations over the whole image and attention cannot be streamed by rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from .slicing import row_slices

_POINTWISE = (nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity, nn.LeakyReLU, nn.GELU, nn.Sigmoid)


Box = list  # a one-element list holding a piece of rows, emptied by whoever takes the piece


class _Receiver:
    """Anything rows are pushed to: a stage or the output."""

    def push(self, box: Box) -> None:
        """Take the rows in `box` (the next input rows, in order)."""
        raise NotImplementedError

    def end(self) -> None:
        """The input has ended: produce every remaining row, then end the receiver after this one."""
        raise NotImplementedError


class _Stage(_Receiver):
    """One streamed layer, pushing every output row it can compute to `target`."""

    target: _Receiver

    def connect(self, target: _Receiver) -> None:
        self.target = target

    def out_rows(self, rows: int) -> int:
        """Output rows for an input of `rows` rows."""
        raise NotImplementedError


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """`channels_last` for an NHWC tensor (what convolutions with `channels_last` weights return)."""
    nhwc = tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


class _Pointwise(_Stage):
    """A layer whose output rows depend on the same input rows only (activations, 1x1 convolutions,
    nearest upsampling by an integer factor, which maps each input row to `factor` output rows)."""

    def __init__(self, call: Callable[[torch.Tensor], torch.Tensor], max_rows: int, factor: int = 1):
        self.call = call
        self.step = max(1, max_rows // factor)
        self.factor = factor

    def push(self, box: Box) -> None:
        rows = box.pop()
        height = rows.shape[-2]
        for start, stop in row_slices(height, self.step):
            piece = [self.call(rows[..., start:stop, :])]
            if stop == height:
                del rows
            self.target.push(piece)

    def end(self) -> None:
        self.target.end()

    def out_rows(self, rows: int) -> int:
        return rows * self.factor


class _Conv(_Stage):
    """A convolution over rows: buffers input rows (with the top/bottom zero padding as real rows) and
    convolves every complete window, keeping only the rows that the next windows still read."""

    def __init__(self, conv: nn.Conv2d, max_rows: int):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.dilation != (1, 1):
            raise ValueError("only zero-padded, undilated convolutions can be streamed by rows")
        self.conv = conv
        self.max_rows = max_rows
        self.kernel, self.stride, self.pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.buffer: torch.Tensor | None = None
        self.buffer_start = 0  # padded-input row index of the buffer's first row
        self.next_out = 0

    def _zeros(self, like: torch.Tensor) -> torch.Tensor:
        # In `like`'s memory format: a concatenation of mixed formats would convert the whole buffer.
        zeros = like.new_zeros((*like.shape[:-2], self.pad, like.shape[-1]))
        return zeros.contiguous(memory_format=_memory_format(like))

    def push(self, box: Box) -> None:
        rows = box.pop()
        parts = [] if self.buffer is None else [self.buffer]
        if self.buffer is None and self.buffer_start == 0 and self.pad:
            parts.append(self._zeros(rows))
        parts.append(rows)
        self.buffer = None
        del rows
        box = [parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)]
        del parts
        self._convolve(box, last=False)

    def end(self) -> None:
        if self.buffer is not None:
            box = [torch.cat([self.buffer, self._zeros(self.buffer)], dim=-2) if self.pad else self.buffer]
            self.buffer = None
            self._convolve(box, last=True)
        self.target.end()

    def _convolve(self, box: Box, last: bool) -> None:
        buffer = box.pop()
        end = self.buffer_start + buffer.shape[-2]
        available = (end - self.kernel) // self.stride + 1 if end >= self.kernel else 0
        conv = self.conv
        while self.next_out < available:
            count = min(available - self.next_out, self.max_rows)
            first = self.next_out * self.stride - self.buffer_start
            window = buffer[..., first:first + (count - 1) * self.stride + self.kernel, :]
            piece = [F.conv2d(window, conv.weight, conv.bias, (self.stride, conv.stride[1]), (0, conv.padding[1]),
                              1, conv.groups)]
            del window
            self.next_out += count
            if self.next_out == available:  # drop the buffer before the rest of the chain runs
                self._keep(buffer, last)
                buffer = None
            self.target.push(piece)
        if buffer is not None:
            self._keep(buffer, last)

    def _keep(self, buffer: torch.Tensor, last: bool) -> None:
        """Keep the rows from the next window's first row on, as a copy of those few rows so the whole
        buffer can be freed (nothing once the input has ended)."""
        keep_from = min(buffer.shape[-2], self.next_out * self.stride - self.buffer_start)
        self.buffer = None if last or keep_from == buffer.shape[-2] else buffer[..., keep_from:, :].clone()
        self.buffer_start += keep_from

    def out_rows(self, rows: int) -> int:
        return (rows + 2 * self.pad - self.kernel) // self.stride + 1


class _Chain(_Stage):
    """Stages in sequence, each pushing to the next."""

    def __init__(self, stages: list[_Stage]):
        self.stages = stages
        for stage, following in zip(stages, stages[1:], strict=False):
            stage.connect(following)

    def connect(self, target: _Receiver) -> None:
        self.stages[-1].connect(target)

    def push(self, box: Box) -> None:
        self.stages[0].push(box)

    def end(self) -> None:
        self.stages[0].end()

    def out_rows(self, rows: int) -> int:
        for stage in self.stages:
            rows = stage.out_rows(rows)
        return rows


class _Residual(_Stage):
    """TAESD's block, `fuse(conv(x) + skip(x))`: the conv path is streamed; its input rows wait in a
    queue until the conv path has produced the same rows, then the skip, the sum and `fuse` run on them."""

    def __init__(self, block: AutoencoderTinyBlock, max_rows: int):
        self.block = block
        self.path = _Chain([stage_for(layer, max_rows) for layer in block.conv])
        if self.path.out_rows(64) != 64:
            raise ValueError("a streamed residual block must keep the number of rows")
        self.path.connect(_Join(self))
        self.queue: torch.Tensor | None = None

    def push(self, box: Box) -> None:
        rows = box[0]
        self.queue = rows if self.queue is None else torch.cat([self.queue, rows], dim=-2)
        del rows
        self.path.push(box)

    def end(self) -> None:
        self.path.end()

    def take(self, path: torch.Tensor) -> torch.Tensor:
        """`fuse(path + skip(x))` for the oldest queued input rows, as many as `path` has."""
        count = path.shape[-2]
        skip = self.queue[..., :count, :]
        self.queue = self.queue[..., count:, :].clone()
        return self.block.fuse(path + self.block.skip(skip))

    def out_rows(self, rows: int) -> int:
        return rows


class _Join(_Receiver):
    """The end of a residual block's conv path: adds the skip and hands the rows to the block's target."""

    def __init__(self, residual: _Residual):
        self.residual = residual

    def push(self, box: Box) -> None:
        piece = [self.residual.take(box.pop())]
        self.residual.target.push(piece)

    def end(self) -> None:
        self.residual.queue = None
        self.residual.target.end()


class _Output(_Receiver):
    """Writes the chain's rows into one preallocated output."""

    def __init__(self, height: int):
        self.height = height
        self.out: torch.Tensor | None = None
        self.written = 0

    def push(self, box: Box) -> None:
        piece = box.pop()
        if self.out is None:
            self.out = piece.new_empty((*piece.shape[:-2], self.height, piece.shape[-1]))
        self.out[..., self.written:self.written + piece.shape[-2], :] = piece
        self.written += piece.shape[-2]

    def end(self) -> None:
        if self.out is None or self.written != self.height:
            raise RuntimeError(f"streaming produced {self.written} rows, expected {self.height}")


def stage_for(layer: nn.Module, max_rows: int = 64) -> _Stage:
    """The streamed form of `layer` (pieces of at most `max_rows` rows); `ValueError` for layers that
    cannot run row by row."""
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0):
            return _Pointwise(layer, max_rows)
        return _Conv(layer, max_rows)
    if isinstance(layer, nn.Upsample):
        factor = layer.scale_factor[0] if isinstance(layer.scale_factor, tuple) else layer.scale_factor
        if layer.mode != "nearest" or factor is None or float(factor) != int(factor):
            raise ValueError(f"cannot stream a {layer.mode!r} upsampling by {factor}")
        return _Pointwise(layer, max_rows, int(factor))
    if isinstance(layer, _POINTWISE):
        return _Pointwise(layer, max_rows)
    if isinstance(layer, nn.Sequential):
        return _Chain([stage_for(child, max_rows) for child in layer])
    if isinstance(layer, AutoencoderTinyBlock):
        return _Residual(layer, max_rows)
    raise ValueError(f"cannot stream {type(layer).__name__} by rows exactly")


def check_streamable(layers: Iterable[nn.Module]) -> None:
    """Raise `ValueError` when one of `layers` cannot be streamed by rows."""
    for layer in layers:
        stage_for(layer)


def streamed(layers: Iterable[Callable[[torch.Tensor], torch.Tensor] | nn.Module], x: torch.Tensor,
             band_rows: int, max_rows: int | None = None) -> torch.Tensor:
    """`layers` applied in order to `x` (`[..., H, W]`), streamed in input bands of `band_rows` rows, every
    layer working on at most `max_rows` rows at a time (default: `band_rows`).

    Plain callables among `layers` are taken as pointwise (their output rows depend on the same input
    rows only, such as a rescaling). The output is allocated once and filled piece by piece.
    """
    max_rows = max_rows or band_rows
    chain = _Chain([stage_for(layer, max_rows) if isinstance(layer, nn.Module) else _Pointwise(layer, max_rows)
                    for layer in layers])
    output = _Output(chain.out_rows(x.shape[-2]))
    chain.connect(output)
    for start, stop in row_slices(x.shape[-2], band_rows):
        chain.push([x[..., start:stop, :]])
    chain.end()
    return output.out
