#!/usr/bin/env python3
"""The peer of `cargo bench --bench wavenet -- train_step`: the same WaveNet (wavegen's `default`
or `realtime` preset) and the same training step (forward, backward, gradient clipping, AdamW)
in PyTorch on the CPU, in f32 and with bf16 autocast. Prints target samples per second.

Run by hand on an idle machine, never in CI:
    pip install torch numpy
    python3 benches/peers/wavenet_train.py --threads 1
    python3 benches/peers/wavenet_train.py --threads 2 --preset realtime
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # layers per cycle, cycles, kernel, residual, gate, skip, head
    "default": (10, 2, 2, 32, 32, 128, 128),
    "realtime": (12, 1, 2, 32, 32, 64, 64),
}


class WaveNet(nn.Module):
    def __init__(self, lpc, cycles, k, c, g, s, h, classes=256):
        super().__init__()
        self.k, self.g = k, g
        self.dilations = [2 ** (i % lpc) for i in range(lpc * cycles)]
        self.embed = nn.Embedding(classes, c)
        self.dilated = nn.ModuleList(nn.Conv1d(c, 2 * g, k, dilation=d) for d in self.dilations)
        self.residual = nn.ModuleList(nn.Conv1d(g, c, 1) for _ in self.dilations)
        self.skip = nn.ModuleList(nn.Conv1d(g, s, 1) for _ in self.dilations)
        self.head0 = nn.Conv1d(s, h, 1)
        self.head1 = nn.Conv1d(h, classes, 1)
        self.receptive_field = 1 + (k - 1) * sum(self.dilations)

    def forward(self, tokens):  # (B, T) → logits (B, V, T)
        x = self.embed(tokens).transpose(1, 2)  # (B, C, T)
        x = F.pad(x, (1, 0))[:, :, :-1]  # position t sees token t − 1
        skip = 0
        for conv, res, sk, d in zip(self.dilated, self.residual, self.skip, self.dilations):
            pre = conv(F.pad(x, ((self.k - 1) * d, 0)))
            z = torch.tanh(pre[:, : self.g]) * torch.sigmoid(pre[:, self.g :])
            x = x + res(z)
            skip = skip + sk(z)
        return self.head1(F.relu(self.head0(F.relu(skip))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default", choices=PRESETS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = WaveNet(*PRESETS[a.preset])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    rf = model.receptive_field
    tokens = torch.randint(0, 256, (a.batch, rf + a.window))
    for precision in ["f32", "bf16"]:
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(tokens)[:, :, rf:]
            loss = F.cross_entropy(logits.float(), tokens[:, rf:])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        for _ in range(4):  # warm-up
            step()
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        median = sorted(times)[len(times) // 2]
        print(f"pytorch {torch.__version__} {a.preset} {precision} threads={a.threads} "
              f"batch {a.batch} x {a.window}: {a.batch * a.window / median:,.0f} target samples/s (median of {a.steps})")


if __name__ == "__main__":
    main()
