#!/usr/bin/env python3
"""Training and validation NLL of a training log step for step against a checkpoint's history.

usage: compare_val.py LOG CHECKPOINT_DIR [BLOCK]
Prints, per BLOCK steps (default 2000), the mean training and validation bits/sample of each
and the differences, and how many evaluations the log's run was lower at."""
import json, math, re, sys

log, ckpt = sys.argv[1], sys.argv[2]
block = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
pattern = r"step\s+(\d+)\s+train (\S+) bits/sample\s+val (\S+) bits/sample"
ours = {int(m[1]): (float(m[2]), float(m[3])) for m in re.finditer(pattern, open(log).read())}
history = json.load(open(f"{ckpt}/config.json"))["state"]["history"]
theirs = {
    h["step"]: (h["train_nats"] / math.log(2), h["val_nats"] / math.log(2))
    for h in history
    if h.get("val_nats") is not None
}
steps = sorted(s for s in ours if s in theirs)
lower = sum(ours[s][1] < theirs[s][1] for s in steps)
print(f"{len(steps)} evaluations in common, the log's run lower on validation at {lower}")
print(f"{'steps':>13} | {'train: log':>10} {'checkpoint':>10} {'diff':>8} | {'val: log':>8} {'checkpoint':>10} {'diff':>8}")
for start in range(0, steps[-1] if steps else 0, block):
    inside = [s for s in steps if start < s <= start + block]
    if inside:
        mean = lambda d, i: sum(d[s][i] for s in inside) / len(inside)
        (ta, tb), (va, vb) = ((mean(ours, i), mean(theirs, i)) for i in (0, 1))
        print(f"{start + 1:>6}–{start + block:<6} | {ta:10.4f} {tb:10.4f} {ta - tb:+8.4f} | {va:8.4f} {vb:10.4f} {va - vb:+8.4f}")
