# Recall of the oracle's top 2.5% on a synthetic cache: random sign bits (128, 256; keys centred on
# the mean of the first 256) against scores from the keys' top r principal components (r = 4..32,
# computed on the first `calib` keys). A model, not the library: its projections are its own.
# Usage (numpy, safetensors):
#   vattn synth --out hh.safetensors --family heavy_hitters --tokens 131072 --n-head-q 32 \
#       --n-head-kv 8 --head-dim 128 --n-q 1 --dtype f32
#   python3 dev/models/lowrank_recall.py hh.safetensors [calib]
import sys

import numpy as np
from safetensors.numpy import load_file

t = load_file(sys.argv[1])
q, K = t['q'][0], t['k']
n, H, d = K.shape
G = q.shape[0] // H
ktop = int(0.025 * n)
calib = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
res = {}
for kvh in range(H):
    Kh = K[:, kvh, :].astype(np.float64)
    qs = q[kvh * G:(kvh + 1) * G].astype(np.float64)
    Kc = Kh - Kh[:256].mean(0)
    C = Kh[:calib] - Kh[:calib].mean(0)
    _, S, Vt = np.linalg.svd(C, full_matrices=False)
    if kvh == 0:
        ev = S**2 / (S**2).sum()
        print('explained variance, top 8 components:', np.round(ev[:8], 3))
    logits = qs @ Kh.T / np.sqrt(d)
    for g in range(G):
        L = logits[g]
        p = np.exp(L - L.max())
        p /= p.sum()
        true = np.argpartition(-L, ktop)[:ktop]
        mass = p[true].sum()

        def recall(sc):
            top = np.argpartition(-sc, ktop)[:ktop]
            return len(np.intersect1d(top, true)) / ktop, p[top].sum() / mass

        for bits in (128, 256):
            P = np.random.default_rng(kvh).standard_normal((d, bits))
            same = ((Kc @ P) > 0) == ((qs[g] @ P) > 0)
            res.setdefault(f'signs{bits}', []).append(recall(same.sum(1).astype(float)))
        for r in (4, 8, 16, 32):
            Pr = Vt[:r].T
            res.setdefault(f'pca{r}', []).append(recall((Kc @ Pr) @ (Pr.T @ qs[g])))
for k, v in res.items():
    a = np.array(v)
    print(f'{k:8s} recall {a[:, 0].mean():.3f}  top-k mass captured {a[:, 1].mean():.3f} '
          f'(min {a[:, 1].min():.3f})')
