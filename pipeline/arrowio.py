"""Arrow nested-list matrix columns -> float numpy, without torch formatting or per-row Python loops.

A column of a HuggingFace dataset holding one (rows, cols) matrix per row is stored as
list<list<float>>. Its leaf values are one contiguous buffer per Arrow chunk, so each chunk is a
zero-copy (n, rows, cols) view when every row has the same shape; gathering split rows from those
views is the only copy. Ranks that vary between rows are zero-padded to the largest rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import PipelineError


@dataclass(frozen=True)
class MatrixColumn:
    """Shape facts of one matrix column, read from list offsets only (never the values)."""

    name: str
    rows: int  # padded row count (max rank for a down matrix)
    cols: int  # padded column count (max rank for an up matrix)
    rank_axis: int  # 0 for down (r, in), 1 for up (out, r)
    dtype: np.dtype  # leaf dtype in the source


def leaf_type(arrow_type: pa.DataType) -> pa.DataType:
    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        arrow_type = arrow_type.value_type
    return arrow_type


def list_depth(arrow_type: pa.DataType) -> int:
    depth = 0
    while pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        arrow_type, depth = arrow_type.value_type, depth + 1
    return depth


def is_matrix_column(arrow_type: pa.DataType) -> bool:
    leaf = leaf_type(arrow_type)
    return list_depth(arrow_type) == 2 and (pa.types.is_floating(leaf) or pa.types.is_integer(leaf))


def row_ranks(column: pa.ChunkedArray, name: str) -> np.ndarray:
    """Outer list lengths per row (the rank of a down matrix): offsets only, cheap."""
    if column.null_count:
        raise PipelineError(f"column {name!r} has {column.null_count} missing values; every adapter needs every layer")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64)


def _first_inner_length(column: pa.ChunkedArray) -> int:
    for chunk in column.chunks:
        if len(chunk):
            return len(chunk[0].values[0]) if len(chunk[0].values) else 0
    return 0


def describe(column: pa.ChunkedArray, name: str, rank_axis: int, ranks: np.ndarray) -> MatrixColumn:
    """Shape of a matrix column: the non-rank dimension must be equal in every row."""
    numpy_dtype = np.dtype(leaf_type(column.type).to_pandas_dtype())
    if rank_axis == 0:  # down (r, in): outer length is the rank, inner length is `in`
        cols = _first_inner_length(column)
        return MatrixColumn(name, int(ranks.max(initial=0)), cols, 0, numpy_dtype)
    outer = row_ranks(column, name)  # up (out, r): outer length is `out`
    if len(outer) and (outer != outer[0]).any():
        bad = int(np.flatnonzero(outer != outer[0])[0])
        raise PipelineError(f"column {name!r}: row {bad} has {outer[bad]} rows where row 0 has {outer[0]}; shapes must agree (except the rank)")
    return MatrixColumn(name, int(outer[0]) if len(outer) else 0, int(ranks.max(initial=0)), 1, numpy_dtype)


def _chunk_values(chunk: pa.Array) -> tuple[np.ndarray, pa.Array]:
    inner = chunk.flatten()  # respects slicing of the outer list
    values = inner.flatten().to_numpy(zero_copy_only=False)
    return values, inner


def _padded_chunk(chunk: pa.Array, spec: MatrixColumn, ranks: np.ndarray, first_row: int) -> np.ndarray:
    """(n, rows, cols) of one Arrow chunk: a zero-copy view when all shapes agree, else padded."""
    n = len(chunk)
    values, inner = _chunk_values(chunk)
    if values.size == n * spec.rows * spec.cols:
        view = values.reshape(n, spec.rows, spec.cols)
        chunk_ranks = ranks[first_row:first_row + n]
        if n == 0 or (chunk_ranks == (spec.rows if spec.rank_axis == 0 else spec.cols)).all():
            return view
    chunk_ranks = ranks[first_row:first_row + n]
    out = np.zeros((n, spec.rows, spec.cols), dtype=values.dtype)
    if spec.rank_axis == 0:  # down: row i holds ranks[i] inner lists of length `cols`
        expected = int(chunk_ranks.sum()) * spec.cols
        if values.size != expected:
            _raise_ragged(spec, inner, first_row)
        rows_of = np.repeat(np.arange(n), chunk_ranks)
        starts = np.repeat(np.cumsum(chunk_ranks) - chunk_ranks, chunk_ranks)
        out[rows_of, np.arange(rows_of.size) - starts] = values.reshape(-1, spec.cols)
    else:  # up: row i holds `rows` inner lists of length ranks[i]
        lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        expected = np.repeat(chunk_ranks, spec.rows)
        if lengths.size != n * spec.rows or (lengths != expected).any():
            _raise_ragged(spec, inner, first_row, lengths, expected)
        list_of = np.repeat(np.arange(lengths.size), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[list_of // spec.rows, list_of % spec.rows, np.arange(list_of.size) - starts] = values
    return out


def _raise_ragged(spec: MatrixColumn, inner: pa.Array, first_row: int, lengths=None, expected=None) -> None:
    if lengths is None:
        lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        bad = int(np.flatnonzero(lengths != spec.cols)[0]) if (lengths != spec.cols).any() else 0
        row = first_row  # the outer offsets locate the row; the first mismatch is enough to name one
        raise PipelineError(
            f"column {spec.name!r}: rows have different shapes (an inner list of length {lengths[bad]} where {spec.cols} "
            f"was expected, near row {row}); every row of a column must have the same shape except the rank"
        )
    bad = int(np.flatnonzero(lengths != expected)[0]) if lengths.size == expected.size else 0
    raise PipelineError(
        f"column {spec.name!r}: row {first_row + bad // max(spec.rows, 1)} does not have shape "
        f"({spec.rows}, rank); every row of a column must have the same shape except the rank"
    )


def gather(column: pa.ChunkedArray, spec: MatrixColumn, ranks: np.ndarray, rows: np.ndarray, dtype) -> np.ndarray:
    """Rows ``rows`` (source row indices, any order) of a matrix column as (len(rows), rows, cols) ``dtype``."""
    out = np.empty((len(rows), spec.rows, spec.cols), dtype=dtype)
    start = 0
    for chunk in column.chunks:
        stop = start + len(chunk)
        hit = np.flatnonzero((rows >= start) & (rows < stop))
        if hit.size:
            view = _padded_chunk(chunk, spec, ranks, start)
            out[hit] = view[rows[hit] - start]
        start = stop
    return out
