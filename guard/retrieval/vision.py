"""Images and videos for Qwen3-VL-Embedding / Qwen3-VL-Reranker: encoded bytes in, the resized
pixels and the vision-token grid out.

The recipe is the models' own (QwenLM/Qwen3-VL-Embedding with qwen-vl-utils and the Qwen3-VL
processor): an image is converted to RGB (transparency over white), resized so both sides are
multiples of ``patch_size * merge_size`` (32) with its pixel count inside ``[min, max]``, and cut
into 16x16 patches repeated over the 2-frame temporal patch; ``merge_size**2`` patches make one
vision token. A video is a list of frames: padded to an even count with its last frame, all
resized to one size under a per-video pixel budget, two frames per temporal patch, each pair
announced by its timestamp (``<0.5 seconds>``) in the prompt.

Everything a caller can send is bounded here, before any pixel is decoded where possible:
encoded size, decoded size (no decompression bombs), formats, frame count, items per input.
Violations are ``InvalidInput`` naming the limit. The pixels are kept as uint8 until the batch
runs (``patchify``), so a queued image costs about 3 bytes per pixel.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from guard.errors import InvalidInput

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow decodes without plug-ins, as named by Pillow
MAX_ASPECT = 200  # the processor refuses longer / shorter images
FACTOR = 32  # patch_size 16 x spatial merge 2 (Qwen3-VL)


@dataclass(frozen=True)
class VisionLimits:
    """What one image or video may be, in pixels and frames (the defaults are the official
    Qwen3-VL-Embedding settings); shared by both services."""

    image_min_pixels: int = 4 * FACTOR * FACTOR  # smaller images are scaled up to this
    image_max_pixels: int = 1800 * FACTOR * FACTOR  # larger images are scaled down to this
    frame_min_pixels: int = 128 * FACTOR * FACTOR
    frame_max_pixels: int = 768 * FACTOR * FACTOR
    video_max_pixels: int = 10 * 768 * FACTOR * FACTOR  # all frames of one video together
    max_frames: int = 64  # frames of one video (more: INVALID_ARGUMENT)
    max_media: int = 16  # images + videos in one input
    max_encoded_bytes: int = 20 * 1024 * 1024  # one encoded image or frame
    max_source_pixels: int = 64_000_000  # one decoded image before resizing
    default_fps: float = 2.0  # frames per second of a video that does not say

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"vision limit `{f.name}` must be > 0, got {getattr(self, f.name)}")
        if self.image_min_pixels > self.image_max_pixels or self.frame_min_pixels > self.frame_max_pixels:
            raise ValueError("vision limits: a minimum pixel count is above its maximum")


@dataclass(frozen=True)
class Video:
    """A video as the client sends it: encoded frames in order and their rate."""

    frames: tuple[bytes, ...]
    fps: float = 0.0  # 0: the configured default


@dataclass(frozen=True)
class Content:
    """One side of a multimodal input: text, images (encoded bytes) and videos."""

    text: str = ""
    images: tuple[bytes, ...] = ()
    videos: tuple[Video, ...] = ()

    @property
    def has_media(self) -> bool:
        return bool(self.images or self.videos)


@dataclass(frozen=True, eq=False)
class Visual:
    """One image or video, resized: ``pixels`` is ``[frames, height, width, 3]`` uint8 (an image has
    one frame; it is repeated over the temporal patch when patchified)."""

    kind: str  # "image" or "video"
    pixels: np.ndarray
    grid: tuple[int, int, int]  # (t, h, w) in patches
    timestamps: tuple[float, ...] = ()  # a video's: one per temporal patch, in seconds

    def tokens_per_step(self, merge: int) -> int:
        return self.grid[1] * self.grid[2] // (merge * merge)

    def tokens(self, merge: int) -> int:
        return self.grid[0] * self.tokens_per_step(merge)


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """Sides that are multiples of ``factor``, close to the aspect ratio, with the pixel count
    inside ``[min_pixels, max_pixels]`` (qwen-vl-utils' rule)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InvalidInput(
            f"an image of {width}x{height} has an aspect ratio above {MAX_ASPECT}; Qwen3-VL cannot read it"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, limits: VisionLimits, what: str):
    """An RGB ``PIL.Image`` from encoded bytes; refuses what is too large, not an image, or in a
    format outside ``FORMATS``."""
    from PIL import Image

    if not data:
        raise InvalidInput(f"{what} is empty")
    if len(data) > limits.max_encoded_bytes:
        raise InvalidInput(f"{what} has {len(data)} bytes; the limit is {limits.max_encoded_bytes} (max_encoded_bytes)")
    try:  # reads the header only, and only the accepted formats' parsers ever see the bytes
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Exception as exc:  # Pillow raises several types for undecodable input
        raise InvalidInput(
            f"{what} is not a decodable image in an accepted format ({', '.join(FORMATS)}): {type(exc).__name__}"
        ) from None
    with image:
        width, height = image.size
        if width * height > limits.max_source_pixels:
            raise InvalidInput(
                f"{what} is {width}x{height} = {width * height} pixels; the limit is "
                f"{limits.max_source_pixels} (max_source_pixels)"
            )
        if width < 1 or height < 1:
            raise InvalidInput(f"{what} has no pixels")
        try:
            image.load()
            return _to_rgb(image)
        except Exception as exc:
            raise InvalidInput(
                f"{what} is a truncated or corrupt {image.format} image ({type(exc).__name__})"
            ) from None


def _to_rgb(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def _resized(image, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)


def load_image(data: bytes, limits: VisionLimits, what: str, *, patch: int = 16, merge: int = 2) -> Visual:
    image = decode_image(data, limits, what)
    width, height = image.size
    h, w = smart_resize(
        height, width, min_pixels=limits.image_min_pixels, max_pixels=limits.image_max_pixels, factor=patch * merge
    )
    return Visual("image", _resized(image, h, w)[None], (1, h // patch, w // patch))


def load_video(
    video: Video, limits: VisionLimits, what: str, *, patch: int = 16, merge: int = 2, temporal: int = 2
) -> Visual:
    count = len(video.frames)
    if count == 0:
        raise InvalidInput(f"{what} has no frames")
    if count > limits.max_frames:
        raise InvalidInput(f"{what} has {count} frames; the limit is {limits.max_frames} (max_frames)")
    if not (video.fps >= 0 and math.isfinite(video.fps)):
        raise InvalidInput(f"{what}.fps is {video.fps}; give a positive rate or 0 for the default")
    fps = video.fps or limits.default_fps
    padded = math.ceil(count / temporal) * temporal
    first = decode_image(video.frames[0], limits, f"{what}.frames[0]")
    width, height = first.size
    per_frame = max(
        min(limits.frame_max_pixels, limits.video_max_pixels / padded * temporal), int(limits.frame_min_pixels * 1.05)
    )
    h, w = smart_resize(
        height, width, min_pixels=limits.frame_min_pixels, max_pixels=int(per_frame), factor=patch * merge
    )
    # one frame at full size at a time: each is resized as soon as it is decoded
    resized = [_resized(first, h, w)]
    del first
    for i, data in enumerate(video.frames[1:], start=1):
        resized.append(_resized(decode_image(data, limits, f"{what}.frames[{i}]"), h, w))
    pixels = np.stack(resized)
    if padded > count:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], padded - count, axis=0)])
    # the processor's timestamps: each temporal patch at the mean time of its frames
    stamps = tuple((i + (i + temporal - 1)) / 2 / fps for i in range(0, padded, temporal))
    return Visual("video", pixels, (padded // temporal, h // patch, w // patch), stamps)


def load_content(
    content: Content, limits: VisionLimits, what: str, *, patch: int = 16, merge: int = 2, temporal: int = 2
) -> tuple[list[Visual], list[Visual]]:
    """The content's (videos, images), decoded and resized, or ``InvalidInput`` naming what is wrong."""
    media = len(content.images) + len(content.videos)
    if media > limits.max_media:
        raise InvalidInput(f"{what} has {media} images and videos; the limit is {limits.max_media} (max_media)")
    videos = [
        load_video(v, limits, f"{what}.videos[{i}]", patch=patch, merge=merge, temporal=temporal)
        for i, v in enumerate(content.videos)
    ]
    images = [
        load_image(b, limits, f"{what}.images[{i}]", patch=patch, merge=merge) for i, b in enumerate(content.images)
    ]
    return videos, images


def patchify(
    visuals: Sequence[Visual], *, patch: int, merge: int, temporal: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``[patches, 3 * temporal * patch * patch]`` float32 for the vision tower, visuals in order,
    each in the processor's layout (merge blocks contiguous, channels then time then rows)."""
    out = []
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    for v in visuals:
        frames = torch.from_numpy(v.pixels).permute(0, 3, 1, 2).float().div_(255.0)  # [T, 3, H, W]
        frames = (frames - mean_t) / std_t
        if frames.shape[0] % temporal:
            frames = torch.cat([frames, frames[-1:].expand(temporal - frames.shape[0] % temporal, -1, -1, -1)])
        t, h, w = frames.shape[0] // temporal, frames.shape[2] // patch, frames.shape[3] // patch
        x = frames.reshape(t, temporal, 3, h // merge, merge, patch, w // merge, merge, patch)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        out.append(x.reshape(t * h * w, 3 * temporal * patch * patch))
    return torch.cat(out)
