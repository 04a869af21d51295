"""``qwen3guard.media.v1`` messages to and from the vision-language models' types, and where
their pixels are decoded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from guard.retrieval.vision import Content, Video, VisionLimits
from server.qwen3guard.media.v1 import media_pb2 as pb

T = TypeVar("T")


class MediaDecoding:
    """Images and video frames are decoded and resized on worker threads, at most ``workers`` at
    once: that work takes milliseconds to seconds per input and must never hold the event loop
    (every other stream waits on it), and each decode holds its pixels until its batch runs. One
    instance serves every service that takes media."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"media decoding needs at least one worker, got {workers}")
        self.workers = workers
        self._slots = asyncio.Semaphore(workers)

    async def run(self, build: Callable[[], T]) -> T:
        """``build()`` (decoding its inputs' media) on a worker thread, once a slot is free."""
        async with self._slots:
            return await asyncio.to_thread(build)


def to_video(video: pb.Video) -> Video:
    return Video(tuple(frame.data for frame in video.frames), video.fps)


def to_content(content: pb.Content) -> Content:
    return Content(
        content.text,
        tuple(image.data for image in content.images),
        tuple(to_video(v) for v in content.videos),
    )


def vision_limits_message(limits: VisionLimits) -> pb.VisionLimits:
    return pb.VisionLimits(
        image_min_pixels=limits.image_min_pixels,
        image_max_pixels=limits.image_max_pixels,
        frame_min_pixels=limits.frame_min_pixels,
        frame_max_pixels=limits.frame_max_pixels,
        video_max_pixels=limits.video_max_pixels,
        max_frames=limits.max_frames,
        max_media=limits.max_media,
        max_encoded_bytes=limits.max_encoded_bytes,
        max_source_pixels=limits.max_source_pixels,
    )
