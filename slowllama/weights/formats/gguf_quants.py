"""GGUF block encoders for the K-quants (Q3_K, Q4_K, Q5_K, Q6_K), as ggml's reference quantizer
computes them without an importance matrix, vectorized over every block of a tensor with numpy.

Why these are bit-for-bit llama.cpp's: ggml's reference C code works in float32, one rounding per
operation (it is built without fused multiply-add or fast-math), and adds the 16 or 32 values of a
sub-block one after the other. Here every quantity is float32 too, and each of those sums is a
reduction over axis 0 of a (positions, blocks) array, which numpy performs position after position
(tests/test_gguf_quants.py checks that order). Rounding to the nearest integer is np.rint, which
rounds halves to even as ggml's float trick does; fp16 is numpy's round-to-nearest-even, as ggml's.

A super-block is 256 values (QK_K) of one row; a tensor's rows must be a multiple of 256 long
(gguf_mixture.py picks a fallback type otherwise). Q4_0 / Q5_0 / Q5_1 / Q8_0 are the `gguf`
package's own encoders. `quantize(rows, kind)` returns the bytes, one row of blocks per input row.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256
K_QUANTS = ('q3_k', 'q4_k', 'q5_k', 'q6_k')
GGUF_PACKAGE_QUANTS = ('q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0')
BLOCK_BYTES = {'q3_k': 110, 'q4_k': 144, 'q5_k': 176, 'q6_k': 210}
CHUNK_SUPERBLOCKS = 1024  # 256 K values a pass: fewer passes' overhead, work arrays still near the CPU
GROUP_MAX_EPS = np.float32(1e-15)  # ggml's "this group is all zero" threshold

f32 = np.float32


def quantize(rows, kind, threads=None):
    """float32 [n, k] -> uint8 [n, bytes per row] in GGUF layout `kind` (q3_k ... q6_k, q4_0 ... q8_0),
    the K-quants on `threads` threads (default: one a CPU)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if kind in GGUF_PACKAGE_QUANTS:
        import gguf
        return gguf.quants.quantize(rows, gguf.GGMLQuantizationType[kind.upper()])
    if rows.shape[-1] % QK_K:
        raise ValueError(f'{kind}: rows of {rows.shape[-1]} values do not split into {QK_K}-value super-blocks')
    encode = _ENCODERS[kind]
    flat = rows.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], BLOCK_BYTES[kind]), dtype=np.uint8)

    def chunk(start):
        out[start:start + CHUNK_SUPERBLOCKS] = encode(flat[start:start + CHUNK_SUPERBLOCKS])
    starts = range(0, flat.shape[0], CHUNK_SUPERBLOCKS)
    threads = min(threads or os.cpu_count() or 1, len(starts))
    if threads > 1:  # numpy lets go of the GIL inside each operation: chunks run side by side
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(chunk, starts))
    else:
        for start in starts:
            chunk(start)
    return out.reshape(*rows.shape[:-1], -1)


# --- shared pieces ----------------------------------------------------------------------------------

def _columns(x, n):
    """[superblocks, 256] -> [n, groups]: position within an n-value group first, so that a sum
    over axis 0 adds a group's values in their order (numpy reduces axis 0 row after row)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _fp16(v):
    return v.astype(np.float16)


def _seqsum(a):
    return np.add.reduce(a, axis=0)


def _abs_argmax(x):
    """(value of largest magnitude, that magnitude) per column; the first such value, as ggml's scan."""
    ax = np.abs(x)
    i = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return x[i, cols], ax[i, cols]


# --- Q4_K / Q5_K: 8 groups of 32, a 6-bit scale and min each -----------------------------------------

def _qkx2(x, nmax, rmin, rdelta, nstep):
    """Scale and min (as a positive offset) per 32-value column of x [32, N] with its levels [32, N]:
    a grid of candidate scales, each followed by the least-squares scale and min for its levels,
    weighted by rms + |x| (ggml's make_qkx2_quants), the one with least weighted squared error kept.
    The work arrays are reused in place (out=): this loop is where an export spends its time."""
    av = np.sqrt(_seqsum(x * x) / f32(32))
    w = av + np.abs(x)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    lo = np.minimum(x.min(axis=0), f32(0))
    hi = x.max(axis=0)
    flat = hi == lo
    xm, lev, buf, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(all='ignore'):
        best_is = f32(nmax) / (hi - lo)
        scale, best_lo = f32(1) / best_is, lo.copy()
        _levels(np.subtract(x, lo, out=xm), best_is, nmax, lev)
        best = _error(w, x, lev, scale, lo, buf)
        for step in range(nstep + 1):
            # the min found so far moves the grid: ggml measures from it in every later step
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
            _levels(np.subtract(x, lo, out=xm), iscale, nmax, lev)
            np.multiply(w, lev, out=buf)
            sum_l = _seqsum(buf)
            sum_l2 = _seqsum(np.multiply(buf, lev, out=tmp))
            sum_xl = _seqsum(np.multiply(buf, x, out=tmp))
            det = sum_w * sum_l2 - sum_l * sum_l
            c_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            c_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = c_min > 0
            np.copyto(c_min, f32(0), where=positive)
            np.copyto(c_scale, sum_xl / sum_l2, where=positive)
            err = _error(w, x, lev, c_scale, c_min, buf)
            better = (det > 0) & (err < best)
            for kept, new in ((best, err), (best_is, iscale), (best_lo, lo), (scale, c_scale), (lo, c_min)):
                np.copyto(kept, new, where=better)
        # the kept candidate's levels, computed once more as they were in its step
        _levels(np.subtract(x, best_lo, out=xm), best_is, nmax, lev)
    lev[:, flat] = 0
    scale[flat] = 0
    return scale, -lo, lev


def _levels(xm, iscale, nmax, out):
    """round(iscale * (x - min)) within 0 .. nmax (below 0 where a fitted min is above some x)."""
    np.multiply(xm, iscale, out=out)
    np.rint(out, out=out)
    return np.clip(out, f32(0), f32(nmax), out=out)  # one pass: np.clip is 4x np.maximum + np.minimum


def _error(w, x, levels, scale, lo, buf):
    """sum of w (scale l + min - x)^2 over each column, each step rounded as ggml's C rounds it."""
    np.multiply(levels, scale, out=buf)
    buf += lo
    buf -= x
    np.multiply(buf, buf, out=buf)
    buf *= w
    return _seqsum(buf)


def _encode_qk(x, nmax, rmin, rdelta, nstep):
    """Shared by Q4_K and Q5_K: returns (d, dmin as fp16, 6-bit scales/mins [S, 8], levels [S, 256])."""
    nsb = x.shape[0]
    xc = _columns(x, 32)
    scales, mins, levels = _qkx2(xc, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nsb, 8), mins.reshape(nsb, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))  # ggml starts its running maxima at 0
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(all='ignore'):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63)  # stored in a byte
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63)
    d16, dmin16 = _fp16(max_scale / f32(63)), _fp16(max_min / f32(63))
    d = d16.astype(np.float32)[:, None] * ls.astype(np.float32)
    dm = dmin16.astype(np.float32)[:, None] * lm.astype(np.float32)
    # the levels again, against the scales as they were rounded to 6 bits and fp16
    dcol, dmcol = d.reshape(1, -1), dm.reshape(1, -1)  # one column per 32-value group
    with np.errstate(all='ignore'):
        again = np.clip(np.rint((xc + dmcol) / dcol), 0, nmax)
    levels = np.where(dcol != 0, again, levels)
    levels = levels.T.reshape(nsb, QK_K).astype(np.uint8)
    return d16, dmin16, ls.astype(np.uint8), lm.astype(np.uint8), levels


def _pack_scale_min(ls, lm):
    """Eight 6-bit scales and mins in 12 bytes: the first four whole, the last four split into a
    low nibble byte and two high bits on top of the first four (ggml's get_scale_min_k4 layout)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _halves(levels):
    """[S, 256] levels -> [S, 4, 2, 32]: each 64-value chunk's first and second 32."""
    return levels.reshape(-1, 4, 2, 32)


def encode_q4_k(x):
    d16, dmin16, ls, lm, levels = _encode_qk(x, 15, -1.0, 0.1, 20)
    h = _halves(levels)
    qs = (h[:, :, 0] | (h[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_bytes(d16), _bytes(dmin16), _pack_scale_min(ls, lm), qs], axis=1)


def encode_q5_k(x):
    d16, dmin16, ls, lm, levels = _encode_qk(x, 31, -0.5, 0.1, 15)
    h = _halves(levels)
    low = h & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (h >> 4).astype(np.uint8)  # [S, 4 chunks, 2 halves, 32]: bit 2*chunk + half of byte j
    shift = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)[None, :, :, None]
    qh = np.bitwise_or.reduce((high << shift).reshape(-1, 8, 32), axis=1)
    return np.concatenate([_bytes(d16), _bytes(dmin16), _pack_scale_min(ls, lm), qh, qs], axis=1)


def _bytes(h):
    return h.reshape(-1, 1).view(np.uint8)


# --- Q6_K: 16 groups of 16, an 8-bit signed scale each ------------------------------------------------

def _qx(x, nmax):
    """Signed scale per 16-value column of x [16, N] and levels 0 .. 2 nmax - 1: the scale that maps the
    largest magnitude to -nmax, then 18 nearby ones, each refit by x^2-weighted least squares, the
    best fit kept (ggml's make_qx_quants with rmse_type 1)."""
    peak, amax = _abs_argmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    lev, buf = np.empty_like(x), np.empty_like(x)
    with np.errstate(all='ignore'):
        best_is = f32(-nmax) / peak
        sumlx, suml2 = _signed_sums(x, w, wx, best_is, nmax, lev, buf)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(f32(nmax) + f32(0.1) * f32(step)) / peak
            sumlx, suml2 = _signed_sums(x, w, wx, iscale, nmax, lev, buf)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(best_is, iscale, where=better)
            np.copyto(scale, sumlx / suml2, where=better)
            np.copyto(best, scale * sumlx, where=better)
        levels = _signed_levels(x, best_is, nmax, lev)  # the kept candidate's levels, once more
    levels = levels + nmax
    levels[:, zero] = 0
    return np.where(zero, f32(0), scale), levels


def _signed_levels(x, iscale, nmax, out):
    np.multiply(x, iscale, out=out)
    np.rint(out, out=out)
    return np.clip(out, f32(-nmax), f32(nmax - 1), out=out)


def _signed_sums(x, w, wx, iscale, nmax, lev, buf):
    """sum of w x l and of w l^2 over each column, for the levels of `iscale` (lev, buf: work arrays)."""
    _signed_levels(x, iscale, nmax, lev)
    sumlx = _seqsum(np.multiply(wx, lev, out=buf))
    np.multiply(w, lev, out=buf)
    return sumlx, _seqsum(np.multiply(buf, lev, out=buf))


def encode_q6_k(x):
    nsb = x.shape[0]
    xc = _columns(x, 16)
    scales, levels = _qx(xc, 32)
    scales = scales.reshape(nsb, 16)
    peak, amax = _abs_argmax(scales.T)
    empty = amax < GROUP_MAX_EPS
    with np.errstate(all='ignore'):
        iscale = f32(-128) / peak
        d16 = _fp16(np.where(empty, f32(0), f32(1) / iscale))
        sc = np.minimum(np.rint(iscale[:, None] * scales), 127)
        sc = np.where(empty[:, None], 0, sc).astype(np.int8)
        d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)
        dcol = d.reshape(1, -1)
        again = np.clip(np.rint(xc / dcol), -32, 31) + 32
    levels = np.where(dcol != 0, again, levels)
    levels = levels.T.reshape(nsb, QK_K).astype(np.uint8)
    levels[empty] = 0
    q = levels.reshape(nsb, 2, 4, 32)  # [S, 128-value half, quarter, 32]
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(nsb, 128)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql, qh.reshape(nsb, 64), sc.view(np.uint8), _bytes(d16)], axis=1)


# --- Q3_K: 16 groups of 16, a 6-bit signed scale each ---------------------------------------------------

def _q3(x, nmax):
    """Signed scale per 16-value column and levels 0 .. 2 nmax - 1: start from the scale mapping the
    largest magnitude to -nmax, then up to five passes that move one level at a time where that raises
    the x^2-weighted fit (ggml's make_q3_quants with rmse)."""
    peak, amax = _abs_argmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(all='ignore'):
        levels = np.clip(np.rint((f32(-nmax) / peak) * x), -nmax, nmax - 1)
        sumlx, suml2 = _seqsum(wx * levels), _seqsum((w * levels) * levels)
        for _ in range(5):  # a column with nothing to change stays as it is, so all five run for all
            for i in range(x.shape[0]):
                li, wi, wxi = levels[i], w[i], wx[i]
                slx = sumlx - wxi * li
                sl2 = suml2 - (wi * li) * li
                new = np.clip(np.rint((x[i] * sl2) / slx), -nmax, nmax - 1)
                slx2 = slx + wxi * new
                sl22 = sl2 + (wi * new) * new
                take = (slx > 0) & (new != li) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                levels[i] = np.where(take, new, li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    levels = levels + nmax
    levels[:, zero] = 0
    return np.where(zero, f32(0), scale), levels


def encode_q3_k(x):
    nsb = x.shape[0]
    xc = _columns(x, 16)
    scales, levels = _q3(xc, 4)
    scales = scales.reshape(nsb, 16)
    peak, _ = _abs_argmax(scales.T)
    some = peak != 0
    with np.errstate(all='ignore'):
        iscale = f32(-32) / peak
        ls = np.clip(np.rint(iscale[:, None] * scales), -32, 31).astype(np.int64) + 32
        ls = np.where(some[:, None], ls, 0)
        d16 = _fp16(np.where(some, f32(1) / iscale, f32(0)))
        # as ggml reads its scales back: an unset block's bytes are 0, which reads as -32
        d = d16.astype(np.float32)[:, None] * (ls - 32).astype(np.float32)
        dcol = d.reshape(1, -1)
        again = np.clip(np.rint(xc / dcol), -4, 3) + 4
    levels = np.where(dcol != 0, again, levels)
    levels = levels.T.reshape(nsb, QK_K).astype(np.uint8)
    hmask = np.bitwise_or.reduce((levels >> 2 & 1).reshape(nsb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None],
                                 axis=1).astype(np.uint8)
    low = (levels & 3).reshape(nsb, 2, 4, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(nsb, 64)
    ls = ls.astype(np.uint8)
    packed = np.zeros((nsb, 12), dtype=np.uint8)
    packed[:, 0:8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = (ls >> 4).reshape(nsb, 4, 4)  # scale j's top two bits: byte 8 + j % 4, bits 2 (j // 4)
    packed[:, 8:12] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return np.concatenate([hmask, qs, packed, _bytes(d16)], axis=1)


_ENCODERS = {'q3_k': encode_q3_k, 'q4_k': encode_q4_k, 'q5_k': encode_q5_k, 'q6_k': encode_q6_k}
