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


def _usual(lengths: np.ndarray) -> int:
    """The most common of ``lengths``, ties to the first: the odd row out is the one blamed, even when it is row 0."""
    if not lengths.size:
        return 0
    counts = np.bincount(lengths)
    return int(lengths[0]) if counts[lengths[0]] == counts.max() else int(counts.argmax())


def _usual_inner_length(column: pa.ChunkedArray) -> int:
    """The length most inner lists have (``in`` of a down matrix), from offsets only; a rank-0 row has no list at all."""
    lengths = [pc.list_value_length(chunk.flatten()).fill_null(0).to_numpy(zero_copy_only=False) for chunk in column.chunks]
    return _usual(np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64))


def describe(column: pa.ChunkedArray, name: str, rank_axis: int, ranks: np.ndarray) -> MatrixColumn:
    """Shape of a matrix column: the non-rank dimension must be equal in every row, and every rank at least 1."""
    numpy_dtype = np.dtype(leaf_type(column.type).to_pandas_dtype())
    if rank_axis == 0:  # down (r, in): outer length is the rank, inner length is `in`
        if (ranks == 0).any():
            bad = int(np.flatnonzero(ranks == 0)[0])
            raise PipelineError(f"column {name!r}: row {bad} has rank 0 (an empty matrix); every adapter needs rank >= 1, "
                                "remove that adapter from the source")
        cols = _usual_inner_length(column)
        return MatrixColumn(name, int(ranks.max(initial=0)), cols, 0, numpy_dtype)
    outer = row_ranks(column, name)  # up (out, r): outer length is `out`
    out = _usual(outer)
    if (outer != out).any():
        bad = int(np.flatnonzero(outer != out)[0])
        raise PipelineError(f"column {name!r}: row {bad} has {outer[bad]} rows where the others have {out}; shapes must agree (except the rank)")
    return MatrixColumn(name, out, int(ranks.max(initial=0)), 1, numpy_dtype)


def null_row(column: pa.ChunkedArray) -> int | None:
    """The first row holding a missing (null) inner list or value, else None. Validity bitmaps only."""
    start = 0
    for chunk in column.chunks:
        inner = chunk.flatten()
        values = inner.flatten()
        if inner.null_count or values.null_count:
            outer_len = pc.list_value_length(chunk).fill_null(0).to_numpy(zero_copy_only=False)
            inner_len = pc.list_value_length(inner).fill_null(0).to_numpy(zero_copy_only=False)
            row_of_list = np.repeat(np.arange(len(chunk)), outer_len)
            lists = np.flatnonzero(inner.is_null().to_numpy(zero_copy_only=False))
            if values.null_count:  # the inner list that holds the first null value
                first_value = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
                value_list = int(np.searchsorted(np.cumsum(inner_len), first_value, side="right"))
                lists = np.append(lists, value_list)
            return start + int(row_of_list[lists.min()])
        start += len(chunk)
    return None


def check_shapes(column: pa.ChunkedArray, spec: MatrixColumn, ranks: np.ndarray) -> None:
    """Refuse rows whose shape differs (other than by rank) before anything is written.

    Cheap: per Arrow chunk it compares every inner list's length, read from the offsets (never the
    values), with what the row's rank says it must be; no per-row Python.
    """
    start = 0
    for chunk in column.chunks:
        _inner_lengths(chunk, spec, ranks[start:start + len(chunk)], start)
        start += len(chunk)


def _shape_error(spec: MatrixColumn, row: int, detail: str) -> PipelineError:
    return PipelineError(f"column {spec.name!r}: row {row} {detail}; every row of a column must have the same shape except the rank")


def _inner_lengths(chunk: pa.Array, spec: MatrixColumn, chunk_ranks: np.ndarray, first_row: int) -> np.ndarray:
    """Lengths of the chunk's inner lists, checked against the spec and each row's rank (raises naming the row).

    The outer lengths were checked already (they are the ranks of a down matrix, and ``out`` of an up one).
    """
    n = len(chunk)
    lengths = pc.list_value_length(chunk.flatten()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if spec.rank_axis == 0:  # down: row i holds ranks[i] inner lists of length `cols`
        if lengths.size != int(chunk_ranks.sum()):
            raise _shape_error(spec, first_row, "disagrees with the ranks read from this column")
        bad = np.flatnonzero(lengths != spec.cols)
        if bad.size:
            row = first_row + int(np.repeat(np.arange(n), chunk_ranks)[bad[0]])
            raise _shape_error(spec, row, f"has a list of {lengths[bad[0]]} values where the others have {spec.cols}")
        return lengths
    if lengths.size != n * spec.rows:  # up: row i holds `rows` inner lists of length ranks[i]
        raise _shape_error(spec, first_row, f"disagrees with the {spec.rows} rows of the others")
    per_row = lengths.reshape(n, spec.rows)
    ragged = np.flatnonzero((per_row != per_row[:, :1]).any(axis=1)) if spec.rows else np.array([], dtype=np.int64)
    if ragged.size:
        i = int(ragged[0])
        raise _shape_error(spec, first_row + i, f"has lists of {per_row[i].min()} to {per_row[i].max()} values (it is not a matrix)")
    if spec.rows:
        wrong = np.flatnonzero(per_row[:, 0] != chunk_ranks)
        if wrong.size:
            i = int(wrong[0])
            raise PipelineError(f"column {spec.name!r}: row {first_row + i} has rank {per_row[i, 0]} but its down matrix has rank "
                                f"{chunk_ranks[i]}; a module's up and down matrices must have the same rank")
    return lengths


def _chunk_values(chunk: pa.Array) -> tuple[np.ndarray, pa.Array]:
    inner = chunk.flatten()  # respects slicing of the outer list
    values = inner.flatten().to_numpy(zero_copy_only=False)
    return values, inner


def _padded_chunk(chunk: pa.Array, spec: MatrixColumn, ranks: np.ndarray, first_row: int) -> np.ndarray:
    """(n, rows, cols) of one Arrow chunk: a zero-copy view when all shapes agree, else zero-padded.

    The chunk must have passed ``check_shapes`` (materialize's plan checks every chunk before anything
    is written): only then is a reshape of its values the matrices and not a silent re-cut of them.
    """
    n = len(chunk)
    chunk_ranks = ranks[first_row:first_row + n]
    values, inner = _chunk_values(chunk)
    full = spec.rows if spec.rank_axis == 0 else spec.cols
    if (chunk_ranks == full).all() and values.size == n * spec.rows * spec.cols:
        # Checked by check_shapes already; not again here: for an up matrix of rank 1 the inner offsets
        # are as many as the values, so a second check cost as much as the copy (12% of materialize).
        return values.reshape(n, spec.rows, spec.cols)
    lengths = _inner_lengths(chunk, spec, chunk_ranks, first_row)  # offsets only; a wrong shape is never reshaped
    if spec.rank_axis == 0:
        row_of_list = np.repeat(np.arange(n), chunk_ranks)
    out = np.zeros((n, spec.rows, spec.cols), dtype=values.dtype)
    list_id = np.repeat(np.arange(lengths.size), lengths)  # which inner list each value belongs to
    within = np.arange(values.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    if spec.rank_axis == 0:
        starts = np.repeat(np.cumsum(chunk_ranks) - chunk_ranks, chunk_ranks)
        out[row_of_list[list_id], (np.arange(lengths.size) - starts)[list_id], within] = values
    else:
        out[list_id // spec.rows, list_id % spec.rows, within] = values
    return out


def gather(column: pa.ChunkedArray, spec: MatrixColumn, ranks: np.ndarray, rows: np.ndarray, dtype) -> np.ndarray:
    """Rows ``rows`` (source row indices, any order) of a matrix column as (len(rows), rows, cols) ``dtype``."""
    out = np.empty((len(rows), spec.rows, spec.cols), dtype=dtype)
    start = 0
    for chunk in column.chunks:
        stop = start + len(chunk)
        hit = np.flatnonzero((rows >= start) & (rows < stop))
        if hit.size:
            view = _padded_chunk(chunk, spec, ranks, start)
            with np.errstate(over="ignore", invalid="ignore"):  # a value cut to inf is named by the caller's finiteness check
                out[hit] = view[rows[hit] - start]
        start = stop
    return out


def mapped_table(dataset) -> pa.Table:
    """The dataset's Arrow table, memory-mapped afresh from its files when it has them.

    Pages of a memory map stay in the process's resident set until the map is closed, so reading
    every module of a 20 GB source through one long-lived map grows RSS with the source's size.
    A table opened per module and dropped after it is unmapped with it, keeping RSS flat in N.
    Datasets held in memory, or seen through an indices mapping, are returned as they are.
    """
    files = [entry["filename"] for entry in dataset.cache_files]
    if not files or getattr(dataset, "_indices", None) is not None:
        return dataset.data
    from datasets.table import MemoryMappedTable

    tables = [MemoryMappedTable.from_file(name).table for name in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if table.num_rows != dataset.data.num_rows or table.schema.names != dataset.data.schema.names:
        return dataset.data  # the files are not the table as a whole (e.g. columns were added in memory)
    return table
