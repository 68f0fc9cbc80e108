"""Whether keeping a block's activations saves time on this device at this shape (issue 39).

A kept block saves the no-grad forward a recomputed block runs first (the backward's forward under
autograd and the backward itself run either way). Its price is the memory it holds from its forward
to its backward, and on a CPU also time: glibc's heap hands tensors at or above its mmap ceiling
(32 MiB) back to the system when they are freed, so a kept block whose tensors are that large takes
its bytes fresh from the system every step, page by page (allocating and filling a 33-88 MiB tensor
ran at 0.14 GiB/s on the 2-core CPU under load, a 16-31 MiB one at 0.6 GiB/s from the heap), while
the step's memory piles up by GiBs and the system reclaims its page cache and other programs' pages
for them. A recomputed block's large tensors are faulted in too, but one block's worth at a time,
which the system serves from the pages the previous block gave back. Smaller tensors stay in the
heap between steps (the heap trimmer leaves the kept bytes as slack), and cuda's and mps' caching
allocators reuse theirs: there keeping costs no time, and the blocks that fit are kept.

The two rates were fitted to this project's 2-core CPU (docs/performance.md): 0.4B bf16 at 1 x 8192
(322 GFLOP a block's forward, causal attention counted once) took 0.52 s a block's no-grad forward;
keeping 21 blocks (0.53 GiB each) saved 0.52-0.57 s a block in the blocks' own times and lost it
again outside them, 12 s a step: 0.9 GiB/s of fresh memory, the break-even point, so that shape
recomputes. 0.4B fp32 at 4 x 128 (11.5 GFLOP a block, 250 GFLOP/s) saved 45 ms a kept block, and
none of its tensors reaches the ceiling. A machine with other rates moves the break-even point, not
the rule. The compute rate moves most from one machine to the next (another 2-core CPU of this
project's, AVX2 without AVX-512, runs those products at 57 GFLOP/s in fp32 and 10 in bf16: there a
bf16 recompute costs 60 times what it does above, and keeping pays), so it is measured, once a
process, at the block's feed-forward shape and only where the decision needs it (measured_flops); the
fresh-memory rate, which only a whole step under memory pressure shows, stays the fitted one."""
import functools
import time

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig

HEAP_MMAP_CEILING = 32 * 2 ** 20  # glibc's largest dynamic mmap threshold on 64-bit
PROBE_SECONDS = 0.05  # the timed product's least length, far above the clock's resolution
PROBE_WIDTH = 2048
CPU_FRESH_BYTES_PER_S = 0.9 * 2 ** 30  # fresh pages a step takes from the system, measured above
DTYPE_BYTES = {'bf16': 2, 'fp16': 2, 'fp32': 4}
TORCH_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


@functools.lru_cache(maxsize=None)
def measured_flops(dim, ffn, dtype):
    """FLOP/s of this machine's matrix product in `dtype` at a block's feed-forward shape (dim to ffn),
    timed once a process: the rows are quadrupled from 256 (fewer run below the product's speed: 5
    GFLOP/s at 16 rows in fp32 here, 57 at 1024) until one product takes PROBE_SECONDS, each timed
    after an untimed one (a few tenths of a second in all where the dtype is slow)."""
    dim, ffn = min(dim, PROBE_WIDTH), min(ffn, PROBE_WIDTH)  # as fast as wider, and a 70B's would take 0.5-1 GB
    weight = torch.randn(ffn, dim, dtype=TORCH_DTYPES[dtype])
    rows = 256
    while True:
        x = torch.randn(rows, dim, dtype=weight.dtype)
        F.linear(x, weight)
        start = time.perf_counter()
        F.linear(x, weight)
        seconds = time.perf_counter() - start
        if seconds >= PROBE_SECONDS or rows >= 4096:
            return 2 * rows * dim * ffn / max(seconds, 1e-9)
        rows *= 4


def forward_flops(cfg: ModelConfig, batch, seq, ffn):
    """FLOPs of one block's forward for batch x seq: its projections (the feed-forward `ffn` wide: a
    MoE token runs k experts) and causal attention's two products over the positions before each."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    projections = cfg.dim * (2 * q + 2 * kv) + 3 * cfg.dim * ffn
    return 2 * batch * seq * projections + 2 * batch * seq * seq * q


def fresh_bytes(cfg: ModelConfig, batch, seq, dtype_bytes, ffn, kept_bytes, device_type):
    """Of a kept block's `kept_bytes`, those taken fresh from the system each step: on a CPU where
    its token-wide tensors reach the heap's mmap ceiling, all of them (the fp32 norm inputs are the
    widest common ones); where only the feed-forward's do, its three; elsewhere none."""
    if device_type != 'cpu':
        return 0
    tokens = batch * seq
    if tokens * cfg.dim * 4 >= HEAP_MMAP_CEILING:
        return kept_bytes
    ffn_bytes = tokens * ffn * dtype_bytes
    return 3 * ffn_bytes if ffn_bytes >= HEAP_MMAP_CEILING else 0


def keep_pays(cfg: ModelConfig, batch, seq, dtype, kept_bytes, ffn, device_type='cpu'):
    """-> (whether keeping a block's activations saves time, a note weighing the two in numbers where
    keeping has a price).
    kept_bytes: one block's kept activations for one micro-batch; ffn: the feed-forward's width a
    token runs (plan.ffn_width)."""
    fresh = fresh_bytes(cfg, batch, seq, DTYPE_BYTES[dtype], ffn, kept_bytes, device_type)
    if not fresh:
        return True, ''
    flops, rate = forward_flops(cfg, batch, seq, ffn), measured_flops(cfg.dim, ffn, dtype)
    saved, cost = flops / rate, fresh / CPU_FRESH_BYTES_PER_S
    weighed = (f'keeping a block saves its forward, {flops / 1e9:.0f} GFLOP (~{saved:.2f} s at {rate / 1e9:.0f} '
               f'GFLOP/s measured here), and takes {fresh / 2 ** 30:.2f} GiB fresh from the system each step '
               f'(~{cost:.2f} s at {CPU_FRESH_BYTES_PER_S / 2 ** 30:.1f} GiB/s)')
    if saved > cost:
        return True, f'{weighed}: it pays at this shape'
    return False, (f'activations recomputed: {weighed}: it does not pay at this shape (keep_activations all '
                   'keeps them anyway)')


# --- blocks read from disk each step: the page cache against kept activations ------------------
# Where the block files cannot stay in the page cache, the memory not kept still serves it at each
# turn of the step: the backward starts with the blocks the forward read last, the next forward with
# those the backward read last, and the cache holds the most recent reads. The reader thread reads
# the next block while the current one computes, so each block costs the longer of its read and its
# compute. Where the reads are the longer (a slow disk, short sequences), a kept block saves nothing
# and the memory it takes from the cache costs reads; where the compute is, keeping saves its
# recompute and the cache saves nothing. Both sides are timed on this machine: the disk's rate as the
# run read (weights/files.ReadTimes, known after the first step's reads), the compute as measured_flops.

def streamed_step_seconds(n, kept, forward_s, read_s, kept_extra_s, cached_first, cached_last):
    """Seconds of a step of n blocks read from disk: the forward reads blocks 0..n-1 (the first
    `cached_first` from the page cache), a kept block's forward costing kept_extra_s more (its fresh
    memory); the backward reads n-3..0 (the last two blocks stay, and the `cached_last` before them
    come from the cache), a kept block computing its backward (2 forwards' work), a recomputed one its
    forward again too."""
    first_kept = n - kept
    forward = sum(max(0 if i < cached_first else read_s, forward_s + kept_extra_s * (i >= first_kept))
                  for i in range(n))
    backward = sum(max(0 if i >= n - 2 - cached_last else read_s, (2 if i >= first_kept else 3) * forward_s)
                   for i in range(n))
    return forward + backward


def fastest_kept(cfg: ModelConfig, batch, seq, dtype, trip, most, kept_bytes, ffn, file_bytes, read_rate,
                 cache_room):
    """-> (blocks that keep their activations, of the `most` that fit, for the fastest step where
    every block is read from disk, a note in numbers). file_bytes: one block file's; read_rate: the
    disk's bytes a second; cache_room(k): what the page cache has at the forward's end with k blocks
    kept (at the backward's end every kept block is freed: cache_room(0))."""
    rate = measured_flops(cfg.dim, ffn, dtype)
    forward_s = trip * forward_flops(cfg, batch, seq, ffn) / rate
    kept_extra_s = trip * fresh_bytes(cfg, batch, seq, DTYPE_BYTES[dtype], ffn, kept_bytes, 'cpu') / CPU_FRESH_BYTES_PER_S
    read_s = file_bytes / read_rate
    cached = lambda room: int(max(0, room) // file_bytes)  # noqa: E731
    seconds = [streamed_step_seconds(cfg.n_layers, k, forward_s, read_s, kept_extra_s, cached(cache_room(0)),
                                     cached(cache_room(k))) for k in range(most + 1)]
    kept = seconds.index(min(seconds))  # the fewest blocks where several tie
    bound = ('the reads are the limit' if read_s >= 3 * forward_s else 'the compute is the limit'
             if read_s <= forward_s else 'the reads are the limit in the forward, the compute in the backward')
    note = (f'the blocks are read from disk each step at {read_rate / 1e6:.0f} MB/s (as read so far): '
            f'{read_s:.2f} s a block against {forward_s:.2f} s of its forward ({rate / 1e9:.0f} GFLOP/s measured '
            f'here): {bound}; a step ~{seconds[kept]:.1f} s keeping {kept} of the {most} blocks that fit '
            f'(~{seconds[0]:.1f} s keeping none, ~{seconds[most]:.1f} s keeping {most}), the rest of the memory '
            'left to the page cache, which holds the blocks each pass starts with')
    return kept, note
