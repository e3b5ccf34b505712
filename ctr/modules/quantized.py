"""Row-wise low-bit codes for embedding rows: one definition for training and for the edge file.

A row x of width w at b bits becomes integer codes q in [0, 2^b - 1] with x ~ q * scale + low,
where ``low`` is the row's minimum and ``scale`` its range over 2^b - 1, both rounded to fp16 (the
edge file stores them so). Training reads rows through the same arithmetic (``fake_quantize``, with
a straight-through gradient), so the packed edge file and the quantized training model give the
same numbers, not merely close ones. Codes of 4 and 2 bits are packed two and four to a byte,
little end first; the edge model unpacks only the rows a batch reads.
"""

from __future__ import annotations

import torch

QUANTIZED_BITS = (8, 4, 2)
MIN_SCALE = 1e-6  # a constant row (range 0) keeps a usable step


def levels_of(bits: int) -> int:
    return (1 << bits) - 1


def row_codes(x: torch.Tensor, levels: torch.Tensor | float,
              stored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, low) of the rows of ``x`` [..., w], each as float32; ``scale`` and ``low`` are
    [..., 1] and hold fp16 values. ``levels`` broadcasts against [..., 1]; ``stored`` (bool,
    broadcasting against ``x``) marks the values that belong to the row (the rest, zero padding of
    a narrower table, is ignored and comes back as code 0)."""
    if stored is None:
        low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        big = torch.finfo(x.dtype).max
        low = torch.where(stored, x, torch.full_like(x, big)).amin(-1, keepdim=True)
        high = torch.where(stored, x, torch.full_like(x, -big)).amax(-1, keepdim=True)
    low = low.half().float()
    scale = ((high - low) / levels).clamp(min=MIN_SCALE).half().float()
    codes = torch.minimum(torch.round((x - low) / scale).clamp(min=0.0), torch.as_tensor(levels, dtype=x.dtype))
    if stored is not None:
        codes = codes * stored.to(x.dtype)
    return codes, scale, low


def stored_columns(widths: list[int], dim: int) -> torch.Tensor:
    """[F, dim] bool: field f's first ``widths[f]`` columns, the values its rows hold (the rest is padding)."""
    return torch.arange(dim).view(1, -1) < torch.tensor(widths).view(-1, 1)


def read_back(x: torch.Tensor, levels: torch.Tensor | float, stored: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` as their codes read them back (``row_codes``), padding kept at zero."""
    codes, scale, low = row_codes(x, levels, stored)
    return (codes * scale + low) * stored.to(x.dtype)


def fake_quantize(x: torch.Tensor, bits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Looked-up rows [B, F, dim] as field f's ``bits[f]``-bit codes read them back (``bits`` 0: left
    as they are); ``stored`` [F, dim] marks each field's stored columns. The gradient passes
    straight through to the unquantized rows, so training moves the rows the codes come from."""
    levels = ((1 << bits.clamp(min=1)) - 1).to(x.dtype).view(1, -1, 1)
    quantized = torch.where((bits > 0).view(1, -1, 1), read_back(x, levels, stored.unsqueeze(0)), x)
    return x + (quantized - x).detach()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [R, w] (each < 2^bits) -> uint8 [R, ceil(w * bits / 8)], 8 // bits codes a byte,
    the first in the lowest bits."""
    per = 8 // bits
    q = codes.to(torch.int32)
    pad = -q.shape[1] % per
    if pad:
        q = torch.cat([q, q.new_zeros(q.shape[0], pad)], 1)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (q.view(q.shape[0], -1, per) << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """``pack_codes`` undone on any leading shape: uint8 [..., n] -> float32 codes [..., width]."""
    wide = packed.to(torch.int32)
    mask = (1 << bits) - 1
    # one scalar shift per position (ONNX has a shift by a constant, not by a tensor of amounts)
    codes = torch.stack([(wide >> (bits * i)) & mask for i in range(8 // bits)], -1)
    return codes.flatten(-2)[..., :width].to(torch.float32)
