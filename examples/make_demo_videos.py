"""Write a few short synthetic videos (coloured scenes with a moving bar) for trying prvr without a library.

Usage: python examples/make_demo_videos.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np

SCENES = {
    "sunset_then_sea.mp4": [(250, 120, 40), (20, 60, 200)],
    "forest_walk.mp4": [(30, 140, 50), (60, 180, 70), (30, 140, 50)],
    "snow_and_night.mp4": [(240, 240, 245), (10, 10, 40)],
}


def write(path: Path, colors, seconds_each: float = 3.0, fps: int = 15, size=(160, 120)) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for color in colors:
            for i in range(int(seconds_each * fps)):
                img = np.empty((size[1], size[0], 3), dtype=np.uint8)
                img[:] = color
                x = (i * 4) % size[0]
                img[:, x:x + 8] = 255 - np.asarray(color, dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_videos")
    out.mkdir(parents=True, exist_ok=True)
    for name, colors in SCENES.items():
        write(out / name, colors)
    print(out)
