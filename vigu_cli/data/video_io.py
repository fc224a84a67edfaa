"""Video files and tensors: mp4 (H.264) read/write through imageio-ffmpeg, frame sampling, resizing.

Numpy videos are uint8 [F, H, W, 3]; tensors are float [3, F, H, W] in [-1, 1].
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from vigu_cli.errors import VigUError

def read_video(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as uint8 [F, H, W, 3]."""
    path = Path(path)
    if path.is_dir():
        raise VigUError(f"{path}: is a folder, not a video file; give the video's path")
    if not path.is_file():
        raise VigUError(f"{path}: no such video file; check the path")
    try:
        frames = iio.imread(path, plugin="FFMPEG")
    except OSError as error:  # imageio reports unreadable files as OSError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VigUError(f"{path}: cannot be read as a video ({reason}); re-encode it as an mp4 (H.264)") from None
    if frames.ndim != 4 or len(frames) == 0:
        raise VigUError(f"{path}: holds no video frames; re-encode it as an mp4 (H.264)")
    return frames


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write uint8 [F, H, W, 3] frames as an mp4 (H.264, yuv420p), atomically: a temporary file in the
    same folder, renamed into place once complete. yuv420p needs an even height and width."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        size = f"{frames.shape[1]}x{frames.shape[2]}"
        raise VigUError(f"{path}: mp4 (H.264 yuv420p) needs an even height and width, got {size}; use an even canvas")
    path.parent.mkdir(parents=True, exist_ok=True)
    # ffmpeg creates the temporary file, so it gets the usual permissions (mkstemp's would be 0600)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    try:
        iio.imwrite(
            temporary, frames, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1,
            ffmpeg_log_level="error", plugin="FFMPEG",
        )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def fit_video(frames: np.ndarray, num_frames: int, height: int, width: int) -> np.ndarray:
    """`num_frames` frames spread evenly over the clip, resized (anti-aliased, keeping the aspect ratio)
    to cover height x width, then centre-cropped to it. The clip needs at least `num_frames` frames."""
    if len(frames) < num_frames:
        raise ValueError(f"the clip has {len(frames)} frames, fewer than the {num_frames} needed")
    frames = frames[np.rint(np.linspace(0, len(frames) - 1, num_frames)).astype(int)]
    _, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_clip(path: str | os.PathLike, num_frames: int, height: int, width: int) -> np.ndarray:
    """read_video + fit_video, with a clear error for a clip that is too short."""
    frames = read_video(path)
    if len(frames) < num_frames:
        raise VigUError(
            f"{path}: has {len(frames)} frames, fewer than the {num_frames} the model reads; give a clip of at least "
            f"{num_frames} frames"
        )
    return fit_video(frames, num_frames, height, width)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (clamped, rounded)."""
    pixels = ((video.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).numpy()
