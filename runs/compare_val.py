#!/usr/bin/env python3
"""Validation NLL of a training log step for step against a checkpoint's history.

usage: compare_val.py LOG CHECKPOINT_DIR [BLOCK]
Prints, per BLOCK steps (default 2000), the mean validation bits/sample of each and the
difference, and how many evaluations the log's run was lower at."""
import json, math, re, sys

log, ckpt = sys.argv[1], sys.argv[2]
block = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
ours = {int(m[1]): float(m[2]) for m in re.finditer(r"step\s+(\d+)\s+train \S+ bits/sample\s+val (\S+) bits/sample", open(log).read())}
history = json.load(open(f"{ckpt}/config.json"))["state"]["history"]
theirs = {h["step"]: h["val_nats"] / math.log(2) for h in history if h.get("val_nats") is not None}
steps = sorted(s for s in ours if s in theirs)
lower = sum(ours[s] < theirs[s] for s in steps)
print(f"{len(steps)} evaluations in common, the log's run lower at {lower}")
print(f"{'steps':>13} {'log':>8} {'checkpoint':>10} {'difference':>10}")
for start in range(0, steps[-1] if steps else 0, block):
    inside = [s for s in steps if start < s <= start + block]
    if inside:
        a = sum(ours[s] for s in inside) / len(inside)
        b = sum(theirs[s] for s in inside) / len(inside)
        print(f"{start + 1:>6}–{start + block:<6} {a:8.4f} {b:10.4f} {a - b:+10.4f}")
