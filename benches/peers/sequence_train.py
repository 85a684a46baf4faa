#!/usr/bin/env python3
"""The peer of `cargo bench --bench images -- 'lstm|gru|transformer'`: wavegen's recurrent models
and its transformer on binary 28 × 28 images in raster order (a start token, embeddings, the
logits of each pixel from the ones before it) and the same training step (forward, backward,
AdamW) in PyTorch on the CPU, f32. Prints training images per second.

wavegen's rows: the LSTM and GRU at batch 100 on one thread (`RAYON_NUM_THREADS=1`), the
transformer (4 blocks of 128, 4 heads, MLP 512, pre-norm, learned positions) at batch 16 on
both cores. Run by hand on an idle machine, never in CI:
    pip install torch
    python3 benches/peers/sequence_train.py
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PIXELS = 784


class Recurrent(nn.Module):
    def __init__(self, cell, hidden, embedding=16):
        super().__init__()
        self.embed = nn.Embedding(3, embedding)  # 0, 1 and the start token 2
        self.rnn = cell(embedding, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def forward(self, inputs):
        return self.out(self.rnn(self.embed(inputs))[0])


class Block(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.ReLU(), nn.Linear(mlp, d))

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, d=128, heads=4, layers=4, mlp=512):
        super().__init__()
        self.embed = nn.Embedding(3, d)
        self.position = nn.Parameter(torch.randn(PIXELS, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, mlp) for _ in range(layers))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, 2)
        self.register_buffer("mask", torch.triu(torch.full((PIXELS, PIXELS), float("-inf")), 1))

    def forward(self, inputs):
        x = self.embed(inputs) + self.position
        for block in self.blocks:
            x = block(x, self.mask)
        return self.out(self.norm(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = [
        ("lstm-128", lambda: Recurrent(nn.LSTM, 128), 100, 1),
        ("gru-128", lambda: Recurrent(nn.GRU, 128), 100, 1),
        ("lstm-256", lambda: Recurrent(nn.LSTM, 256), 100, 1),
        ("transformer-128x4", Transformer, 16, 2),
    ]
    for name, make, batch, threads in rows:
        torch.set_num_threads(threads)
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        x = (torch.rand(batch, PIXELS) < 0.13).long()
        inputs = torch.cat([torch.full((batch, 1), 2), x[:, :-1]], 1)

        def step():
            loss = F.cross_entropy(model(inputs).reshape(-1, 2), x.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()  # warm-up
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        median = sorted(times)[len(times) // 2]
        print(f"pytorch {torch.__version__} {name} f32 threads={threads} batch {batch}: "
              f"{batch / median:.1f} images/s (median of {a.steps})", flush=True)


if __name__ == "__main__":
    main()
