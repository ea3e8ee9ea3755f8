"""What the decode and prefill attention kernels share: the soft-capping tanh and one key tile's
online-softmax update (flash attention: running max, running sum, unnormalised accumulator)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softcap_tanh(x):
    # tanh via exp, stable for large |x|: sign(x) * (1 - 2 / (exp(2|x|) + 1))
    ax = tl.abs(x)
    t = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def online_softmax(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold one key tile's scores ``s`` [rows, keys] (masked keys at -inf) and values ``v``
    [keys, dim] into (running max, running sum, accumulator); P is cast to the value dtype
    before the PV product. Returns the three updated."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc
