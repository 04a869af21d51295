"""``qwen3guard.media.v1`` messages to and from the vision-language models' types."""

from __future__ import annotations

from guard.retrieval.vision import Content, Video, VisionLimits
from server.qwen3guard.media.v1 import media_pb2 as pb


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
