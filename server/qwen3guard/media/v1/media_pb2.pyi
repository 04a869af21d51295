from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Image(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Video(_message.Message):
    __slots__ = ("frames", "fps")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Image]
    fps: float
    def __init__(self, frames: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., fps: _Optional[float] = ...) -> None: ...

class Content(_message.Message):
    __slots__ = ("text", "images", "videos")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VIDEOS_FIELD_NUMBER: _ClassVar[int]
    text: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    videos: _containers.RepeatedCompositeFieldContainer[Video]
    def __init__(self, text: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., videos: _Optional[_Iterable[_Union[Video, _Mapping]]] = ...) -> None: ...

class VisionLimits(_message.Message):
    __slots__ = ("image_min_pixels", "image_max_pixels", "frame_min_pixels", "frame_max_pixels", "video_max_pixels", "max_frames", "max_media", "max_encoded_bytes", "max_source_pixels")
    IMAGE_MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FRAME_MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FRAME_MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_MEDIA_FIELD_NUMBER: _ClassVar[int]
    MAX_ENCODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    image_min_pixels: int
    image_max_pixels: int
    frame_min_pixels: int
    frame_max_pixels: int
    video_max_pixels: int
    max_frames: int
    max_media: int
    max_encoded_bytes: int
    max_source_pixels: int
    def __init__(self, image_min_pixels: _Optional[int] = ..., image_max_pixels: _Optional[int] = ..., frame_min_pixels: _Optional[int] = ..., frame_max_pixels: _Optional[int] = ..., video_max_pixels: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_media: _Optional[int] = ..., max_encoded_bytes: _Optional[int] = ..., max_source_pixels: _Optional[int] = ...) -> None: ...
