"""Capture datasets as Parquet: the input of `rfloc batch` (schema in docs/batch.md).

One row per capture; each receiver's IQ is a binary value in a SigMF datatype (`cf32_le`,
`ci16_le`, …) so that plain pyarrow, pandas or DuckDB read the files and a SigMF reader can
feed the same decoder. `decode_receivers` is the one per-capture decode of the batch path:
receiver ids, per-receiver IQ bytes + datatype, sample rate and centre frequency in,
validated complex64 rows and network slots out, or an `InvalidInput` naming the field.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from serve_app.constants import CENTER_FREQ_HZ, MIN_RECEIVERS, N_SAMPLES, SAMPLE_RATE_HZ
from serve_app.errors import InvalidInput
from serve_app.io.datatypes import SAMPLE_TYPES
from serve_app.receivers import ReceiverNetwork, load_network

CENTER_FREQ_TOLERANCE_HZ = 1e6
MAX_ABS = 1e6  # as the HTTP API: larger |I| or |Q| is refused
SIM_CHUNK = 32  # captures simulated at once, each chunk seeded on its own
ROW_GROUP_CAPTURES = 256  # captures per Parquet row group: the unit a reader streams


# Every SigMF complex sample type the service knows (`serve_app/io/datatypes.py`).
IQ_DATATYPES = SAMPLE_TYPES

CAPTURE_COLUMNS = ("capture_id", "receiver_ids", "iq", "datatype", "sample_rate_hz",
                   "center_freq_hz")
OPTIONAL_COLUMNS = ("timestamp", "truth_latitude", "truth_longitude")
CAPTURE_SCHEMA = pa.schema([
    pa.field("capture_id", pa.string(), nullable=False),
    pa.field("receiver_ids", pa.list_(pa.string()), nullable=False),
    pa.field("iq", pa.list_(pa.binary()), nullable=False),
    pa.field("datatype", pa.string(), nullable=False),
    pa.field("sample_rate_hz", pa.float64(), nullable=False),
    pa.field("center_freq_hz", pa.float64(), nullable=False),
    pa.field("timestamp", pa.timestamp("us", tz="UTC")),
    pa.field("truth_latitude", pa.float64()),
    pa.field("truth_longitude", pa.float64()),
])


@dataclass
class DecodedReceivers:
    """One capture's IQ, validated."""

    iq: np.ndarray  # complex64 [n_receivers, n_samples], rows in the capture's order
    slots: np.ndarray  # int64 network slot of each row


def iq_to_bytes(iq: np.ndarray, datatype: str) -> bytes:
    """One receiver's complex IQ [S] as bytes in a SigMF datatype (the inverse of decoding)."""
    return IQ_DATATYPES[datatype].from_complex64(iq)


def decode_receivers(
    receiver_ids: Sequence[str],
    iq: Sequence[Any],
    datatype: str,
    sample_rate_hz: float,
    center_freq_hz: float,
    network: ReceiverNetwork,
    *,
    n_samples: int = N_SAMPLES,
) -> DecodedReceivers:
    """Validate one capture and decode each receiver's IQ bytes (any buffer) to complex64."""
    dt = IQ_DATATYPES.get(datatype)
    if dt is None:
        raise InvalidInput("datatype", f"unknown IQ datatype {datatype!r}; supported: "
                                       f"{', '.join(IQ_DATATYPES)}")
    if len(iq) != len(receiver_ids):
        raise InvalidInput("iq", f"{len(iq)} IQ values for {len(receiver_ids)} receiver ids")
    if not sample_rate_hz == SAMPLE_RATE_HZ:  # `not ==`: NaN fails too
        raise InvalidInput("sample_rate_hz", f"must be the network's sample rate "
                                             f"{SAMPLE_RATE_HZ:g} Hz, got {sample_rate_hz:g}")
    net_freq_hz = float(network.spec.center_freq_hz)
    if not abs(center_freq_hz - net_freq_hz) <= CENTER_FREQ_TOLERANCE_HZ:
        raise InvalidInput("center_freq_hz", f"must be within "
                           f"{CENTER_FREQ_TOLERANCE_HZ / 1e6:g} MHz of the network's "
                           f"{net_freq_hz:.0f} Hz, got {center_freq_hz:g}")
    slots = np.empty(len(receiver_ids), np.int64)
    seen: dict[str, int] = {}
    for i, rid in enumerate(receiver_ids):
        try:
            slots[i] = network.index(rid)
        except KeyError:
            raise InvalidInput(f"receiver_ids[{i}]", f"unknown receiver {rid!r}; valid ids: "
                                                     f"{', '.join(network.ids)}") from None
        if rid in seen:
            raise InvalidInput(f"receiver_ids[{i}]", f"duplicate receiver {rid!r} (also "
                                                     f"receiver_ids[{seen[rid]}])")
        seen[rid] = i
    if len(receiver_ids) < MIN_RECEIVERS:
        raise InvalidInput("receiver_ids", f"at least {MIN_RECEIVERS} distinct receivers are "
                                           f"required, got {len(receiver_ids)}")
    itemsize = dt.itemsize
    out = np.empty((len(receiver_ids), n_samples), np.complex64)
    for i, raw in enumerate(iq):
        if raw is None:
            raise InvalidInput(f"iq[{i}]", "is null: no IQ samples")
        buf = np.frombuffer(raw, np.uint8)
        if buf.size != n_samples * itemsize:
            raise InvalidInput(f"iq[{i}]", f"{buf.size} bytes is not {n_samples} samples of "
                                           f"{datatype} ({itemsize} bytes each)")
        parts = buf.view(dt.component)
        row = out[i].view(np.float32)
        if dt.offset:
            np.subtract(parts, dt.offset, out=row, casting="unsafe")
            row *= np.float32(dt.scale)
        elif dt.scale != 1.0:
            np.multiply(parts, np.float32(dt.scale), out=row, casting="unsafe")
        else:
            row[:] = parts
    # NaN propagates through max/min: this finds NaN, Inf and outliers without a temporary.
    parts = out.view(np.float32)
    peak = np.maximum(parts.max(axis=1), -parts.min(axis=1))
    bad = np.flatnonzero(~(peak <= MAX_ABS))
    if bad.size:
        i = int(bad[0])
        if not math.isfinite(float(peak[i])):
            raise InvalidInput(f"iq[{i}]", "contains non-finite values (NaN or Inf)")
        raise InvalidInput(f"iq[{i}]", f"contains values of magnitude above {MAX_ABS:g}")
    return DecodedReceivers(out, slots)


def binary_list_views(column: pa.ChunkedArray | pa.Array) -> list[list[memoryview] | None]:
    """Per row, the values of a list<binary> column as zero-copy memoryviews (None: null)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.flatten()  # honours the list array's offset
    if values.null_count:
        items: list[Any] = values.to_pylist()
    else:
        wide = pa.types.is_large_binary(values.type)
        offs = np.frombuffer(values.buffers()[1], np.int64 if wide else np.int32,
                             len(values) + 1, values.offset * (8 if wide else 4))
        data = memoryview(values.buffers()[2] or b"")
        items = [data[a:b] for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)]
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    out: list[list[memoryview] | None] = []
    start = 0
    for n, ok in zip(lengths.tolist(), valid.tolist(), strict=True):
        out.append(items[start:start + n] if ok else None)
        start += n
    return out


# -- simulated datasets ------------------------------------------------------------------------

def _simulate_chunk(net: ReceiverNetwork, start: int, size: int, chunk_seed: Any, seed: int,
                    datatype: str, max_missing: int) -> pa.Table:
    """`size` simulated captures as rows; absent receivers are left out of their row."""
    from serve_app.simulate import sample_scenes, synthesize_iq

    rng = np.random.default_rng(chunk_seed)
    scenes = sample_scenes(net, size, rng, max_missing=max_missing)
    iq = synthesize_iq(net, scenes, rng)
    lat, lon = net.to_geodetic(scenes.tx_enu_m[:, 0], scenes.tx_enu_m[:, 1])
    ids, blobs = [], []
    for k in range(size):
        slots = np.flatnonzero(scenes.present[k])
        ids.append([net.ids[j] for j in slots])
        blobs.append([iq_to_bytes(iq[k, j], datatype) for j in slots])
    index = np.arange(start, start + size)
    return pa.table({
        "capture_id": [f"sim-{seed}-{i:08d}" for i in index],
        "receiver_ids": ids,
        "iq": blobs,
        "datatype": [datatype] * size,
        "sample_rate_hz": np.full(size, float(SAMPLE_RATE_HZ)),
        "center_freq_hz": np.full(size, float(CENTER_FREQ_HZ)),
        # one capture a second from 2026-01-01T00:00:00Z
        "timestamp": pa.array((1_767_225_600 + index) * 1_000_000, pa.timestamp("us", tz="UTC")),
        "truth_latitude": lat,
        "truth_longitude": lon,
    }, schema=CAPTURE_SCHEMA)


def _simulate_shard(args: tuple) -> int:
    """Write one shard file: its range of seeded chunks."""
    path, chunks, seed, datatype, max_missing, receivers_path = args
    import pyarrow.parquet as pq

    net = load_network(receivers_path)
    rows = 0
    pending: list[pa.Table] = []
    # Noisy IQ does not compress: storing it plain saves the readers a decompression pass.
    compression = {f.name: "none" if f.name == "iq" else "zstd" for f in CAPTURE_SCHEMA}
    with pq.ParquetWriter(path, CAPTURE_SCHEMA, compression=compression,
                          use_dictionary=["receiver_ids", "datatype"]) as writer:
        for start, size, chunk_seed in chunks:
            pending.append(_simulate_chunk(net, start, size, chunk_seed, seed, datatype,
                                           max_missing))
            rows += size
            if sum(t.num_rows for t in pending) >= ROW_GROUP_CAPTURES:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_CAPTURES)
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_CAPTURES)
    return rows


def write_capture_dataset(
    directory: str | Path,
    n: int,
    *,
    seed: int = 1,
    shards: int | None = None,
    datatype: str = "cf32_le",
    max_missing: int = 0,
    workers: int = 1,
    receivers_path: str | None = None,
    progress: bool = False,
) -> list[Path]:
    """Simulate `n` standard captures into `shards` Parquet files (default: one per 2,048).

    The captures depend on `seed` only, not on `shards` or `workers`; a shard holds whole
    chunks of SIM_CHUNK captures, so there are at most n / SIM_CHUNK shards. Returns the files.
    """
    if datatype not in IQ_DATATYPES:
        raise InvalidInput("datatype", f"unknown IQ datatype {datatype!r}")
    if n < 1:
        raise InvalidInput("n", "must be at least 1")
    shards = shards or max(1, -(-n // 2048))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, n, SIM_CHUNK))
    seeds = np.random.SeedSequence(seed).spawn(len(starts))
    chunks = [(s, min(SIM_CHUNK, n - s), ss) for s, ss in zip(starts, seeds, strict=True)]
    shards = min(shards, len(chunks))  # a shard holds whole chunks
    per_shard = np.array_split(np.arange(len(chunks)), shards)
    paths = [out / f"captures-{k:05d}-of-{shards:05d}.parquet" for k in range(shards)]
    jobs = [(str(p), [chunks[i] for i in idx], seed, datatype, max_missing, receivers_path)
            for p, idx in zip(paths, per_shard, strict=True)]
    done = 0
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for rows in pool.map(_simulate_shard, jobs):
                done += rows
                if progress:
                    sys.stderr.write(f"\r  simulating captures: {done}/{n}")
    else:
        for job in jobs:
            done += _simulate_shard(job)
            if progress:
                sys.stderr.write(f"\r  simulating captures: {done}/{n}")
    if progress:
        sys.stderr.write("\n")
    return paths
