"""A tiny stand-in for MVCNN's ModelNet40 renders: <root>/<class>/<train|test>/
<class>_NNNN.obj.shaded_vVVV.png, 12 gray views per object. In the front view (v001) each
class is a horizontal bar at its own height, in the rear view (v007) a vertical bar at its
own column; the other views are noise. usage: make_mvcnn_fixture.py ROOT [SIZE]"""
import os, random, struct, sys, zlib

def write_png(path, pixels, size):
    raw = b"".join(b"\x00" + bytes(pixels[r * size:(r + 1) * size]) for r in range(size))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

root, size = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32
rng = random.Random(0)
classes = ["bench", "chair", "lamp"]
for label, name in enumerate(classes):
    for split, count in (("train", 10), ("test", 4)):
        d = os.path.join(root, name, split)
        os.makedirs(d)
        for obj in range(1, count + 1):
            for view in range(1, 13):
                px = [rng.randrange(40) for _ in range(size * size)]
                at = 4 + label * (size - 8) // len(classes)
                for k in range(size // 8, size - size // 8):
                    for w in range(3):
                        if view == 1:
                            px[(at + w) * size + k] = 200 + rng.randrange(55)
                        elif view == 7:
                            px[k * size + at + w] = 200 + rng.randrange(55)
                write_png(os.path.join(d, f"{name}_{obj:04d}.obj.shaded_v{view:03d}.png"), px, size)
