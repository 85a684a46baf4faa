"""Mel-cepstral distortion by level: where a vocoder's distance from the original comes from.

Reads the JSON of `wavegen vocode ... --compare --json` (the originals, the vocoder's outputs
and Griffin-Lim's), recomputes the MCD of `src/audio/distortion.rs` frame by frame (checked:
each file's mean matches the report's), and prints it for frames grouped by their level below
the original's loudest frame. As a yardstick for frames of background noise it also measures
two stretches of the original's own noise against each other: frames at least 10 frames (50
ms, past the 32-ms window) apart, both more than 40 dB below the loudest and within 3 dB of
each other, i.e. two independent draws of the same noise, which is what a perfect sampler
gives where the features hold only the noise's level and colour. Last, for the loud frames
(within 10 dB of the loudest), each band's error (bias and root mean square, dB) and the MCD
the vocoder would have with its lowest band taken from the original. Run by hand (numpy):

    wavegen vocode --held-out --checkpoint checkpoints/fsdd-vocoder-large --out held-out --compare --json > compare.json
    python3 benches/peers/mcd_by_level.py compare.json
"""

import json
import sys
import wave

import numpy as np

D = 24  # cepstral coefficients after c0


def read(path):
    with wave.open(path) as w:
        assert w.getsampwidth() == 2, path
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
        return x.reshape(-1, w.getnchannels()).mean(axis=1), w.getframerate()


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def analysis(rate):
    """`MelConfig::measuring`: ~32 ms window (a power of two), 5 ms hop, 40 HTK bands."""
    n_fft = 1 << int(np.ceil(np.log2(rate * 32 // 1000)))
    hop = rate // 200
    bands = min(40, n_fft // 4)
    pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), bands + 2))
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    bank = np.zeros((bands, len(freqs)))
    for m in range(bands):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        bank[m] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
    return n_fft, hop, bank


def log_mel(x, n_fft, hop, bank):
    frames = len(x) // hop + 1
    padded = np.concatenate([np.zeros(n_fft // 2), x, np.zeros(n_fft)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    mags = np.abs(np.fft.rfft(padded[idx] * window, axis=1))
    return np.log(np.maximum(mags @ bank.T, 1e-5))


def cepstra(logmel):
    m = logmel.shape[1]
    d = min(D, m - 1)
    k = np.arange(1, d + 1)[:, None]
    basis = np.cos(np.pi * k * (np.arange(m)[None, :] + 0.5) / m)  # (d, M)
    floored = np.maximum(logmel, logmel.max() - 4.0 * np.log(10.0))
    return 2.0 * floored @ basis.T / m


def per_frame_mcd(ca, cb):
    return (10.0 / np.log(10.0)) * np.sqrt(2.0 * ((ca - cb) ** 2).sum(axis=1))


def main(path):
    report = json.load(open(path))
    levels = [(0, 10), (10, 20), (20, 30), (30, 40), (40, 60)]
    sums = {name: np.zeros(len(levels)) for name in ("wavenet", "griffin_lim")}
    counts = np.zeros(len(levels))
    noise_pairs, noise_gl, noise_wn, worst = [], [], [], 0.0
    band_errors = {"wavenet": [], "griffin_lim": []}
    lowest_fixed = []
    for f in report["files"]:
        x, rate = read(f["input"])
        n_fft, hop, bank = analysis(rate)
        a = log_mel(x, n_fft, hop, bank)
        energy = np.exp(2 * a).sum(axis=1)
        below = 10 * np.log10(energy.max() / energy)
        ca = cepstra(a)
        outs = {"wavenet": f["out"], "griffin_lim": f["comparison"]["griffin_lim_out"]}
        per = {}
        for name, out in outs.items():
            y, _ = read(out)
            b = log_mel(y, n_fft, hop, bank)
            n = min(len(a), len(b))
            per[name] = per_frame_mcd(ca[:n], cepstra(b)[:n])
            keep = below[:n] <= 60
            worst = max(worst, abs(per[name][keep].mean() - f["comparison"][name]["mcd_db"]))
            loud = below[:n] <= 10
            floored = lambda m: np.maximum(m[:n][loud], m.max() - 4.0 * np.log(10.0))
            band_errors[name].append((floored(b) - floored(a)) * 20.0 / np.log(10.0))
            if name == "wavenet":
                fixed = b[:n].copy()
                fixed[:, 0] = a[:n, 0]
                lowest_fixed.append(per_frame_mcd(ca[:n], cepstra(fixed))[keep].mean())
            for i, (lo, hi) in enumerate(levels):
                sel = keep & (below[:n] >= lo) & (below[:n] < hi if hi < 60 else below[:n] <= 60)
                sums[name][i] += per[name][sel].sum()
                if name == "wavenet":
                    counts[i] += sel.sum()
        # Two independent stretches of the same background noise.
        n = min(len(per["wavenet"]), len(per["griffin_lim"]))
        quiet = [t for t in range(n) if 40 < below[t] <= 60]
        for t in quiet:
            match = [u for u in quiet if u >= t + 10 and abs(below[u] - below[t]) <= 3]
            if match:
                u = match[0]
                noise_pairs.append(per_frame_mcd(ca[t : t + 1], ca[u : u + 1])[0])
                noise_gl.append(per["griffin_lim"][t])
                noise_wn.append(per["wavenet"][t])
    print(f"{len(report['files'])} files; largest difference from the report's per-file MCD: {worst:.4f} dB")
    print(f"{'below the loudest frame':>24} {'frames':>7} {'share':>6} {'WaveNet':>8} {'Griffin-Lim':>11}")
    total = counts.sum()
    for i, (lo, hi) in enumerate(levels):
        c = counts[i]
        print(f"{lo:>13}–{hi} dB {int(c):>7} {c / total:6.1%} {sums['wavenet'][i] / c:8.2f} {sums['griffin_lim'][i] / c:11.2f}")
    print(f"{'all (frame-weighted)':>24} {int(total):>7} {'':6} {sums['wavenet'].sum() / total:8.2f} {sums['griffin_lim'].sum() / total:11.2f}")
    print(f"background noise, {len(noise_pairs)} frames more than 40 dB down: "
          f"two stretches of the original {np.mean(noise_pairs):.2f} dB, "
          f"WaveNet {np.mean(noise_wn):.2f}, Griffin-Lim {np.mean(noise_gl):.2f}")
    _, _, bank = analysis(rate)
    centre = bank.argmax(axis=1) * rate / (2 * (bank.shape[1] - 1))
    print("loud frames, error per band (resynthesis − original, dB): bias / rms")
    wn, gl = (np.concatenate(band_errors[k]) for k in ("wavenet", "griffin_lim"))
    for m in range(0, len(centre), 4):
        print(f"  band {m:>2} ({centre[m]:6.0f} Hz)  WaveNet {wn[:, m].mean():+5.1f} / {np.sqrt((wn[:, m] ** 2).mean()):4.1f}"
              f"   Griffin-Lim {gl[:, m].mean():+5.1f} / {np.sqrt((gl[:, m] ** 2).mean()):4.1f}")
    print(f"WaveNet's MCD with its lowest band taken from the original: {np.mean(lowest_fixed):.2f} dB "
          f"(as measured: {np.mean([f['comparison']['wavenet']['mcd_db'] for f in report['files']]):.2f})")


if __name__ == "__main__":
    main(sys.argv[1])
