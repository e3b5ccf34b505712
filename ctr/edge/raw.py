"""The raw side of the edge file: raw values -> the model's features, in ops TorchScript and ONNX compile.

A device hands the file what it has: per categorical column the token key of its raw text
(``features.hashing``: the empty text is a blank), per integer, numeric or YYMMDDHH column the raw
number as float64 (NaN for a blank). ``RawTransforms`` then does what ``ctr prepare`` did in Polars
(``features.transforms``), so no transform is written again on the device: signed log1p for dense
features, Criteo's log-square buckets, Avazu's hour of day, weekday and weekend, each bucket or hour
known by its integer token key. ``RawLines`` goes one step further back, from the log lines
themselves (TorchScript only: ONNX has no strings).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from common.errors import DataError
from features.feature_map import FeatureMap
from features.hashing import BLANK_KEY, INT_SEED, TOKEN_SEED, key_torch, mix_torch
from features.schema import DatasetConfig, Layout, resolve_layout
from features.transforms import CRITEO_BUCKET, HOUR_OF_DAY, IS_WEEKEND, SIGNED_LOG1P, TOKEN, WEEKDAY, FeatureSpec

NUMBER_KINDS = ("integer", "numeric", "yymmddhh")
DERIVED = (CRITEO_BUCKET, HOUR_OF_DAY, WEEKDAY, IS_WEEKEND)  # integer tokens computed from a raw number


def raw_layout(fmap: FeatureMap) -> Layout:
    """The raw layout a dataset was prepared from, which its edge file reads: recorded in the feature
    map, or (a map from before that) the built-in layout it names."""
    if fmap.raw_layout is not None:
        return fmap.raw_layout
    if fmap.layout == "generic":
        raise DataError(f"dataset '{fmap.dataset}': its feature map predates the recorded raw layout (prepare the "
                        "data again with ctr prepare)")
    return resolve_layout(DatasetConfig(name=fmap.dataset, layout=fmap.layout, output=""))


def feature_specs(fmap: FeatureMap) -> list[FeatureSpec]:
    """The feature map's fields as the transforms' specs (what prepare computed, field by field)."""
    return [FeatureSpec(f.name, f.type, f.source, f.transform) for f in fmap.fields]


def raw_columns(layout: Layout) -> tuple[list[str], list[str]]:
    """(number columns, token columns) of a layout, in file order: the edge file's two raw inputs."""
    return ([c.name for c in layout.columns if c.kind in NUMBER_KINDS],
            [c.name for c in layout.columns if c.kind == "categorical"])


def _index(names: list[str], wanted: list[str]) -> torch.Tensor:
    return torch.tensor([names.index(w) for w in wanted], dtype=torch.int64)


class RawTransforms(nn.Module):
    """(numbers float64 [B, N], token keys int64 [B, T]) -> (dense float32 [B, D], field keys int64 [B, F])."""

    def __init__(self, specs: list[FeatureSpec], layout: Layout) -> None:
        super().__init__()
        numbers, tokens = raw_columns(layout)
        dense = [s for s in specs if s.type == "dense"]
        fields = [s for s in specs if s.type == "categorical"]
        self.num_fields = len(fields)
        self.int_seed, self.blank_key = key_torch(INT_SEED), BLANK_KEY
        self.register_buffer("dense_src", _index(numbers, [s.source for s in dense]))
        self.register_buffer("token_src", _index(tokens, [s.source for s in fields if s.transform == TOKEN]))
        self.register_buffer("token_dst", torch.tensor([i for i, s in enumerate(fields) if s.transform == TOKEN],
                                                       dtype=torch.int64))
        derived = [(i, s) for i, s in enumerate(fields) if s.transform in DERIVED]
        self.register_buffer("derived_src", _index(numbers, [s.source for _, s in derived]))
        self.register_buffer("derived_dst", torch.tensor([i for i, _ in derived], dtype=torch.int64))
        self.register_buffer("derived_kind", torch.tensor([DERIVED.index(s.transform) for _, s in derived],
                                                          dtype=torch.int64).view(1, -1))
        unknown = {s.transform for s in specs} - {TOKEN, SIGNED_LOG1P, *DERIVED}
        if unknown:
            raise ValueError(f"no edge form for transform(s) {sorted(unknown)}")

    def forward(self, numbers: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = numbers.index_select(1, self.dense_src)
        dense = torch.where(torch.isnan(v), torch.zeros_like(v), torch.sign(v) * torch.log1p(v.abs())).to(torch.float32)
        out = torch.zeros(keys.shape[0], self.num_fields, dtype=torch.int64)
        out = out.index_copy(1, self.token_dst, keys.index_select(1, self.token_src))
        if self.derived_src.numel() > 0:
            out = out.index_copy(1, self.derived_dst, derived_keys(numbers.index_select(1, self.derived_src),
                                                                   self.derived_kind, self.int_seed, self.blank_key))
        return dense, out


def derived_keys(v: torch.Tensor, kind: torch.Tensor, int_seed: int, blank_key: int) -> torch.Tensor:
    """Raw numbers [B, K] -> the token keys of their integer tokens, ``kind`` [1, K] indexing ``DERIVED``:
    Criteo's bucket (v > 2: 3 + floor(ln(v)^2), else v), or YYMMDDHH's hour, weekday (Monday 1) and
    is-weekend; NaN is a blank (``blank_key``)."""
    blank = torch.isnan(v)
    x = torch.where(blank, torch.zeros_like(v), v)
    n = x.to(torch.int64)
    bucket = torch.where(x > 2, torch.floor(torch.log(x.clamp(min=3.0)) ** 2).to(torch.int64) + 3, n)
    hour = n % 100
    day, month, year = (n // 100) % 100, (n // 10000) % 100, 2000 + n // 1000000  # Polars reads %y as 20yy
    weekday = (days_from_civil(year, month, day) + 3) % 7 + 1
    token = torch.where(kind == 0, bucket, torch.where(kind == 1, hour, torch.where(kind == 2, weekday,
                                                                                   (weekday >= 6).to(torch.int64))))
    return torch.where(blank, torch.full_like(token, blank_key), mix_torch(token ^ int_seed))


def days_from_civil(year: torch.Tensor, month: torch.Tensor, day: torch.Tensor) -> torch.Tensor:
    """Days since 1970-01-01 of a proleptic Gregorian date (years >= 0), in integer ops only."""
    y = year - (month <= 2).to(torch.int64)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + torch.where(month > 2, torch.full_like(month, -3), torch.full_like(month, 9))) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


class RawLines(nn.Module):
    """Log lines (the layout's separator and columns, no header) -> (numbers, token keys)."""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.separator = layout.separator
        self.kinds = [1 if c.kind in NUMBER_KINDS else 2 if c.kind == "categorical" else 0 for c in layout.columns]
        numbers, tokens = raw_columns(layout)
        self.num_numbers, self.num_tokens = len(numbers), len(tokens)
        self.seed = key_torch(TOKEN_SEED)

    def forward(self, lines: List[str]) -> tuple[torch.Tensor, torch.Tensor]:
        numbers: List[float] = []
        lengths: List[int] = []
        words: List[List[int]] = []
        for r in range(len(lines)):
            line = lines[r]
            if len(line) > 0 and ord(line[len(line) - 1]) == 13:  # CRLF (TorchScript cannot save a "\r" literal)
                line = line[:-1]
            parts = line.split(self.separator)
            if len(parts) != len(self.kinds):
                raise ValueError("line " + str(r + 1) + ": expected " + str(len(self.kinds)) + " fields, found "
                                 + str(len(parts)))
            for c in range(len(parts)):
                if self.kinds[c] == 1:
                    numbers.append(float("nan") if parts[c] == "" else float(parts[c]))
                elif self.kinds[c] == 2:
                    lengths.append(len(parts[c]))
                    words.append(utf8_words(parts[c]))
        widest = max([len(w) for w in words]) if len(words) > 0 else 0
        padded = torch.zeros(len(words), widest, dtype=torch.int64)
        for t in range(len(words)):
            if len(words[t]) > 0:
                padded[t, :len(words[t])] = torch.tensor(words[t], dtype=torch.int64)
        keys = token_keys_torch(torch.tensor(lengths, dtype=torch.int64), padded, self.seed)
        return (torch.tensor(numbers, dtype=torch.float64).view(len(lines), self.num_numbers),
                keys.view(len(lines), self.num_tokens))


def token_keys_torch(lengths: torch.Tensor, words: torch.Tensor, seed: int) -> torch.Tensor:
    """``token_keys`` from the tokens' byte lengths [T] and their 64-bit words [T, W] (zero-padded),
    in scriptable torch ops: how the edge file keys the tokens of raw lines. ``seed``: TOKEN_SEED as
    int64 (TorchScript functions read no globals, so the modules pass their constants in)."""
    h = mix_torch(lengths ^ seed)
    for k in range(words.shape[1]):
        h = torch.where(lengths > 8 * k, mix_torch(h ^ words[:, k]), h)
    return h


def utf8_words(text: str) -> List[int]:
    """A string's bytes as little-endian 64-bit words, the last zero-padded (TorchScript strings
    iterate over their UTF-8 bytes, so this is only meaningful compiled)."""
    words: List[int] = []
    word, at = 0, 0
    for c in text:
        word = word | (ord(c) << (8 * at))
        at += 1
        if at == 8:
            words.append(word)
            word, at = 0, 0
    if at > 0:
        words.append(word)
    return words
