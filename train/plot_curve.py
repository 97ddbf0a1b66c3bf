"""Plots a train_log.json's loss curve (text and answer loss per byte) to a PNG.

    python3 train/plot_curve.py models/kjv-ruler-18m/train_log.json -o docs/img/train_curve.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("log")
ap.add_argument("-o", "--out", required=True)
args = ap.parse_args()
log = json.load(open(args.log))
c = log["curve"]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([r["step"] for r in c], [r["text_loss"] for r in c], label="text loss (nats/byte)")
ax.plot([r["step"] for r in c], [r["answer_loss"] for r in c], label="answer loss (nats/byte)")
if "longest" in c[0]:
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in c], [r["longest"] for r in c], "k:", label="longest document")
    ax2.set_ylabel("longest document (bytes)")
    ax2.legend(loc="center right", fontsize=8)
ax.set(xlabel="step", ylabel="loss", title=f"{log['parameters'] / 1e6:.1f}M parameters, "
       f"{log['gpu']}, {log['seconds']:.0f} s")
ax.legend(loc="upper center", fontsize=8)
ax.grid(True, alpha=0.3)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
