#!/bin/sh
# Whole-digit sampling of a PixelCNN checkpoint, cached, naive, cached again, one thread; the
# PNGs must be byte-identical. Usage: runs/pixelcnn-naive-64.sh CHECKPOINT > runs/NAME.out
c=$1
w=${WAVEGEN:-target/release/wavegen}
for m in cached naive cached; do
  echo "== $m"
  $w --threads 1 mnist sample --checkpoint "$c" --n 64 --seed 0 --method $m --json --out /tmp/pcnn-$m.png
done
cmp /tmp/pcnn-cached.png /tmp/pcnn-naive.png && echo IDENTICAL
