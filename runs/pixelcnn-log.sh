#!/bin/sh
# The PixelCNN-96 log as it will read once this session's run is appended: the committed log,
# this session's header and the run's output without the per-step progress lines.
d=checkpoints/mnist-pixelcnn-96
out() { tr '\r' '\n' < "$1" | grep -av "^epoch *[0-9]*/782" | grep -v "^$"; }
grep -v "^# stopped by SIGKILL after epoch 9's checkpoint (the end of session 23)" "$d/train.log"
echo "# stopped by SIGKILL after epoch 9's checkpoint (the end of session 23)"
echo "# session 24: wavegen --threads 2 mnist train --model pixelcnn --out $d --resume --epochs 15 (the same machine; the averaging carried over)"
out runs/s24-pixelcnn.out
