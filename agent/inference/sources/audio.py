"""Audio from a WAV file or a raw PCM stream, cut into windows with hop and context."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.config.base import MAX_SAMPLES, ProfilePath, Strict

KEY = "audio"


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


import threading
import time
import wave
from collections.abc import Iterator
from typing import BinaryIO

from agent.inference.processing.lazy import np
from agent.inference.sources.base import BaseSource, Pacer, SourceFailedError, Window

READ_FRAMES = 4096


class _Reader:
    """Mono float32 samples in [-1, 1] from a WAV file or raw little-endian PCM, in chunks."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.wav: wave.Wave_read | None = None
        self.raw: BinaryIO | None = None
        self.channels = 1
        if cfg.format == "wav":
            try:
                self.wav = wave.open(str(cfg.path), "rb")
            except (wave.Error, EOFError) as exc:
                raise SourceFailedError(f"{cfg.path.name} is not a PCM WAV file ({exc})") from None
            if self.wav.getframerate() != cfg.sample_rate:
                rate = self.wav.getframerate()
                self.wav.close()
                raise SourceFailedError(
                    f"{cfg.path.name} is sampled at {rate} Hz but the pipeline expects {cfg.sample_rate} Hz"
                )
            self.width = self.wav.getsampwidth()
            self.channels = self.wav.getnchannels()
            if self.width not in (1, 2, 4):
                raise SourceFailedError(
                    f"{cfg.path.name}: {8 * self.width}-bit samples are not supported (8, 16 or 32-bit PCM)"
                )
        else:
            self.raw = open(cfg.path, "rb")
            self.width = 2 if cfg.format == "s16le" else 4

    def read(self) -> np.ndarray | None:
        if self.wav is not None:
            data = self.wav.readframes(READ_FRAMES)
        else:
            assert self.raw is not None
            data = self.raw.read(READ_FRAMES * self.width)
            data = data[: len(data) - len(data) % self.width]
        if not data:
            return None
        if self.cfg.format == "f32le":
            samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        elif self.width == 1:
            samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        elif self.width == 2:
            samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        else:
            samples = np.frombuffer(data, dtype="<i4").astype(np.float32) / 2147483648.0
        if self.channels > 1:
            samples = samples[: len(samples) - len(samples) % self.channels].reshape(-1, self.channels).mean(axis=1)
        return samples

    def close(self) -> None:
        if self.wav is not None:
            self.wav.close()
        if self.raw is not None:
            self.raw.close()


class Source(BaseSource[Config]):
    """Windows of `window` samples every `hop`, each with `context` samples before it prepended (as
    Silero VAD wants: 512 + 64 at 16 kHz). `t` is the window's start in seconds; the tail is padded
    with zeros so that the end of the stream is heard too."""

    sensor = True

    @staticmethod
    def example(config: Config) -> np.ndarray | None:
        return np.zeros(config.window + config.context, dtype=np.float32)

    def frames(self, stop: threading.Event) -> Iterator[Window]:
        cfg = self.config
        if not cfg.path.exists():
            raise FileNotFoundError(f"{cfg.path} does not exist")
        window, hop, context = cfg.window, cfg.hop or cfg.window, cfg.context
        reader = _Reader(cfg)
        pacer = Pacer(cfg.sample_rate / hop if cfg.realtime else None)
        buf = np.zeros(context, dtype=np.float32)  # buf[0] is sample number `start - context`
        start = 0  # index of the next window's first sample
        ended = False
        try:
            while not stop.is_set():
                if not ended and len(buf) < context + window:
                    chunk = reader.read()
                    if chunk is None:
                        ended = True
                    else:
                        buf = np.concatenate([buf, chunk])
                    continue
                if len(buf) < context + window:
                    if len(buf) <= context:
                        return
                    buf = np.concatenate([buf, np.zeros(context + window - len(buf), dtype=np.float32)])
                    ended_tail = True
                else:
                    ended_tail = False
                if not pacer.wait(stop):
                    return
                data = buf[: context + window].copy()
                yield Window(data, time.time(), self.next_seq(), start / cfg.sample_rate)
                start += hop
                buf = buf[hop:]
                if ended_tail:
                    return
        finally:
            reader.close()
