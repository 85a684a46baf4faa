#!/bin/bash
# A/B of PixelCNN training speed (session 22: the blocks on narrower rows than a wide first layer):
# from the progress bar between 30 s and 150 s after the start.
cd /work/main
count() { tr '\r' '\n' < $1 | grep -ao "[0-9]*/782" | tail -1 | cut -d/ -f1; }
pair() { # k binA binB
  for b in $2 $3; do
    rm -rf runs/ab3/$b-k$1
    script -qfc "nice runs/wavegen-$b --threads 1 mnist train --model pixelcnn --channels 96 --layers 12 --batch-size 64 --epochs 15 --steps 2000 --first-kernel $1 --out runs/ab3/$b-k$1 --data ../shared/datasets" runs/ab3/$b-k$1.tty > /dev/null &
  done
  sleep 30; a1=$(count runs/ab3/$2-k$1.tty); b1=$(count runs/ab3/$3-k$1.tty)
  sleep 150; a2=$(count runs/ab3/$2-k$1.tty); b2=$(count runs/ab3/$3-k$1.tty)
  pkill -9 -x wavegen-$2; pkill -9 -x wavegen-$3; sleep 2
  echo "k$1 $2 $(( a2 - a1 )) steps/150 s   $3 $(( b2 - b1 )) steps/150 s"
}
pair 15 base narrow
pair 7 base narrow
