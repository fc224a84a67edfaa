"""Video I/O: mp4 through imageio-ffmpeg, fitting clips to a model's shape, tensors, clear errors."""

import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from vigu_cli.data import video_io
from vigu_cli.data.video_io import fit_video, frames_to_tensor, load_clip, read_video, tensor_to_frames, write_video
from vigu_cli.errors import VigUError


def _clip(num_frames=17, height=32, width=48):
    """A gradient that changes every frame, so frame sampling and cropping are visible."""
    f, h, w = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([f * 10 % 256, h * 255 // height, w * 255 // width], axis=-1).astype(np.uint8)


def _one_line_error(call, *names):
    with pytest.raises(VigUError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names), message
    return message


def test_write_then_read_keeps_shape_dtype_fps_and_content(tmp_path):
    frames = _clip()
    path = tmp_path / "sub" / "clip.mp4"
    write_video(path, frames, fps=8)
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert iio.immeta(path, plugin="FFMPEG")["fps"] == 8 and iio.immeta(path, plugin="FFMPEG")["codec"] == "h264"
    psnr = 10 * np.log10(255**2 / np.mean((back.astype(float) - frames) ** 2))
    assert psnr > 30, psnr  # yuv420p H.264 is lossy, not destructive
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual permissions, not mkstemp's 0600


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_video(path, _clip(), fps=8)
    before = path.read_bytes()

    def broken_encoder(uri, *args, **kwargs):
        with open(uri, "wb") as handle:
            handle.write(b"half an mp4")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video_io.iio, "imwrite", broken_encoder)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(path, _clip(), fps=8)
    with pytest.raises(RuntimeError):
        write_video(tmp_path / "new.mp4", _clip(), fps=8)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"] and path.read_bytes() == before


def test_odd_sizes_and_wrong_arrays_are_refused_before_writing(tmp_path):
    _one_line_error(lambda: write_video(tmp_path / "odd.mp4", _clip(height=33), fps=8), "odd.mp4", "even")
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", _clip().astype(np.float32), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_missing_corrupt_and_truncated_files_give_one_line_errors(tmp_path):
    _one_line_error(lambda: read_video(tmp_path / "nowhere.mp4"), "nowhere.mp4", "no such")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    _one_line_error(lambda: read_video(tmp_path / "noise.mp4"), "noise.mp4", "cannot be read")
    write_video(tmp_path / "good.mp4", _clip(), fps=8)
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: read_video(tmp_path / "cut.mp4"), "cut.mp4", "mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    _one_line_error(lambda: load_clip(tmp_path / "empty.mp4", 17, 32, 32), "empty.mp4")


def test_load_clip_fits_and_refuses_a_short_clip(tmp_path):
    write_video(tmp_path / "clip.mp4", _clip(num_frames=20, height=48, width=80), fps=8)
    assert load_clip(tmp_path / "clip.mp4", 17, 32, 32).shape == (17, 32, 32, 3)
    _one_line_error(lambda: load_clip(tmp_path / "clip.mp4", 33, 32, 32), "clip.mp4", "20 frames", "33")


def test_fit_video_samples_frames_evenly_and_centre_crops():
    frames = _clip(num_frames=33, height=48, width=80)
    fitted = fit_video(frames, 17, 32, 32)
    assert fitted.shape == (17, 32, 32, 3) and fitted.dtype == np.uint8
    assert list(fitted[:, 0, 0, 0]) == [frame * 10 % 256 for frame in range(0, 33, 2)]  # frames 0, 2, ..., 32
    # Scaled by 2/3 to 32 x 53, then columns 10..41 kept: originally columns ~15..62 of 80, whose blue
    # ramp value is ~49..198 (not 0..255: the sides are cropped); all rows are kept.
    assert 40 < fitted[0, 16, 0, 2] < 58 and 190 < fitted[0, 16, -1, 2] < 206
    assert fitted[0, 0, 16, 1] < 10 and fitted[0, -1, 16, 1] > 240
    assert np.array_equal(fit_video(frames, 33, 48, 80), frames)
    with pytest.raises(ValueError, match="fewer"):
        fit_video(frames, 34, 32, 32)


def test_tensors_round_trip_exactly():
    frames = _clip()
    video = frames_to_tensor(frames)
    assert video.shape == (3, 17, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.min() == -1
    assert np.array_equal(tensor_to_frames(video), frames)
    assert tensor_to_frames(torch.full((3, 1, 2, 2), 3.0)).max() == 255  # clamped
    assert tensor_to_frames(torch.full((3, 1, 2, 2), -3.0)).max() == 0
