#!/bin/bash
# A/B of PixelCNN training speed: two binaries (runs/wavegen-A, runs/wavegen-B) side by side,
# one thread each, 96 channels, 12 blocks, batch 64; steps counted from the progress bar
# between 30 s and 180 s after the start. Usage: runs/ab.sh OUTDIR "K A B" ... (K: --first-kernel).
cd /work/main
out=$1; shift
count() { tr '\r' '\n' < $1 | grep -ao "[0-9]*/782" | tail -1 | cut -d/ -f1; }
pair() { # k binA binB
  for b in $2 $3; do
    rm -rf $out/$b-k$1
    script -qfc "nice runs/wavegen-$b --threads 1 mnist train --model pixelcnn --channels 96 --layers 12 --batch-size 64 --epochs 15 --steps 2000 --first-kernel $1 --out $out/$b-k$1 --data ../shared/datasets" $out/$b-k$1.tty > /dev/null &
  done
  sleep 30; a1=$(count $out/$2-k$1.tty); b1=$(count $out/$3-k$1.tty)
  sleep 150; a2=$(count $out/$2-k$1.tty); b2=$(count $out/$3-k$1.tty)
  pkill -9 -x wavegen-$2; pkill -9 -x wavegen-$3; sleep 2
  echo "k$1 $2 $(( a2 - a1 )) steps/150 s   $3 $(( b2 - b1 )) steps/150 s"
}
for p in "$@"; do pair $p; done
