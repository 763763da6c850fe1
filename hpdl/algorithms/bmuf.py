"""BMUF (ALGORITHMS.md §2): model averaging filtered by block momentum, in fairseq's form."""
from __future__ import annotations

# fairseq's defaults (§2): block_momentum η_b = 0.875, block_lr ζ = 1. CNTK suggests η_b = 1 - 1/N.
ETA_B = 0.875
ZETA = 1.0


def bmuf_sync(w_global, mean_w, delta, eta_b: float = ETA_B, zeta: float = ZETA,
              nesterov_bm: bool = True):
    """One BMUF synchronisation (§2), in place on `w_global` and `delta`; returns the new weights.

        G = w_global - mean_w;  Δ <- η_b Δ + ζ G;  w = w_global - Δ;
        Nesterov block momentum: w <- w - η_b Δ;  then w_global <- w (every replica takes it).

    `mean_w` is the replicas' mean (`avg_sync` of the allreduced sum); `w_global` is the
    weights of the previous synchronisation (w0 at first) and `delta` the block momentum Δ
    (zeros at first), both kept alike on every replica. The result is `w_global` itself.

    w = w_global - Δ is evaluated as w = mean_w + ((1 - ζ) G - η_b Δ_old), which is the same
    number in exact arithmetic (w_global = mean_w + G). In floating point it makes
    η_b = 0, ζ = 1 give exactly mean_w, bit for bit, so BMUF then IS plain averaging.
    """
    eta_b, zeta = float(eta_b), float(zeta)
    block = w_global - mean_w  # G, what the replicas moved in this block
    delta *= eta_b             # η_b Δ_old
    w_global[...] = block
    w_global *= 1.0 - zeta
    w_global -= delta          # (1 - ζ) G - η_b Δ_old
    block *= zeta
    delta += block             # Δ = η_b Δ_old + ζ G
    w_global += mean_w
    if nesterov_bm:
        w_global -= eta_b * delta
    return w_global
