"""Per-band level of a vocoder's output and of Griffin-Lim's against the original.

Reads the JSON of `wavegen vocode ... --compare --json` and prints, for each of 40 mel bands
(the distances' own analysis: 32 ms window, 5 ms hop, HTK mel, amplitude), the mean over files
of the mean over the louder half of each file's frames of 20 log10(resynthesis / original):
whether a resynthesis is too loud or too quiet in some band on average, as opposed to rough
from frame to frame. Run by hand (needs numpy, soundfile, librosa):

    wavegen vocode --held-out --checkpoint checkpoints/fsdd-vocoder --out held-out --compare --json > compare.json
    python3 benches/peers/vocoder_band_bias.py compare.json
"""

import json
import sys

import librosa
import numpy as np
import soundfile as sf


def log_mel(x, rate):
    n_fft = 1 << int(np.ceil(np.log2(0.032 * rate)))
    spec = librosa.feature.melspectrogram(
        y=x.astype(np.float32), sr=rate, n_fft=n_fft, hop_length=int(0.005 * rate), n_mels=40,
        power=1, htk=True, norm=None, center=True, pad_mode="constant")
    return np.log(np.maximum(spec, 1e-5))


def main(path):
    report = json.load(open(path))
    bias = {"vocoder": [], "griffin-lim": []}
    for f in report["files"]:
        original, rate = sf.read(f["input"])
        outputs = {"vocoder": sf.read(f["out"])[0], "griffin-lim": sf.read(f["comparison"]["griffin_lim_out"])[0]}
        n = min(len(original), *(len(y) for y in outputs.values()))
        reference = log_mel(original[:n], rate)
        loud = reference.sum(0) > np.median(reference.sum(0))
        for name, y in outputs.items():
            bias[name].append((log_mel(y[:n], rate) - reference)[:, loud].mean(1))
    np.set_printoptions(precision=1, suppress=True, linewidth=160)
    for name, rows in bias.items():
        print(f"{name} - original, dB per band, low to high:")
        print(np.mean(rows, 0) * 20 / np.log(10))


if __name__ == "__main__":
    main(sys.argv[1])
