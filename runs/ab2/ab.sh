#!/bin/bash
# Session 21: the parity change (runs/wavegen-parity) and the first-kernel option (runs/wavegen-exp) against both.
exec /work/main/runs/ab.sh runs/ab2 "15 exp both" "15 parity both" "7 exp both" "7 parity both"
