"""SigMF recording sets in and out: one recording per receiver → one capture.

A *recording set* is a directory of ``.sigmf-meta``/``.sigmf-data`` pairs, or a SigMF
archive (``.sigmf``, a tar; ``.sigmf.gz`` and ``.sigmf.xz`` too) holding several
recordings, one per receiver. Each recording is matched to a receiver of the network by
``global.rfloc:receiver_id`` or else by ``global.core:geolocation`` (the nearest receiver
within `MATCH_DISTANCE_M`); its samples are read in the capture window — at a given start
time, or at the start of the overlap of the recordings' ``captures[].core:datetime`` — and
handed on in their own sample type (serve_app/io/datatypes.py). The ``rfloc`` extension
namespace (declared in ``core:extensions``) is documented in docs/recordings.md.

Metadata is validated and data checksums (``core:sha512``) are verified by the `sigmf`
package; every problem is a `RecordingError` naming the file and the field.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pyarrow as pa
import sigmf.schema
from pyproj import Geod
from sigmf import SigMFFile
from sigmf.error import SigMFError

from serve_app.constants import DEFAULT_CONFIDENCE, MIN_RECEIVERS, N_SAMPLES, SAMPLE_RATE_HZ
from serve_app.decode import CENTER_FREQ_TOLERANCE_HZ
from serve_app.errors import InvalidInput
from serve_app.io.datatypes import SAMPLE_TYPES, SampleType
from serve_app.receivers import ReceiverNetwork

META_EXT, DATA_EXT = ".sigmf-meta", ".sigmf-data"
ARCHIVE_EXTS = (".sigmf", ".sigmf.gz", ".sigmf.xz")
EXTENSION = {"name": "rfloc", "version": "1.0.0", "optional": True}
RECEIVER_ID_KEY = "rfloc:receiver_id"
GAIN_KEY = "rfloc:gain_db"
# Default radius for matching a recording's core:geolocation to a receiver: well below the
# 1.9 km between the two closest receivers of the default network (giaveno, coazze).
MATCH_DISTANCE_M = 500.0
_GEOD = Geod(ellps="WGS84")
_DATETIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")


class RecordingError(InvalidInput):
    """A recording set cannot be read: `path` is the file, `key` the field (JSON path)."""

    def __init__(self, path: str | Path, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}" if key else str(path), message)
        self.path = str(path)
        self.key = key


def parse_datetime(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 UTC time ``YYYY-MM-DDTHH:MM:SS[.f…]Z``."""
    m = _DATETIME.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not an ISO 8601 UTC time like 2026-11-30T17:00:00.5Z")
    whole = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC).timestamp()
    return whole + (float(m.group(2)) if m.group(2) else 0.0)


def format_datetime(t_s: float) -> str:
    """ISO 8601 UTC time of `t_s` seconds since the epoch, to the microsecond."""
    whole = math.floor(t_s)
    micros = round((t_s - whole) * 1e6)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{micros:06d}Z"


# --- reading ------------------------------------------------------------------------------


@dataclass
class Recording:
    """One recording: validated metadata and a way to read its data bytes."""

    name: str  # the metadata file (or archive member) for messages
    data_name: str
    meta: SigMFFile
    kind: SampleType
    n_samples: int
    _data: Path | bytes

    def global_field(self, key: str, default: Any = None) -> Any:
        """A field of the global object."""
        return self.meta.get_global_field(key, default)

    def read(self, start: int, count: int) -> bytes:
        """Raw bytes of samples [start, start + count)."""
        first, n = start * self.kind.itemsize, count * self.kind.itemsize
        if isinstance(self._data, bytes):
            return self._data[first : first + n]
        with open(self._data, "rb") as f:
            f.seek(first)
            return f.read(n)

    def sample_times(self, rate_hz: float) -> list[tuple[int, float]]:
        """(sample_start, time of that sample) of each capture segment with a core:datetime."""
        out = []
        for i, cap in enumerate(self.meta.get_captures()):
            if "core:datetime" in cap:
                try:
                    t = parse_datetime(cap["core:datetime"])
                except ValueError as exc:
                    raise RecordingError(self.name, f"captures[{i}].core:datetime", str(exc)
                                         ) from None
                out.append((int(cap.get("core:sample_start", 0)), t))
        return out

    def start_s(self, rate_hz: float) -> float | None:
        """Time of sample 0 (from the first segment with a datetime), None without one."""
        times = self.sample_times(rate_hz)
        if not times:
            return None
        s0, t0 = times[0]
        return t0 - s0 / rate_hz

    def segment_end(self, index: int) -> int:
        """First sample after the capture segment holding sample `index` (a gap follows)."""
        later = [int(c.get("core:sample_start", 0)) for c in self.meta.get_captures()]
        return min([s for s in later if s > index] or [self.n_samples])

    def index_at(self, t_s: float, rate_hz: float) -> int:
        """Index of the sample taken at time `t_s`, from the capture segment covering it."""
        times = self.sample_times(rate_hz)
        earlier = [(s, t) for s, t in times if t <= t_s + 0.5 / rate_hz] or times[:1]
        s, t = earlier[-1]
        return s + round((t_s - t) * rate_hz)


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    """A validator of the `sigmf` package's metadata schema, built once."""
    schema = sigmf.schema.get_schema()
    return jsonschema.validators.validator_for(schema)(schema)


def _validate(meta: SigMFFile) -> None:
    """What `SigMFFile.validate` checks, without re-checking the schema itself each time.

    `sigmf.validate.validate` runs jsonschema's `validate`, which first validates the
    schema against its metaschema: 28 of the 29 ms that validating one recording took here.
    """
    metadata = meta._metadata  # what SigMFFile.validate passes on
    _validator().validate(metadata)
    for key in ("captures", "annotations"):  # as sigmf.validate.validate does
        starts = [item["core:sample_start"] for item in metadata[key]]
        if starts != sorted(starts):
            raise jsonschema.ValidationError(f"{key} has incorrect sample start ordering.",
                                             path=[key])


def _load_meta(name: str, raw: bytes) -> SigMFFile:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordingError(name, "", f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("global"), dict):
        raise RecordingError(name, "global", "SigMF metadata needs a 'global' object")
    doc.setdefault("captures", [])
    doc.setdefault("annotations", [])
    try:
        meta = SigMFFile(metadata=doc)
        _validate(meta)
    except jsonschema.ValidationError as exc:
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        raise RecordingError(name, key.lstrip(".") or "global",
                             f"fails SigMF validation: {exc.message}") from None
    except (SigMFError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise RecordingError(name, "", f"not readable as SigMF metadata: {exc}") from None
    return meta


def _check_meta(name: str, meta: SigMFFile) -> SampleType:
    datatype = meta.get_global_field("core:datatype")
    if datatype not in SAMPLE_TYPES:
        raise RecordingError(name, "global.core:datatype",
                             f"datatype {datatype!r} is not supported; use one of "
                             f"{', '.join(SAMPLE_TYPES)} (interleaved complex)")
    if meta.get_global_field("core:num_channels", 1) != 1:
        raise RecordingError(name, "global.core:num_channels",
                             "one channel per recording is supported")
    for key in ("core:dataset", "core:trailing_bytes", "core:metadata_only"):
        if meta.get_global_field(key) is not None:
            raise RecordingError(name, f"global.{key}", "non-conforming and metadata-only "
                                 "datasets are not supported; give a .sigmf-data file")
    for i, cap in enumerate(meta.get_captures()):
        if cap.get("core:header_bytes"):
            raise RecordingError(name, f"captures[{i}].core:header_bytes",
                                 "header bytes in the dataset are not supported")
    return SAMPLE_TYPES[datatype]


def _open_recording(name: str, raw_meta: bytes, data_name: str, data: Path | bytes
                    ) -> Recording:
    meta = _load_meta(name, raw_meta)
    kind = _check_meta(name, meta)
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if size % kind.itemsize:
        raise RecordingError(data_name, "global.core:datatype",
                             f"{size} bytes is not a whole number of {kind.name} samples "
                             f"({kind.itemsize} bytes each): the data file is truncated")
    if size and meta.get_global_field("core:sha512") is not None:
        try:  # the sigmf package recomputes the checksum and compares
            if isinstance(data, Path):
                meta.set_data_file(data_file=data)
            else:
                meta.set_data_file(data_buffer=io.BytesIO(data))
        except SigMFError as exc:
            raise RecordingError(data_name, "global.core:sha512",
                                 f"{exc} The data file is truncated or altered") from None
    return Recording(name, data_name, meta, kind, size // kind.itemsize, data)


def _open_directory(path: Path) -> list[Recording]:
    out = []
    for meta_path in sorted(path.glob(f"*{META_EXT}")):
        data_path = meta_path.with_suffix(DATA_EXT)
        if not data_path.is_file():
            raise RecordingError(meta_path, "", f"its data file {data_path.name} is missing")
        out.append(_open_recording(str(meta_path), meta_path.read_bytes(), str(data_path),
                                   data_path))
    return out


def _open_archive(path: Path) -> list[Recording]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            out = []
            for mname in sorted(n for n in members if n.endswith(META_EXT)):
                dname = mname[: -len(META_EXT)] + DATA_EXT
                where = f"{path}/{mname}"
                if dname not in members:
                    raise RecordingError(where, "", f"its data file {dname} is missing")
                meta_f, data_f = tar.extractfile(members[mname]), tar.extractfile(members[dname])
                assert meta_f is not None and data_f is not None  # regular files
                out.append(_open_recording(where, meta_f.read(), f"{path}/{dname}",
                                           data_f.read()))
            return out
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise RecordingError(path, "", f"not a readable SigMF archive (tar): {exc}") from None


def is_recording_set(path: str | Path) -> bool:
    """True for a directory holding .sigmf-meta files or a SigMF archive file."""
    p = Path(path)
    if p.is_dir():
        return any(p.glob(f"*{META_EXT}"))
    return p.is_file() and p.name.lower().endswith(ARCHIVE_EXTS)


def open_recordings(path: str | Path) -> list[Recording]:
    """The recordings of a set (a directory or an archive), metadata validated."""
    p = Path(path)
    if p.is_dir():
        recordings = _open_directory(p)
    elif p.is_file() and p.name.lower().endswith(ARCHIVE_EXTS):
        recordings = _open_archive(p)
    else:
        raise RecordingError(p, "", "not a directory of SigMF recordings nor a SigMF archive "
                             f"({', '.join(ARCHIVE_EXTS)})")
    if not recordings:
        raise RecordingError(p, "", f"holds no SigMF recordings ({META_EXT} files)")
    return recordings


def match_receiver(rec: Recording, network: ReceiverNetwork,
                   match_distance_m: float = MATCH_DISTANCE_M) -> str:
    """The network receiver a recording belongs to (explicit id, else geolocation)."""
    rid = rec.global_field(RECEIVER_ID_KEY)
    if rid is not None:
        if rid not in network.ids:
            raise RecordingError(rec.name, f"global.{RECEIVER_ID_KEY}",
                                 f"names receiver {rid!r}, not one of the network's: "
                                 f"{', '.join(network.ids)}")
        return str(rid)
    geo = rec.global_field("core:geolocation")
    if geo is None:
        raise RecordingError(rec.name, f"global.{RECEIVER_ID_KEY}",
                             "names no receiver: give global.rfloc:receiver_id or "
                             "global.core:geolocation")
    try:
        lon, lat = float(geo["coordinates"][0]), float(geo["coordinates"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise RecordingError(rec.name, "global.core:geolocation",
                             "must be a GeoJSON Point [lon, lat(, alt)]") from None
    n = len(network)
    _, _, dist = _GEOD.inv([lon] * n, [lat] * n, [r.longitude for r in network.receivers],
                           [r.latitude for r in network.receivers])
    dist = np.asarray(dist)
    order = np.argsort(dist)
    best = int(order[0])
    if dist[best] > match_distance_m:
        raise RecordingError(rec.name, "global.core:geolocation",
                             f"({lat:.5f}, {lon:.5f}) matches no receiver: the nearest, "
                             f"{network.ids[best]}, is {dist[best] / 1000:.2f} km away "
                             f"(limit {match_distance_m:g} m)")
    if n > 1 and dist[int(order[1])] <= match_distance_m:
        raise RecordingError(rec.name, "global.core:geolocation",
                             f"is within {match_distance_m:g} m of two receivers "
                             f"({network.ids[best]}, {network.ids[int(order[1])]}); give "
                             f"global.{RECEIVER_ID_KEY}")
    return network.ids[best]


@dataclass
class SetCapture:
    """One capture read from a recording set: each receiver's window in its own sample type.

    The shape the batch path and the HTTP client both take: receiver ids, raw IQ bytes and
    their SigMF datatype, sample rate, centre frequency. A recording with an
    ``rfloc:gain_db`` is handed on as cf32_le with the gain taken out.
    """

    source: str
    receiver_ids: list[str]
    iq: list[bytes]
    datatypes: list[str]
    sample_rate_hz: float
    center_freq_hz: float
    start: str | None  # ISO 8601 time of the window's first sample, if the set has times
    files: list[str] = field(default_factory=list)  # the recording of each receiver

    def to_complex64(self) -> np.ndarray:
        """Normalized IQ [receivers, samples] complex64."""
        return np.stack([SAMPLE_TYPES[d].to_complex64(raw)
                         for raw, d in zip(self.iq, self.datatypes, strict=True)])

    def to_request(self, confidence_level: float = DEFAULT_CONFIDENCE, **extra: Any
                   ) -> dict[str, Any]:
        """A POST /predict body: each receiver's iq_b64 in its recording's datatype."""
        import pybase64

        body: dict[str, Any] = {
            "receivers": [{"id": rid, "iq_b64": pybase64.b64encode(raw).decode("ascii"),
                           "dtype": d}
                          for rid, raw, d in zip(self.receiver_ids, self.iq, self.datatypes,
                                                 strict=True)],
            "sample_rate_hz": self.sample_rate_hz,
            "center_freq_hz": self.center_freq_hz,
            "confidence_level": confidence_level,
        }
        body.update(extra)
        return body


    def to_row(self) -> dict[str, Any]:
        """One row of a capture dataset (the batch path's columns): one datatype per capture.

        Receivers recorded in different types (or with a gain taken out) go as cf32_le.
        """
        if len(set(self.datatypes)) == 1:
            datatype, iq = self.datatypes[0], list(self.iq)
        else:
            datatype = "cf32_le"
            iq = [SAMPLE_TYPES[d].to_complex64(raw).astype("<c8").tobytes()
                  for raw, d in zip(self.iq, self.datatypes, strict=True)]
        return {
            "capture_id": Path(self.source).name,
            "receiver_ids": list(self.receiver_ids),
            "iq": iq,
            "datatype": datatype,
            "sample_rate_hz": self.sample_rate_hz,
            "center_freq_hz": self.center_freq_hz,
            "timestamp": None if self.start is None else
            datetime.fromtimestamp(parse_datetime(self.start), UTC),
        }


def _sample_rate(rec: Recording, network_rate_hz: float) -> float:
    rate = rec.global_field("core:sample_rate")
    if rate is None:
        raise RecordingError(rec.name, "global.core:sample_rate", "is required")
    if float(rate) != float(network_rate_hz):
        raise RecordingError(rec.name, "global.core:sample_rate",
                             f"{float(rate):g} Hz; the network samples at "
                             f"{float(network_rate_hz):g} Hz (recordings are not resampled)")
    return float(rate)


def _center_freq(rec: Recording, network: ReceiverNetwork) -> float:
    net_hz = float(network.spec.center_freq_hz)
    caps = rec.meta.get_captures()
    freq = caps[0].get("core:frequency") if caps else None
    if freq is None:
        return net_hz
    if not abs(float(freq) - net_hz) <= CENTER_FREQ_TOLERANCE_HZ:
        raise RecordingError(rec.name, "captures[0].core:frequency",
                             f"{float(freq):.0f} Hz is more than "
                             f"{CENTER_FREQ_TOLERANCE_HZ / 1e6:g} MHz from the network's "
                             f"{net_hz:.0f} Hz")
    return float(freq)


def _window_starts(recs: Sequence[Recording], rate_hz: float, start_s: float | None,
                   n_samples: int) -> tuple[list[int], float | None]:
    """First sample of the window in each recording, and the window's time."""
    starts = [r.start_s(rate_hz) for r in recs]
    timed = [s is not None for s in starts]
    if start_s is None and not any(timed):
        return [0] * len(recs), None  # no times at all: every recording from its start
    for rec, ok in zip(recs, timed, strict=True):
        if not ok:
            raise RecordingError(rec.name, "captures[0].core:datetime",
                                 "is required to align this recording with the others "
                                 "(or with --start)")
    t = start_s if start_s is not None else max(s for s in starts if s is not None)
    idx = []
    for rec in recs:
        i = rec.index_at(t, rate_hz)
        if i < 0:
            raise RecordingError(rec.name, "captures[0].core:datetime",
                                 f"starts {-i / rate_hz:.6f} s after the window start "
                                 f"{format_datetime(t)}")
        idx.append(i)
    return idx, t


def read_recording_set(
    path: str | Path,
    network: ReceiverNetwork,
    *,
    start: str | float | None = None,
    match_distance_m: float = MATCH_DISTANCE_M,
    n_samples: int = N_SAMPLES,
    sample_rate_hz: float = SAMPLE_RATE_HZ,
) -> SetCapture:
    """Read a recording set into one capture of `n_samples` per receiver.

    `start`: the window's first sample time (ISO 8601 UTC or epoch seconds); default the
    start of the recordings' overlap.
    """
    recs = open_recordings(path)
    by_id: dict[str, Recording] = {}
    for rec in recs:
        rid = match_receiver(rec, network, match_distance_m)
        if rid in by_id:
            key = f"global.{RECEIVER_ID_KEY}" if rec.global_field(RECEIVER_ID_KEY) else \
                "global.core:geolocation"
            raise RecordingError(rec.name, key, f"a second recording of receiver {rid!r} "
                                 f"(also {by_id[rid].name})")
        by_id[rid] = rec
    if len(by_id) < MIN_RECEIVERS:
        raise RecordingError(path, "", f"holds recordings of {len(by_id)} receiver(s); at "
                             f"least {MIN_RECEIVERS} are needed to localize")
    ids = [rid for rid in network.ids if rid in by_id]  # network slot order
    ordered = [by_id[rid] for rid in ids]
    rate_hz = 0.0
    for rec in ordered:
        rate_hz = _sample_rate(rec, sample_rate_hz)
    freqs = [_center_freq(rec, network) for rec in ordered]
    try:
        start_s = parse_datetime(start) if isinstance(start, str) else start
    except ValueError as exc:
        raise RecordingError(path, "start", str(exc)) from None
    first, t = _window_starts(ordered, rate_hz, start_s, n_samples)
    iq, dtypes = [], []
    for rec, i in zip(ordered, first, strict=True):
        if i + n_samples > rec.n_samples:
            raise RecordingError(rec.data_name, "",
                                 f"too few samples: {max(rec.n_samples - i, 0)} from the "
                                 f"window start (sample {i}), {n_samples} needed")
        end = rec.segment_end(i)
        if end < rec.n_samples and i + n_samples > end:
            raise RecordingError(rec.name, "captures", f"the window (samples {i} to "
                                 f"{i + n_samples}) crosses the capture segment starting at "
                                 f"sample {end}: a gap in the recording")
        raw = rec.read(i, n_samples)
        gain_db = rec.global_field(GAIN_KEY)
        if gain_db:
            try:
                gain = np.float32(10.0 ** (-float(gain_db) / 20.0))
            except (TypeError, ValueError):
                raise RecordingError(rec.name, f"global.{GAIN_KEY}", "must be a number in dB"
                                     ) from None
            raw = (rec.kind.to_complex64(raw) * gain).astype("<c8").tobytes()
            dtypes.append("cf32_le")
        else:
            dtypes.append(rec.kind.name)
        iq.append(raw)
    return SetCapture(
        source=str(path), receiver_ids=ids, iq=iq, datatypes=dtypes, sample_rate_hz=rate_hz,
        center_freq_hz=float(np.mean(freqs)), start=None if t is None else format_datetime(t),
        files=[rec.name for rec in ordered],
    )


# The batch path's capture columns (docs/batch.md), plus the reading error of a set.
CAPTURES_SCHEMA = pa.schema([
    pa.field("capture_id", pa.string(), nullable=False),
    pa.field("receiver_ids", pa.list_(pa.string())),
    pa.field("iq", pa.list_(pa.binary())),
    pa.field("datatype", pa.string()),
    pa.field("sample_rate_hz", pa.float64()),
    pa.field("center_freq_hz", pa.float64()),
    pa.field("timestamp", pa.timestamp("us", tz="UTC")),
    pa.field("read_error", pa.string()),
    pa.field("read_error_field", pa.string()),
])


def recording_sets(path: str | Path) -> list[Path]:
    """The recording sets in a directory (subdirectories and archives), sorted by name."""
    p = Path(path)
    if not p.is_dir():
        raise RecordingError(p, "", "not a directory of recording sets")
    return sorted(c for c in p.iterdir() if is_recording_set(c))


def iter_recording_sets(
    path: str | Path, network: ReceiverNetwork, **kwargs: Any
) -> Iterator[SetCapture | RecordingError]:
    """One capture per recording set of a directory; a bad set yields its error instead."""
    for child in recording_sets(path):
        try:
            yield read_recording_set(child, network, **kwargs)
        except RecordingError as exc:
            yield exc


def captures_table(paths: Sequence[str | Path], network: ReceiverNetwork, **kwargs: Any
                   ) -> pa.Table:
    """Capture rows (`SetCapture.to_row`) of recording sets, for the batch path.

    A set that cannot be read is a row with null IQ, its error message in ``read_error``
    and ``read_error_field`` naming file and field ("…/milano.sigmf-meta:
    global.core:datatype"), so that one bad set fails only its own row.
    """
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            row = read_recording_set(path, network, **kwargs).to_row()
            row.update(read_error=None, read_error_field=None)
        except RecordingError as exc:
            row = {"capture_id": Path(path).name, "receiver_ids": None, "iq": None,
                   "datatype": None, "sample_rate_hz": None, "center_freq_hz": None,
                   "timestamp": None, "read_error": exc.message, "read_error_field": exc.field}
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CAPTURES_SCHEMA)


# --- writing ------------------------------------------------------------------------------


def recording_meta(
    receiver_id: str,
    network: ReceiverNetwork,
    *,
    datatype: str,
    sample_rate_hz: float,
    center_freq_hz: float,
    start_s: float,
    gain_db: float = 0.0,
    annotations: Sequence[tuple[int, int, Mapping[str, Any]]] = (),
    description: str | None = None,
) -> SigMFFile:
    """The SigMF metadata of one receiver's recording (data not attached)."""
    rx = network.receivers[network.index(receiver_id)]
    info: dict[str, Any] = {
        "core:datatype": datatype,
        "core:sample_rate": float(sample_rate_hz),
        "core:extensions": [dict(EXTENSION)],
        "core:recorder": "rfloc",
        "core:hw": f"{rx.name} receiver",
        "core:geolocation": {"type": "Point",
                             "coordinates": [rx.longitude, rx.latitude, rx.altitude_m]},
        RECEIVER_ID_KEY: receiver_id,
    }
    if gain_db:
        info[GAIN_KEY] = float(gain_db)
    if description:
        info["core:description"] = description
    meta = SigMFFile(global_info=info)
    meta.add_capture(0, {"core:datetime": format_datetime(start_s),
                         "core:frequency": float(center_freq_hz)})
    for first, count, extra in annotations:
        meta.add_annotation(first, count, dict(extra))
    return meta


def fit_gain_db(iq: np.ndarray, kind: SampleType, headroom: float = 0.9) -> float:
    """Gain (dB, 0.1 dB steps) that puts a recording's peak |I|, |Q| at `headroom` of full scale.

    Integer types only (0 for floats): like turning a receiver's RF gain so the converter
    neither clips nor wastes its bits.
    """
    peak = float(np.abs(np.asarray(iq, np.complex64).view(np.float32)).max())
    if kind.step == 0.0 or peak == 0.0:
        return 0.0
    return math.floor(20.0 * math.log10(headroom / peak) * 10.0) / 10.0


def write_recording_set(
    dest: str | Path,
    recordings: Mapping[str, np.ndarray],
    network: ReceiverNetwork,
    *,
    datatype: str = "ci16_le",
    sample_rate_hz: float,
    center_freq_hz: float,
    start_s: Mapping[str, float],
    annotations: Mapping[str, Sequence[tuple[int, int, Mapping[str, Any]]]] | None = None,
    auto_gain: bool = True,
    archive: bool = False,
) -> Path:
    """Write one recording per receiver (normalized complex64 IQ) as a directory or archive.

    Each file is validated against the `sigmf` package's schema first; with `auto_gain`
    an integer recording carries the ``rfloc:gain_db`` that fits it to the converter.
    """
    kind = SAMPLE_TYPES[datatype]
    dest = Path(dest)
    files: list[tuple[str, bytes]] = []
    for rid, iq in recordings.items():
        gain_db = fit_gain_db(iq, kind) if auto_gain else 0.0
        scaled = np.asarray(iq, np.complex64) * np.float32(10.0 ** (gain_db / 20.0))
        data = kind.from_complex64(scaled)
        meta = recording_meta(rid, network, datatype=datatype, sample_rate_hz=sample_rate_hz,
                              center_freq_hz=center_freq_hz, start_s=start_s[rid],
                              gain_db=gain_db, annotations=(annotations or {}).get(rid, ()))
        meta.set_data_file(data_buffer=io.BytesIO(data))  # computes core:sha512
        _validate(meta)  # sigmf's checks (tests/test_sigmf.py runs sigmf_validate on these)
        files += [(f"{rid}{META_EXT}", (meta.dumps(pretty=True) + "\n").encode()),
                  (f"{rid}{DATA_EXT}", data)]
    if archive:
        name = dest.name[: -len(".sigmf")] if dest.name.endswith(".sigmf") else dest.name
        dest = dest.with_name(f"{name}.sigmf")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
            for fname, content in files:
                info = tarfile.TarInfo(f"{name}/{fname}")
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
    else:
        dest.mkdir(parents=True, exist_ok=True)
        for fname, content in files:
            (dest / fname).write_bytes(content)
    return dest


# --- simulated recording sets ---------------------------------------------------------------

# Receivers start and stop recording at different times: up to 10 ms before the latest
# starter and after the earliest stopper, in steps of 6 samples (125 µs, whole microseconds).
_SKEW_STEP = 6
_MAX_SKEW = 480


@dataclass
class SimulatedSets:
    """Recording sets written by `write_simulated_sets`, with what they should decode to."""

    paths: list[Path]
    iq: np.ndarray | None  # [n, R, S] complex64: every receiver's capture window (keep_iq)
    present: np.ndarray  # [n, R] bool
    truth_latlon: np.ndarray  # [n, 2]


_SIM_CHUNK = 64  # scenes simulated at once (~25 MB of IQ)


def write_simulated_sets(
    out_dir: str | Path,
    n: int,
    seed: int = 1,
    *,
    network: ReceiverNetwork,
    datatype: str = "ci16_le",
    archive: bool = False,
    max_missing: int = 0,
    start_s: float | None = None,
    keep_iq: bool = True,
) -> SimulatedSets:
    """Simulate `n` scenes and write each as a recording set ``out_dir/NNNN`` (or NNNN.sigmf).

    Every receiver that took part gets a recording holding the capture window plus up to
    10 ms before and after it (receivers are not synchronized), stamped with its own
    core:datetime, and an annotation over the window with the simulator's truth.
    """
    from serve_app.simulate import sample_scenes, synthesize_iq

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    t0 = float(math.floor(datetime.now(UTC).timestamp())) if start_s is None else start_s
    center_hz = float(network.spec.center_freq_hz)
    paths: list[Path] = []
    windows, presents, truths = [], [], []
    for c0 in range(0, n, _SIM_CHUNK):
        scenes = sample_scenes(network, min(_SIM_CHUNK, n - c0), rng, max_missing=max_missing)
        full = synthesize_iq(network, scenes, rng, n_samples=N_SAMPLES + 2 * _MAX_SKEW)
        lat, lon = network.to_geodetic(scenes.tx_enu_m[:, 0], scenes.tx_enu_m[:, 1])
        for k in range(len(scenes)):
            i = c0 + k
            slots = np.flatnonzero(scenes.present[k])
            lead = rng.integers(0, _MAX_SKEW // _SKEW_STEP + 1, len(slots)) * _SKEW_STEP
            tail = rng.integers(0, _MAX_SKEW // _SKEW_STEP + 1, len(slots)) * _SKEW_STEP
            lead[rng.integers(len(slots))] = 0  # the latest starter opens the window
            t_window = t0 + i  # one scene per second
            offset_hz = float(scenes.carrier_offset_hz[k])
            recordings, starts, notes = {}, {}, {}
            for j, slot in enumerate(slots):
                rid = network.ids[slot]
                first = _MAX_SKEW - int(lead[j])
                recordings[rid] = full[k, slot, first : _MAX_SKEW + N_SAMPLES + int(tail[j])]
                starts[rid] = t_window - int(lead[j]) / SAMPLE_RATE_HZ
                notes[rid] = [(int(lead[j]), N_SAMPLES, {
                    "core:label": "transmitter",
                    "core:comment": "simulated transmitter: its true position and power",
                    "core:freq_lower_edge": center_hz + offset_hz - 6_250.0,
                    "core:freq_upper_edge": center_hz + offset_hz + 6_250.0,
                    "core:latitude": float(lat[k]),
                    "core:longitude": float(lon[k]),
                    "rfloc:tx_power_dbm": float(scenes.tx_power_dbm[k]),
                    "rfloc:rx_power_dbm": float(scenes.rx_power_dbm[k, slot]),
                })]
            paths.append(write_recording_set(
                out / f"{i:04d}", recordings, network, datatype=datatype,
                sample_rate_hz=SAMPLE_RATE_HZ, center_freq_hz=center_hz, start_s=starts,
                annotations=notes, archive=archive))
        if keep_iq:
            window = full[:, :, _MAX_SKEW : _MAX_SKEW + N_SAMPLES].copy()
            window[~scenes.present] = 0
            windows.append(window)
        presents.append(scenes.present)
        truths.append(np.stack([lat, lon], axis=-1))
    return SimulatedSets(paths, np.concatenate(windows) if keep_iq else None,
                         np.concatenate(presents), np.concatenate(truths))
