#!/usr/bin/env python3
"""Reference forward pass of a wavegen WaveNet checkpoint in NumPy, from the documented format
(docs/checkpoint-format.md) alone: loads model.safetensors and config.json, μ-law encodes a
16-bit mono WAV recorded at the model's rate, and prints its NLL in bits per sample.

    python3 docs/reference_forward.py checkpoints/fsdd some_8khz_file.wav

`wavegen eval --checkpoint C FILE` prints the same number for a file that needs no resampling
and has no quiet lead-in or tail to trim. Needs: numpy, safetensors.
"""
import gzip
import json
import os
import sys
import wave

import numpy as np
import safetensors.numpy
from safetensors.numpy import load_file

MU = 255.0


def mulaw_encode(x):
    x = np.clip(x, -1.0, 1.0)
    f = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    return np.floor((f + 1.0) * 0.5 * MU + 0.5).astype(np.int64)


def shifted(x, by):
    """x[t - by] with zeros before the start; x is (T, C)."""
    if by == 0:
        return x
    return np.vstack([np.zeros((by, x.shape[1]), x.dtype), x[:-by]])


def logits(w, cfg, tokens, label=None):
    k, layers_per_cycle = cfg["kernel_width"], cfg["layers_per_cycle"]
    g = cfg["gate_channels"]
    x = shifted(w["embed.weight"][tokens], 1)  # position t holds x_{t-1}
    skip = 0.0
    for i in range(layers_per_cycle * cfg["cycles"]):
        d = 2 ** (i % layers_per_cycle)
        p = f"layers.{i}."
        kernel = w[p + "dilated.weight"]  # (k, C, 2G); tap j reads x[t - (k-1-j) d]
        pre = w[p + "dilated.bias"] + sum(shifted(x, (k - 1 - j) * d) @ kernel[j] for j in range(k))
        if label is not None:
            pre = pre + w[p + "label.weight"][label]
        z = np.tanh(pre[:, :g]) / (1.0 + np.exp(-pre[:, g:]))
        x = x + z @ w[p + "residual.weight"] + w[p + "residual.bias"]
        skip = skip + z @ w[p + "skip.weight"] + w[p + "skip.bias"]
    h = np.maximum(np.maximum(skip, 0.0) @ w["head.0.weight"] + w["head.0.bias"], 0.0)
    return h @ w["head.1.weight"] + w["head.1.bias"]


def committed_folder(ckpt):
    """The folder of the committed files: `current`'s target, or the directory itself (flat)."""
    return os.path.join(ckpt, "current") if os.path.isdir(os.path.join(ckpt, "current")) else ckpt


def load_weights(folder):
    """model.safetensors, or the gzip-compressed model.safetensors.gz of a shipping copy."""
    plain = os.path.join(folder, "model.safetensors")
    if os.path.exists(plain):
        return load_file(plain)
    return safetensors.numpy.load(gzip.open(plain + ".gz").read())


def main(ckpt, wav_path):
    ckpt = committed_folder(ckpt)
    manifest = json.load(open(f"{ckpt}/config.json"))
    cfg = manifest["model"]
    rate = manifest["audio"]["settings"]["sample_rate"]
    w = {k: v.astype(np.float64) for k, v in load_weights(ckpt).items()}
    with wave.open(wav_path) as f:
        assert f.getframerate() == rate and f.getnchannels() == 1 and f.getsampwidth() == 2, "16-bit mono at the model rate"
        samples = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2") / 32768.0
    codes = mulaw_encode(samples)
    receptive_field = 1 + (cfg["kernel_width"] - 1) * sum(2 ** (i % cfg["layers_per_cycle"]) for i in range(cfg["layers_per_cycle"] * cfg["cycles"]))
    # Generation and training start from silence: the file is preceded by one receptive field of it.
    tokens = np.concatenate([np.full(receptive_field, mulaw_encode(np.array([0.0]))[0]), codes])
    out = logits(w, cfg, tokens)[receptive_field:]
    log_p = out - out.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    nll = -log_p[np.arange(len(codes)), codes].mean()
    print(f"{nll / np.log(2):.6f} bits/sample over {len(codes)} samples")


if __name__ == "__main__":
    main(*sys.argv[1:3])
