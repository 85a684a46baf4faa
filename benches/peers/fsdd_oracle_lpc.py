"""What a source-filter model that is told each frame's true spectral envelope and level
scores on the held-out FSDD files, in bits per mu-law code: a reference for how much a
vocoder's features can lower the NLL (issue 14's "1 bit below the unconditioned model").

Each file is read as wavegen reads it (trimmed at 40 dB below its peak, mu-law coded).
For every hop of 128 samples, a linear predictor of order 16 is fitted to the decoded
codes of a 512-sample Hann window centred on the hop (autocorrelation method), and the
hop's residual variance is measured in place: an oracle, since it sees the hop it scores.
Each code then costs -log2 of the Gaussian mass of its mu-law bin, centred on the
prediction. Printed: the mean, and the mean by the hop's level relative to the file's
peak (quiet hops are the recording's background noise, which no feature predicts).

    python3 benches/peers/fsdd_oracle_lpc.py [--data ../shared/datasets]

Run by hand; not part of the tests.
"""

import argparse
import json
import math
import os

import numpy as np
import soundfile as sf
from scipy.linalg import solve_toeplitz
from scipy.special import ndtr

MU = 255.0
HOP, WINDOW, ORDER = 128, 512, 16


def encode(x):
    x = np.clip(x, -1.0, 1.0)
    f = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    return np.floor((f + 1.0) * 0.5 * MU + 0.5).astype(np.int64)


def decode(c):
    f = 2.0 * np.asarray(c, dtype=np.float64) / MU - 1.0
    return np.sign(f) * np.expm1(np.log1p(MU) * np.abs(f)) / MU


# Bin edges in the signal domain: code c covers the values that round to it.
CODES = np.arange(256)
LOWER = np.where(CODES == 0, -np.inf, decode(np.clip(CODES - 0.5, 0, 255)))
UPPER = np.where(CODES == 255, np.inf, decode(np.clip(CODES + 0.5, 0, 255)))


def trim(x, db=40.0):
    peak = np.abs(x).max()
    if peak == 0:
        return x
    above = np.nonzero(np.abs(x) >= peak * 10 ** (-db / 20))[0]
    return x[above[0] : above[-1] + 1]


def lpc(frame, order):
    r = np.correlate(frame, frame, "full")[len(frame) - 1 : len(frame) + order]
    if r[0] <= 0:
        return np.zeros(order)
    r = r.copy()
    r[0] *= 1.0 + 1e-9  # white-noise correction keeps the system well posed
    return solve_toeplitz(r[:order], r[1 : order + 1])


def file_bits(codes):
    x = decode(codes)
    peak = np.abs(x).max()
    window = np.hanning(WINDOW)
    bits, levels = [], []
    for start in range(0, len(x), HOP):
        end = min(start + HOP, len(x))
        centre = (start + end) // 2
        lo = max(0, centre - WINDOW // 2)
        seg = x[lo : lo + WINDOW]
        a = lpc(seg * window[: len(seg)], ORDER)
        past = np.concatenate([np.zeros(ORDER), x])
        pred = np.array([past[ORDER + t - ORDER : ORDER + t][::-1] @ a for t in range(start, end)])
        resid = x[start:end] - pred
        sigma = max(np.sqrt(np.mean(resid**2)), 1e-6)
        c = codes[start:end]
        mass = ndtr((UPPER[c] - pred) / sigma) - ndtr((LOWER[c] - pred) / sigma)
        bits.append(-np.log2(np.maximum(mass, 1e-300)))
        rms = np.sqrt(np.mean(x[start:end] ** 2))
        levels.append(np.full(end - start, 20 * np.log10(max(rms, 1e-9) / peak)))
    return np.concatenate(bits), np.concatenate(levels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("WAVEGEN_DATA", "../shared/datasets"))
    ap.add_argument("--checkpoint", default="checkpoints/fsdd")
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.checkpoint, "config.json")))
    folder = os.path.join(args.data, "fsdd", "recordings")
    bits, levels = [], []
    for name in cfg["audio"]["val_files"]:
        x, rate = sf.read(os.path.join(folder, name), dtype="float64")
        assert rate == 8000 and x.ndim == 1, name
        b, l = file_bits(encode(trim(x)))
        bits.append(b)
        levels.append(l)
    bits, levels = np.concatenate(bits), np.concatenate(levels)
    print(f"{len(cfg['audio']['val_files'])} held-out files, {len(bits)} samples")
    print(f"oracle LPC-{ORDER}: {bits.mean():.4f} bits/sample")
    edges = [-math.inf, -40, -30, -20, -10, math.inf]
    for lo, hi in zip(edges, edges[1:]):
        sel = (levels >= lo) & (levels < hi)
        if sel.any():
            print(f"  hop level {lo:>5} to {hi:>5} dB below peak: {sel.mean()*100:5.1f}% of samples, {bits[sel].mean():.3f} bits")


if __name__ == "__main__":
    main()
