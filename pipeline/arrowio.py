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


def check_shapes(column: pa.ChunkedArray, spec: MatrixColumn, ranks: np.ndarray) -> None:
    """Refuse rows whose shape differs (other than by rank) before anything is written.

    Cheap: per Arrow chunk it compares value counts from offsets; only a chunk that disagrees is
    inspected row by row (by ``_padded_chunk``) to name the row.
    """
    start = 0
    for chunk in column.chunks:
        n = len(chunk)
        total = int(ranks[start:start + n].sum())
        expected = total * spec.cols if spec.rank_axis == 0 else spec.rows * total
        if len(chunk.flatten().flatten()) != expected:
            _padded_chunk(chunk, spec, ranks, start)  # raises, naming the row
        start += n


def _chunk_values(chunk: pa.Array) -> tuple[np.ndarray, pa.Array]:
    inner = chunk.flatten()  # respects slicing of the outer list
    values = inner.flatten().to_numpy(zero_copy_only=False)
    return values, inner


def _padded_chunk(chunk: pa.Array, spec: MatrixColumn, ranks: np.ndarray, first_row: int) -> np.ndarray:
    """(n, rows, cols) of one Arrow chunk: a zero-copy view when all shapes agree, else zero-padded."""
    n = len(chunk)
    values, inner = _chunk_values(chunk)
    chunk_ranks = ranks[first_row:first_row + n]
    full = spec.rows if spec.rank_axis == 0 else spec.cols
    if values.size == n * spec.rows * spec.cols and (chunk_ranks == full).all():
        return values.reshape(n, spec.rows, spec.cols)
    lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    if spec.rank_axis == 0:  # down: row i holds ranks[i] inner lists of length `cols`
        expected = np.full(int(chunk_ranks.sum()), spec.cols)
        row_of_list = np.repeat(np.arange(n), chunk_ranks)
    else:  # up: row i holds `rows` inner lists of length ranks[i]
        expected = np.repeat(chunk_ranks, spec.rows)
        row_of_list = np.repeat(np.arange(n), spec.rows)
    if lengths.size != expected.size or (lengths != expected).any():
        bad = np.flatnonzero(lengths[:expected.size] != expected[:lengths.size])
        row = first_row + int(row_of_list[bad[0]] if bad.size else row_of_list[-1] if row_of_list.size else 0)
        raise PipelineError(f"column {spec.name!r}: row {row} has a different shape than the others; "
                            "every row of a column must have the same shape except the rank")
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
