"""Float64 dense softmax attention: the independent reference for MicroAttention
and DistAttention."""

from __future__ import annotations

import numpy as np


def dense_attention_f64(q, keys, values, q_positions, scale):
    """q [Q, Hq, D]; keys/values [N, Hkv, D] at positions 0..N-1; query i sees
    keys at positions <= q_positions[i]. Returns [Q, Hq, D] float64."""
    q = np.asarray(q, np.float64)
    keys = np.asarray(keys, np.float64)
    values = np.asarray(values, np.float64)
    num_q, num_heads, _ = q.shape
    groups = num_heads // keys.shape[1]
    out = np.zeros(q.shape, np.float64)
    for i in range(num_q):
        n = int(q_positions[i]) + 1
        for h in range(num_heads):
            s = keys[:n, h // groups] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = p @ values[:n, h // groups] / p.sum()
    return out
