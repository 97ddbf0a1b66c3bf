# Density of vAttention over sign-bit top-k on heavy_hitters, uniform vs stratified residual sample,
# with population variances (the best case of each budget rule). A model, not the library: its
# projections are its own Gaussian ones. Usage (numpy, safetensors):
#   vattn synth --out hh.safetensors --family heavy_hitters --tokens 131072 --n-head-q 32 \
#       --n-head-kv 8 --head-dim 128 --n-q 1 --dtype f32
#   python3 dev/models/stratified_density.py hh.safetensors
import numpy as np, sys
from safetensors.numpy import load_file
t = load_file(sys.argv[1]); q = t['q'][0]; K = t['k']; n, H, d = K.shape; G = q.shape[0] // H
bits, eps, z = 128, 0.05, 1.959963984540054
rng = np.random.default_rng(7)
k_top = int(0.05 * n); sink = local = 128; base = 0.05
schemes = {'uniform': [], '2 strata': [1], '3 strata': [1, 4], '8 strata': [0.25, 0.5, 1, 2, 4, 8, 16]}
def fpc(b0, N): return int(np.ceil(b0 * N / (b0 + N)))
rows = {}
for mode in ('union', 'max'):
  for kvh in range(H):
    Kh = K[:, kvh, :].astype(np.float64)
    P = rng.standard_normal((d, bits))
    ksig = (Kh @ P) > 0
    qs = q[kvh*G:(kvh+1)*G].astype(np.float64)
    sc = np.stack([(ksig == ((qs[g] @ P) > 0)).sum(1) for g in range(G)]).astype(float)
    sc[:, :sink] = -1e9; sc[:, n-local:] = -1e9
    F = np.zeros(n, bool); F[:sink] = True; F[n-local:] = True
    if mode == 'union':
      for g in range(G): F[np.argsort(-sc[g], kind='stable')[:k_top]] = True
      unit = sc.max(0)
    else:
      unit = sc.max(0); F[np.argsort(-unit, kind='stable')[:k_top]] = True
    order = np.argsort(-unit, kind='stable'); rest = order[~F[order]]
    logits = (qs @ Kh.T) / np.sqrt(d)
    for name, cuts in schemes.items():
      bmax = 0
      for g in range(G):
        e = np.exp(logits[g] - logits[g].max()); D = e.sum(); eR = e[rest]; ns = len(eR)
        edges = [0] + [int(c * k_top) for c in cuts] + [ns]
        strata = [eR[a:b] for a, b in zip(edges[:-1], edges[1:])]
        S = sum(len(x) * x.std(ddof=1) for x in strata)
        b = fpc((z * S / (eps * D))**2, ns)
        tot = sum(min(len(x), max(int(np.ceil(b * len(x) * x.std(ddof=1) / S)), int(np.ceil(base * len(x))))) for x in strata)
        bmax = max(bmax, tot)
      rows.setdefault((mode, name), []).append((F.sum() + bmax) / n)
for (mode, name), v in rows.items():
  print(f'{mode:6s} {name:10s} density {np.mean(v):.3f}')
