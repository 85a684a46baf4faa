#!/usr/bin/env python3
"""The peer of `cargo bench --bench images -- pixelcnn`: the same Gated PixelCNN and PixelCNN
as wavegen's (12 layers of 64 channels, a 7×7 first layer then 3×3, a 1×1 head of 256, two
input channels: the pixel and a constant one) and the same training step (forward, backward,
AdamW) on binary 28 × 28 images in PyTorch on the CPU, in f32 and with bf16 autocast, as
ordinary PyTorch code writes them (Conv2d with cropped kernels for the stacks, a masked Conv2d
for PixelCNN). Prints training images per second.

Run by hand on an idle machine, never in CI:
    pip install torch
    python3 benches/peers/pixelcnn_train.py --threads 2
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def with_ones(x):  # (B, 1, H, W) → (B, 2, H, W): the pixel and a channel of ones
    return torch.cat([x, torch.ones_like(x)], 1)


class GatedLayer(nn.Module):
    def __init__(self, c_in, c, k, first):
        super().__init__()
        self.k, self.first = k, first
        self.vertical = nn.Conv2d(c_in, 2 * c, (k // 2 + 1, k))  # rows above and this one
        self.horizontal = nn.Conv2d(c_in, 2 * c, (1, k // 2 + (0 if first else 1)))
        self.link = nn.Conv2d(2 * c, 2 * c, 1)
        self.residual = nn.Conv2d(c, c, 1)

    def forward(self, v, h):
        r = self.k // 2
        v_pre = self.vertical(F.pad(v, (r, r, r, 0)))
        down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # the row above reaches the horizontal stack
        h_in = F.pad(h, (r, 0))[..., :-1] if self.first else F.pad(h, (r, 0))
        h_pre = self.horizontal(h_in) + self.link(down)
        gate = lambda p: torch.tanh(p[:, : p.shape[1] // 2]) * torch.sigmoid(p[:, p.shape[1] // 2 :])
        out = self.residual(gate(h_pre))
        return gate(v_pre), out if self.first else out + h


class GatedPixelCNN(nn.Module):
    def __init__(self, c=64, layers=12, head=256):
        super().__init__()
        self.layers = nn.ModuleList(GatedLayer(2 if i == 0 else c, c, 7 if i == 0 else 3, i == 0) for i in range(layers))
        self.head0, self.head1 = nn.Conv2d(c, head, 1), nn.Conv2d(head, 2, 1)

    def forward(self, x):
        v = h = with_ones(x)
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head1(F.relu(self.head0(F.relu(h))))


class MaskedConv(nn.Conv2d):
    def __init__(self, c_in, c_out, k, center):
        super().__init__(c_in, c_out, k, padding=k // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, k // 2, k // 2 + (1 if center else 0) :] = 0
        mask[:, :, k // 2 + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    def __init__(self, c=64, layers=12, head=256):
        super().__init__()
        self.input = MaskedConv(2, 2 * c, 7, center=False)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(2 * c, c, 1), MaskedConv(c, c, 3, center=True), nn.Conv2d(c, 2 * c, 1)])
            for _ in range(layers - 1)
        )
        self.head0, self.head1 = nn.Conv2d(2 * c, head, 1), nn.Conv2d(head, 2, 1)

    def forward(self, x):
        h = self.input(with_ones(x))
        for reduce, conv, expand in self.blocks:
            h = h + expand(F.relu(conv(F.relu(reduce(F.relu(h))))))
        return self.head1(F.relu(self.head0(F.relu(h))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="both", choices=["gated", "plain", "both"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = (torch.rand(a.batch, 1, 28, 28) < 0.13).float()
    target = x[:, 0].long()
    models = {"gated-pixelcnn": GatedPixelCNN, "pixelcnn": PixelCNN}
    for name, make in models.items():
        if a.model != "both" and (a.model == "gated") != (name == "gated-pixelcnn"):
            continue
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        for precision in ["f32", "bf16"]:
            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), target)
                opt.zero_grad()
                loss.backward()
                opt.step()

            for _ in range(2):  # warm-up
                step()
            times = []
            for _ in range(a.steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            median = sorted(times)[len(times) // 2]
            print(f"pytorch {torch.__version__} {name} 64x12 {precision} threads={a.threads} batch {a.batch}: "
                  f"{a.batch / median:.1f} images/s (median of {a.steps})", flush=True)


if __name__ == "__main__":
    main()
