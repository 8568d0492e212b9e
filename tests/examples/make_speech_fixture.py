"""A tiny stand-in for scripts/make-speech's output: SPEAKERS folders of 0.wav .. 9.wav
(16-bit PCM mono, 22050 Hz, 0.3 s) and speakers.tsv. Digit d is a tone at 300 + 150 d Hz;
speakers differ in loudness and a slight pitch shift, so the digit is learnable."""
import math, os, struct, sys, wave

out, speakers = sys.argv[1], int(sys.argv[2])
os.makedirs(out)
rate, seconds = 22050, 0.3
with open(os.path.join(out, "speakers.tsv"), "w") as tsv:
    tsv.write("# fixture\n# speaker\tvoice\tvariant\tspeed\tpitch\n")
    for s in range(speakers):
        name = f"s{s:03d}"
        os.makedirs(os.path.join(out, name))
        amplitude, shift = 6000 + 2000 * (s % 3), 1 + 0.02 * (s % 4)
        for d in range(10):
            f = (300 + 150 * d) * shift
            frames = b"".join(struct.pack("<h", int(amplitude * math.sin(2 * math.pi * f * i / rate)))
                              for i in range(int(rate * seconds)))
            with wave.open(os.path.join(out, name, f"{d}.wav"), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(frames)
        tsv.write(f"{name}\ten-us\tm3\t150\t50\n")
