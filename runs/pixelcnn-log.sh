#!/bin/sh
# The PixelCNN-96 log as it will read once this session's run is appended: the committed log,
# this session's header and the run's output without the per-step progress lines.
d=checkpoints/mnist-pixelcnn-96
out() { tr '\r' '\n' < "$1" | grep -av "^epoch *[0-9]*/782" | grep -v "^$"; }
cat "$d/train.log"
echo "# session 23: wavegen --threads 2 mnist train --model pixelcnn --out $d --resume --epochs 15 (AMD EPYC with AVX-512, no AMX: f32 products; about 1.0 step/s on both cores)"
out runs/s23-pixelcnn-a.out
echo "# stopped by SIGKILL after epoch 4's checkpoint, then the same with --average 0.999 (weights averaged from step 3,128)"
out runs/s23-pixelcnn-b.out
echo "# stopped by SIGKILL after epoch 5's checkpoint, then the same with --threads 1 (the other core trains checkpoints/fsdd-vocoder-large)"
out runs/s23-pixelcnn.out
