"""What a diffusion request returns: images, layers or video frames, plus the
resolved parameters it was made with; mp4 export through PyAV."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class DiffusionOutput:
    """One request's result.

    kind      "image" | "layers" | "video" | "latent"
    images    image requests: one PIL image (or HxWx3 array) per output
    layers    Qwen-Image-Layered: per output, its list of RGBA layers
    videos    video requests: per output, its list of frames (PIL or HxWx3 arrays)
    fps       frame rate of `videos`
    latents   output_type="latent": the final latents
    params    the ResolvedParams this output was made with
    dtypes    the dtype each stage ran in, by stage: {"diffusion": ...} for a diffusion-only
              model (its loaded weights'), the AR and DiT stages' for a multi-stage one
    """

    request_id: str
    kind: str
    params: Any
    images: list[Any] = field(default_factory=list)
    layers: list[list[Any]] = field(default_factory=list)
    videos: list[list[Any]] = field(default_factory=list)
    fps: int | None = None
    latents: Any = None
    dtypes: dict[str, str] = field(default_factory=dict)
    # Seconds spent on this output inside the engine, by phase ("decode": the VAE decode of the
    # batch it finished in); for operators' logs and the benchmarks, never for results.
    timings: dict[str, float] = field(default_factory=dict)

    def save_mp4(self, path: str | Path, index: int = 0, codec: str = "libx264", crf: int = 18) -> Path:
        """Write video `index` to an mp4 file (H.264, yuv420p) and return its path."""
        if not self.videos:
            raise ValueError(f"request {self.request_id} has no video output (kind={self.kind})")
        return export_mp4(self.videos[index], path, fps=self.fps or 16, codec=codec, crf=crf)


#: x264 encoder threads (one, so that exports are reproducible; see export_mp4)
X264_THREADS = 1


def _frame_array(frame: Any) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        arr = frame
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        return arr[..., :3]
    return np.asarray(frame.convert("RGB"))


def export_mp4(frames: list[Any], path: str | Path, fps: int, codec: str = "libx264", crf: int = 18) -> Path:
    """Encode frames (PIL images or HxWx3 arrays) into an mp4 file with PyAV."""
    import av  # local: only video export needs it

    if not frames:
        raise ValueError("no frames to export")
    path = Path(path)
    arrays = [_frame_array(f) for f in frames]
    height, width = arrays[0].shape[:2]
    # yuv420p needs even sizes; pad by repeating the last row/column.
    pad_h, pad_w = height % 2, width % 2
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        if codec.startswith("libx264"):
            # One encoder thread: x264's frame threading changes the bitstream with the thread
            # count (its default follows the cores of the process) and with timing, so the
            # server and an offline run wrote different files from identical frames (measured:
            # frame 0 of a 5-frame video decoded differently at threads 2, 4, 8, 16 vs 1).
            # Single-threaded, the same frames give the same mp4 anywhere; encoding is a
            # small part of a video request's time.
            stream.options = {"crf": str(crf)}
            # Through the codec context: PyAV sets the context's own thread count when it opens
            # the encoder, so a "threads" entry in `options` is overridden (measured: the output
            # equalled the auto-threaded one, which follows the CPUs the process may use --
            # the served video's frame 0 differed from the offline one).
            stream.codec_context.thread_count = X264_THREADS
        for arr in arrays:
            if pad_h or pad_w:
                arr = np.pad(arr, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
