"""A tiny stand-in for NVGesture with extracted frames: list files in NVGesture's format
and <clip>/sk_color_all/NNNNN.png (RGB), <clip>/sk_depth_all/NNNNN.png (gray) per clip.
In each class a bright square moves in its own direction through the colour frames and
the depth frames. usage: make_nvgesture_fixture.py ROOT"""
import os, random, struct, sys, zlib

def write_png(path, rows, width, height, channels):
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    colour = {1: 0, 3: 2}[channels]
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

root = sys.argv[1]
rng = random.Random(0)
W, H, FRAMES = 24, 20, 12
moves = [(1, 0), (0, 1), (-1, -1)]  # per class: how the square moves per frame
lists = {"train": [], "test": []}
for label, (dx, dy) in enumerate(moves, start=1):
    for split, count in (("train", 10), ("test", 3)):
        for k in range(count):
            rel = f"Video_data/class_{label:02d}/{split}_subject{k:02d}_r0"
            clip = os.path.join(root, rel)
            start, end = 1, FRAMES - 1 - (k % 3)  # gestures of 10, 9, 8 frames
            x0, y0 = 6 + rng.randrange(4), 6 + rng.randrange(4)
            for video, channels in (("sk_color", 3), ("sk_depth", 1)):
                d = os.path.join(clip, video + "_all")
                os.makedirs(d)
                for f in range(FRAMES):
                    x, y = x0 + dx * (f - start), y0 + dy * (f - start)
                    rows = []
                    for r in range(H):
                        row = []
                        for c in range(W):
                            on = start <= f < end and x <= c < x + 4 and y <= r < y + 4
                            v = 230 if on else rng.randrange(30)
                            row += [v, v // 2, 255 - v] if channels == 3 else [v]
                        rows.append(row)
                    write_png(os.path.join(d, f"{f + 1:05d}.png"), rows, W, H, channels)
            lists[split].append(f"path:./{rel} depth:sk_depth:{start}:{end} color:sk_color:{start}:{end} "
                                f"duo_left:duo_left:{start}:{end} label:{label}")
for split, lines in lists.items():
    with open(os.path.join(root, f"nvgesture_{split}_correct_cvpr2016_v2.lst"), "w") as f:
        f.write("\n".join(lines) + "\n")
