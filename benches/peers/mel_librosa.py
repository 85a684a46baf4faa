#!/usr/bin/env python3
"""`wavegen mel` against librosa 0.11: the same log-mel features (centred frames with zero
padding, periodic Hann, magnitudes, HTK mel filters without normalisation, ln with a 1e-5
floor), computed by librosa from the same WAV, compared with the .npy that wavegen wrote.
Run by hand, never in CI:
    pip install librosa soundfile
    wavegen mel FILE.wav --out /tmp/f.npy
    python3 benches/peers/mel_librosa.py FILE.wav /tmp/f.npy RATE
"""
import sys, numpy as np, librosa, soundfile as sf
wav, npy, sr_out = sys.argv[1], sys.argv[2], int(sys.argv[3])
y, sr = sf.read(wav, dtype='float32', always_2d=True); y = y.mean(1)
if sr != sr_out: raise SystemExit("resample not compared")
n_fft = {8000: 512, 16000: 1024}[sr]; bands = 80 if sr >= 16000 else 64
S = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=n_fft, hop_length=n_fft // 4, n_mels=bands, fmin=0.0, fmax=sr / 2,
    htk=True, norm=None, power=1.0, center=True, pad_mode='constant', window='hann')
ref = np.log(np.maximum(S, 1e-5)).T
ours = np.load(npy)
print(wav.split('/')[-1], ours.shape, ref.shape, 'max |diff|', float(np.abs(ours - ref).max()), 'where ref > -9:', float(np.abs(ours - ref)[ref > -9].max()))
