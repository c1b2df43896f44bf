"""Sans-IO wire format: framing, message types, msgpack codec, limits."""

from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, frame

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FrameDecoder", "WireError", "frame"]
