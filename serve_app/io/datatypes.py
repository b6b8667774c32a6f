"""Interleaved complex sample types of receivers, named as SigMF names them.

Every type maps to the service's normalized complex64 (the unit of DESIGN.md's
``10·log10(mean|iq|²) + calibration_db``) by ``(code − offset) · scale``:

==========  ==============  ========  ===========  ==============================
datatype    aliases         bytes/IQ  offset       scale
==========  ==============  ========  ===========  ==============================
cf32_le     complex64       8         0            1
ci16_le     int16           4         0            1/32768
ci8                         2         0            1/128
cu8                         2         127.5        1/128
==========  ==============  ========  ===========  ==============================

The rule for the integer types: one step of an n-bit converter is 2^−(n−1), so its full
scale is 1.0 whatever its width or signedness, and a receiver calibrated in one type reads
the same dBm in another. ``cu8`` (rtl-sdr) first subtracts the midpoint of 0…255, 127.5,
which keeps the map symmetric: codes 0 and 255 are −0.996 and +0.996, and a noise-free
input centred on the midpoint averages to zero. (Dividing by 127.5 instead would make 255
exactly 1.0 but cu8 steps 0.034 dB larger than ci8 steps of the same converter.)

One table for every input: the HTTP API's ``dtype``, SigMF recordings and Parquet capture
datasets (`serve_app.capture_parquet`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleType:
    """One interleaved complex sample type: component dtype and its map to complex64."""

    name: str  # the SigMF datatype
    component: str  # numpy dtype of one I or Q component
    offset: float
    scale: float

    @property
    def itemsize(self) -> int:
        """Bytes per complex sample (I and Q)."""
        return 2 * np.dtype(self.component).itemsize

    @property
    def step(self) -> float:
        """Quantisation step of one component in normalized units (0 for floats)."""
        return 0.0 if np.dtype(self.component).kind == "f" else self.scale

    def to_complex64(self, raw: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
        """Normalized complex64 samples from raw bytes (a read-only view for cf32_le)."""
        codes = np.frombuffer(raw, self.component) if not isinstance(raw, np.ndarray) else raw
        if self.name == "cf32_le":
            return codes.view(np.complex64)
        out = codes.astype(np.float32)
        if self.offset:
            out -= np.float32(self.offset)
        out *= np.float32(self.scale)
        return out.view(np.complex64)

    def from_complex64(self, iq: np.ndarray) -> bytes:
        """Raw bytes of normalized complex samples: rounded to the nearest code, clipped."""
        parts = np.asarray(iq, np.complex64).view(np.float32)
        if self.name == "cf32_le":
            return parts.astype("<f4").tobytes()
        info = np.iinfo(self.component)
        with np.errstate(all="ignore"):  # in float64: float32 would misround near .5 steps
            codes = np.rint(parts.astype(np.float64) / self.scale + self.offset)
        return np.clip(codes, info.min, info.max).astype(self.component).tobytes()


SAMPLE_TYPES: dict[str, SampleType] = {
    t.name: t
    for t in (
        SampleType("cf32_le", "<f4", 0.0, 1.0),
        SampleType("ci16_le", "<i2", 0.0, 1.0 / 32768.0),
        SampleType("ci8", "i1", 0.0, 1.0 / 128.0),
        SampleType("cu8", "u1", 127.5, 1.0 / 128.0),
    )
}
# The service's own first spellings.
ALIASES = {"complex64": "cf32_le", "int16": "ci16_le"}


def sample_type(name: str) -> SampleType:
    """The sample type of a SigMF datatype name or alias; KeyError if not supported."""
    return SAMPLE_TYPES[ALIASES.get(name, name)]
