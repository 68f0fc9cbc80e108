"""The step plan's limits beside the device's budget (issue 39): the memory limit that cannot hold
one micro-batch through one block, and on cuda how much of the host RAM the pinned tier leaves goes
to the saved inputs' spill and how much to the page cache of the blocks read from files."""
from ..errors import SlowLlamaError

GIB = 1024 ** 3


def refuse_below_one_block(budget, one_block, in_flight, batch, seq):
    """A memory limit too small for one micro-batch through one block (its working set, hidden state
    and gradient, beside the blocks in flight) is refused before the run, with the figures."""
    if budget < one_block:
        raise SlowLlamaError(f'max_device_mem: one block in flight needs {(one_block + in_flight) / GIB:.3f} GiB '
                             f'({in_flight / GIB:.3f} GiB of blocks held, {one_block / GIB:.3f} GiB to compute one '
                             f'micro-batch of {batch} x {seq}); the memory the step may take leaves '
                             f'{(budget + in_flight) / GIB:.3f} GiB (raise the limit or free memory, or lower '
                             '`batch_size` or `seq_len`)')


def ram_page_cache(ram_files, ram_budget, spilled):
    """-> (host RAM the saved inputs may take, a note). On cuda the blocks of the disk tier are read
    through the page cache into pinned staging buffers: where their files (`ram_files` bytes) fit in
    the host RAM the pinned tier leaves (`ram_budget`) beside the saved inputs that spill there
    (`spilled`), the page cache keeps them and the next step reads them from memory, so the spill
    leaves them that room; where they cannot, every step reads them from disk anyway, and the spill
    may take all of it."""
    if not ram_files:
        return ram_budget, ''
    if ram_files + max(0, spilled) <= ram_budget:
        return ram_budget - ram_files, (f'host RAM: {ram_files / GIB:.2f} GiB left to the page cache for the blocks '
                                        f'read from files (they fit in {ram_budget / GIB:.2f} GiB beside the spill)')
    return ram_budget, (f'host RAM: the block files ({ram_files / GIB:.2f} GiB) cannot stay in the page cache beside '
                        f'the spill ({max(0, spilled) / GIB:.2f} of {ram_budget / GIB:.2f} GiB): read from disk each '
                        'step, nothing reserved for them')
