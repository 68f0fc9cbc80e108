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

The two rates are fitted to this project's 2-core CPU (docs/performance.md): 0.4B bf16 at 1 x 8192
(322 GFLOP a block's forward, causal attention counted once) took 0.52 s a block's no-grad forward;
keeping 21 blocks (0.53 GiB each) saved 0.52-0.57 s a block in the blocks' own times and lost it
again outside them, 12 s a step: 0.9 GiB/s of fresh memory, the break-even point, so that shape
recomputes. 0.4B fp32 at 4 x 128 (11.5 GFLOP a block, 250 GFLOP/s) saved 45 ms a kept block, and
none of its tensors reaches the ceiling. A machine with other rates moves the break-even point, not
the rule; a first-step measurement of one block both ways would find it there (not built)."""
from ..model.config import ModelConfig

HEAP_MMAP_CEILING = 32 * 2 ** 20  # glibc's largest dynamic mmap threshold on 64-bit
CPU_FLOPS = {'fp32': 2.5e11, 'bf16': 6.2e11, 'fp16': 6.2e11}  # a block's no-grad forward, measured above
CPU_FRESH_BYTES_PER_S = 0.9 * 2 ** 30  # fresh pages a step takes from the system, measured above
DTYPE_BYTES = {'bf16': 2, 'fp16': 2, 'fp32': 4}


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
    """-> (whether keeping a block's activations saves time, a note saying why not in numbers).
    kept_bytes: one block's kept activations for one micro-batch; ffn: the feed-forward's width a
    token runs (plan.ffn_width)."""
    fresh = fresh_bytes(cfg, batch, seq, DTYPE_BYTES[dtype], ffn, kept_bytes, device_type)
    if not fresh:
        return True, ''
    flops = forward_flops(cfg, batch, seq, ffn)
    saved, cost = flops / CPU_FLOPS[dtype], fresh / CPU_FRESH_BYTES_PER_S
    if saved > cost:
        return True, ''
    return False, (f'activations recomputed: keeping a block saves its forward, {flops / 1e9:.0f} GFLOP '
                   f'(~{saved:.2f} s at {CPU_FLOPS[dtype] / 1e9:.0f} GFLOP/s), and takes {fresh / 2 ** 30:.2f} GiB '
                   f'fresh from the system each step (~{cost:.2f} s at {CPU_FRESH_BYTES_PER_S / 2 ** 30:.1f} '
                   'GiB/s): it does not pay at this shape (keep_activations all keeps them anyway)')
