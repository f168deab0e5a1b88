"""Audio from a WAV file or a raw PCM stream, cut into windows with hop and context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.base import MAX_SAMPLES, Field, ProfilePath, Strict

KEY = "audio"


@dataclass(frozen=True, kw_only=True)
class Config(Strict):
    type: Literal["audio"]
    path: ProfilePath = Field(description="a WAV file, or a raw PCM file or FIFO")
    format: Literal["wav", "s16le", "f32le"] = Field("wav", description="wav, or raw little-endian 16-bit or float PCM")
    sample_rate: int = Field(16000, gt=0, description="samples per second (checked against a WAV header)")
    window: int = Field(512, gt=0, le=MAX_SAMPLES, description="samples per window given to the model")
    hop: int | None = Field(
        None, gt=0, le=MAX_SAMPLES, description="samples between window starts; the window size when unset"
    )
    context: int = Field(0, ge=0, le=MAX_SAMPLES, description="samples of the previous window prepended to each window")
    realtime: bool = Field(False, description="pace windows at the sample rate instead of as fast as possible")


import os
import select
import stat
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, Pacer, SourceFailedError, Window

# Bytes per read whatever a WAV header claims: 4096 frames of 65535 channels of 32 bits were one read of
# 1 GiB, and a 256 MiB file of them peaked at 860 MiB for 64 mono windows.
READ_BYTES = 64 << 10
POLL_S = 0.25  # how soon `stop` is seen while a FIFO's writer is silent


class _StoppedError(Exception):
    """`stop` was set while a read waited for data."""


class _Stream:
    """A file, FIFO or device read so that `stop` always ends a wait: opened without blocking (a FIFO
    opened for reading blocked until a writer came, for ever), and read as soon as any bytes are there
    (a read of a whole chunk held the samples a slow or stalled writer had already sent)."""

    def __init__(self, path: Path, stop: threading.Event) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if stat.S_ISDIR(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise IsADirectoryError(f"{path} is a directory, not audio")
        self.stop = stop
        self.poll = select.poll()
        self.poll.register(self.fd, select.POLLIN)

    def read_some(self, size: int) -> bytes:
        """Up to `size` bytes once there are any; b"" at the end of the stream."""
        while True:
            if self.stop.is_set():
                raise _StoppedError
            if not self.poll.poll(POLL_S * 1000):
                continue
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                continue

    def read(self, size: int) -> bytes:
        """`size` bytes, fewer only at the end of the stream: what `wave` expects of a file. Having no
        `tell`, the stream is not seekable to `wave`, so a chunk is skipped by reading it (a seek past
        the end, from a size claimed in the header, raised RuntimeError)."""
        chunks: list[bytes] = []
        have = 0
        while have < size and (chunk := self.read_some(size - have)):
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        os.close(self.fd)


class _Reader:
    """Mono float32 samples in [-1, 1] from a WAV file or raw little-endian PCM, in chunks."""

    def __init__(self, cfg: Config, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stream = _Stream(cfg.path, stop)
        self.wav: wave.Wave_read | None = None
        self.channels = 1
        self.width = 2 if cfg.format == "s16le" else 4
        try:
            if cfg.format == "wav":
                self._open_wav()
        except BaseException:
            self.stream.close()
            raise
        self.frame_bytes = self.width * self.channels
        self.read_frames = max(1, READ_BYTES // self.frame_bytes)
        self.rest = b""  # the start of a sample that a FIFO delivered only part of
        self.ended = False
        self.skip = 0  # samples still to drop: a hop longer than the samples buffered

    def _open_wav(self) -> None:
        name = self.cfg.path.name
        try:
            self.wav = wave.open(cast("IO[bytes]", self.stream), "rb")  # wave calls only read(n) (and tell, if there)
        except (wave.Error, EOFError) as exc:
            raise SourceFailedError(f"{name} is not a PCM WAV file ({str(exc) or 'it ends before its data'})") from None
        if self.wav.getframerate() != self.cfg.sample_rate:
            rate = self.wav.getframerate()
            raise SourceFailedError(
                f"{name} is sampled at {rate} Hz but the pipeline expects {self.cfg.sample_rate} Hz"
            )
        self.width = self.wav.getsampwidth()
        self.channels = self.wav.getnchannels()
        if self.width not in (1, 2, 4):
            raise SourceFailedError(f"{name}: {8 * self.width}-bit samples are not supported (8, 16 or 32-bit PCM)")

    def read(self) -> np.ndarray | None:
        """The next samples (maybe none yet, from a FIFO), None at the end of the stream."""
        if self.wav is not None:
            data = self.wav.readframes(self.read_frames)
            if not data:
                return None
            data = data[: len(data) - len(data) % self.frame_bytes]  # a file cut inside its last frame
        else:
            chunk = self.stream.read_some(self.read_frames * self.frame_bytes)
            if not chunk:
                return None
            data = self.rest + chunk
            cut = len(data) - len(data) % self.width
            data, self.rest = data[:cut], data[cut:]
        if self.cfg.format == "f32le":
            samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        elif self.width == 1:
            samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        elif self.width == 2:
            samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(data, dtype="<i4").astype(np.float32) / 2147483648.0
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1)
        return samples

    def fill(self, buf: np.ndarray, size: int) -> np.ndarray:
        """`buf` with the next samples appended, up to `size` or fewer at the end of the stream. Joined
        once: a header of many channels makes each read one sample, and appending them one by one to a
        window of 2^20 samples copied it 2^20 times."""
        parts = [buf]
        have = len(buf)
        while have < size and not self.ended:
            chunk = self.read()
            if chunk is None:
                self.ended = True
                break
            if self.skip:
                dropped = min(self.skip, len(chunk))
                chunk, self.skip = chunk[dropped:], self.skip - dropped
            parts.append(chunk)
            have += len(chunk)
        return np.concatenate(parts) if len(parts) > 1 else buf

    def drop(self, buf: np.ndarray, count: int) -> np.ndarray:
        """`buf` without its first `count` samples, those not read yet skipped as they come."""
        if count > len(buf):
            self.skip += count - len(buf)
        return buf[count:]

    def close(self) -> None:
        self.stream.close()


class Source(BaseSource[Config]):
    """Windows of `window` samples every `hop`, each with `context` samples before it prepended (as
    Silero VAD wants: 512 + 64 at 16 kHz). `t` is the window's start in seconds; the tail is padded
    with zeros so that the end of the stream is heard too. A window holding a sample that is not a
    finite number (float PCM) is `frame.rejected`, naming the sample."""

    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(config.window + config.context, dtype=np.float32)

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        cfg = self.config
        if not cfg.path.exists():
            raise FileNotFoundError(f"{cfg.path} does not exist")
        hop, context, size = cfg.hop or cfg.window, cfg.context, cfg.context + cfg.window
        try:
            reader = _Reader(cfg, stop)
        except _StoppedError:
            return
        pacer = Pacer(cfg.sample_rate / hop if cfg.realtime else None)
        buf = np.zeros(context, dtype=np.float32)  # buf[0] is sample number `start - context`
        start = 0  # index of the next window's first sample
        try:
            while True:
                buf = reader.fill(buf, size)
                tail = len(buf) < size
                if tail:
                    if len(buf) <= context:
                        return
                    buf = np.concatenate([buf, np.zeros(size - len(buf), dtype=np.float32)])
                if not pacer.wait(stop):
                    return
                data = buf[:size].copy()
                if (why := self._not_finite(data, start - context)) is None:
                    yield Window(data, time.time(), self.next_seq(), start / cfg.sample_rate)
                else:
                    self.emit(
                        "frame.rejected", reason=f"{cfg.path.name}: window at {start / cfg.sample_rate:.3f} s: {why}"
                    )
                if tail:
                    return
                start += hop
                buf = reader.drop(buf, hop)
        except _StoppedError:
            return
        finally:
            reader.close()

    @staticmethod
    def _not_finite(data: np.ndarray, first: int) -> str | None:
        """Why a window cannot go to the model (NaN or infinity from float PCM), None when it can."""
        bad = np.flatnonzero(~np.isfinite(data))
        if not len(bad):
            return None
        return f"sample {first + int(bad[0])} is {data[bad[0]]}, not a finite number ({len(bad)} such in the window)"
