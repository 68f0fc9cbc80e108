"""Memory planning: how many bytes each part of a run needs, where the frozen blocks should live,
and the peak device and host memory a run will reach. Pure arithmetic over ModelConfig; no files."""
import math
from dataclasses import dataclass

from ..model.config import ModelConfig
from ..model.quant import packed_nbytes
from .pinned import ROW_STAGING_BYTES

GIB = 1024 ** 3
SLICE_ELEMENTS = 1 << 21  # the head's logits held at once: [tokens, slice rows] <= 2M floats (8 MB)
MIN_SLICE_ROWS = 64
DTYPE_BYTES = {'bf16': 2, 'fp16': 2, 'fp32': 4}


def head_slice_rows(tokens):
    """Vocabulary rows the streamed head takes at a time for `tokens` positions."""
    return max(MIN_SLICE_ROWS, SLICE_ELEMENTS // max(1, tokens))


def block_params(cfg: ModelConfig):
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return cfg.dim * (2 * q + 2 * kv) + 3 * cfg.dim * cfg.hidden_dim + 2 * cfg.dim


def block_bytes(cfg: ModelConfig, dtype='bf16', quant=None):
    """Bytes of one block as stored and streamed: its seven projections packed when `quant` is set
    (a quant.Quant), the norms (and everything without quant) in `dtype`."""
    if quant is None:
        return block_params(cfg) * DTYPE_BYTES[dtype]
    q, kv, dim, hidden = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    projections = [(q, dim), (kv, dim), (kv, dim), (dim, q), (hidden, dim), (hidden, dim), (dim, hidden)]
    return 2 * dim * DTYPE_BYTES[dtype] + sum(packed_nbytes(shape, quant) for shape in projections)


def lora_params(cfg: ModelConfig, rank, targets):
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {'q': (cfg.dim, q), 'k': (cfg.dim, kv), 'v': (cfg.dim, kv), 'o': (q, cfg.dim),
              'gate': (cfg.dim, cfg.hidden_dim), 'up': (cfg.dim, cfg.hidden_dim), 'down': (cfg.hidden_dim, cfg.dim)}
    return cfg.n_layers * sum(rank * (n_in + n_out) for n_in, n_out in (shapes[t] for t in targets))


def model_params(cfg: ModelConfig):
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return cfg.n_layers * block_params(cfg) + cfg.vocab_size * cfg.dim + head + cfg.dim


def block_working_set(cfg: ModelConfig, batch, seq, act_bytes):
    """Bytes autograd keeps while recomputing and backpropagating one block (activations + grads)."""
    tokens = batch * seq
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_token = 6 * cfg.dim + 2 * q + 4 * kv + 4 * cfg.hidden_dim  # norms, q/k/v (+ roped), attn out, ffn
    attention = batch * cfg.n_heads * seq * seq if seq > 1024 else 0  # math-kernel scores at long seq
    return (tokens * per_token + attention) * act_bytes


@dataclass
class MemoryPlan:
    device_bytes: int
    host_bytes: int
    resident_blocks: int  # blocks kept on the device (the first k)
    ram_blocks: int       # blocks kept in host RAM; the rest stream from disk

    def describe(self):
        return (f'peak device {self.device_bytes / GIB:.2f} GiB, peak host {self.host_bytes / GIB:.2f} GiB; '
                f'blocks: {self.resident_blocks} on device, {self.ram_blocks} in RAM, rest from disk')


def table_bytes(cfg: ModelConfig, dtype='bf16', quant=None):
    """Bytes of the embeddings and head (one table when tied), packed with --quant-head."""
    shape = (cfg.vocab_size, cfg.dim)
    one = packed_nbytes(shape, quant) if quant is not None and quant.head else math.prod(shape) * DTYPE_BYTES[dtype]
    return one * (1 if cfg.tie_embeddings else 2)


def plain_nf4_unpack_bytes(cfg: ModelConfig, dtype='bf16'):
    """Device bytes the plain nf4 unpack (quant.nf4_dequantize where no faster kernel serves, as on
    mps) holds beside its output while it unpacks a block's largest projection. An fp32 output is
    gathered into in place: only the bytes widened to int32 indices (2 bytes a value). Otherwise the
    gathered float32 pairs (4 bytes a value) and their product with the absmax in float32, before it
    is rounded into the output (4 more; tests/test_mps.py measures both on a cpu)."""
    largest = cfg.dim * max(cfg.hidden_dim, cfg.n_heads * cfg.head_dim)
    return largest * (2 if dtype == 'fp32' else 8)


def predict(cfg: ModelConfig, batch, seq, dtype='bf16', rank=8, targets=('q', 'v'), resident_blocks=0,
            ram_blocks=0, stash_on_device=True, device_is_host=False, quant=None, plain_unpack=False):
    """Peak device and host bytes of one training step with this placement. With `quant`, blocks
    are held and streamed packed and two of them at a time are unpacked on the device
    (plain_unpack: by the plain torch kernels, as on mps, with their temporaries)."""
    w = DTYPE_BYTES[dtype]
    block = block_bytes(cfg, dtype, quant)
    unpacked = 2 * block_params(cfg) * w if quant is not None else 0  # the two reused dequantized buffers
    if plain_unpack and quant is not None and quant.type == 'nf4':
        unpacked += plain_nf4_unpack_bytes(cfg, dtype)
    tables = table_bytes(cfg, dtype, quant)
    tokens = batch * seq
    lora = lora_params(cfg, rank, targets) * 4 * 4  # fp32 weights, grads, two Adam moments
    saved_inputs = cfg.n_layers * tokens * cfg.dim * w
    head_slice = head_slice_rows(tokens)  # the head streams in vocabulary slices
    # a slice's logits (exponentiated in place) and rows; hidden, softmax @ rows, target rows, gradient
    loss = 2 * tokens * min(head_slice, cfg.vocab_size) * 4 + head_slice * cfg.dim * w + 4 * tokens * cfg.dim * 4
    step = lora + max(block_working_set(cfg, batch, seq, w), loss) + 2 * tokens * cfg.dim * w + unpacked
    if device_is_host:
        total = host_only_peak(cfg, block, tables, resident_blocks + ram_blocks, step + saved_inputs)
        return MemoryPlan(total, total, resident_blocks, ram_blocks)
    streamed = cfg.n_layers - resident_blocks
    device = resident_blocks * block + (2 * block if streamed else 0) + step  # streamed: double buffering
    if resident_blocks == cfg.n_layers:  # everything fits: embeddings and head stay on the device too
        device += tables
    if stash_on_device:
        device += saved_inputs
    host = pinned_bytes(cfg, w, resident_blocks, ram_blocks) + (0 if stash_on_device else saved_inputs)
    return MemoryPlan(int(device), int(host), resident_blocks, ram_blocks)


def pinned_bytes(cfg: ModelConfig, w, resident_blocks, ram_blocks):
    """Host bytes the store pins (store.py, pinned.py): the RAM tier (its blocks, and the embeddings
    and head with them when anything is held in RAM), and when blocks stream from disk their two
    staging buffers and the head's two, in the compute dtype (the reader thread converts)."""
    block = block_params(cfg) * w
    tables = cfg.vocab_size * cfg.dim * w * (1 if cfg.tie_embeddings else 2) + cfg.dim * w  # + the final norm
    everything_resident = resident_blocks == cfg.n_layers
    host = ram_blocks * block + (tables if ram_blocks and not everything_resident else 0)
    if cfg.n_layers - resident_blocks > ram_blocks:  # the head is on the disk tier too
        head_rows = min(cfg.vocab_size, max(1, ROW_STAGING_BYTES // (cfg.dim * w)))
        host += 2 * block + 2 * head_rows * cfg.dim * w
    return host


CPU_RUNTIME_BYTES = 160 * 1024 ** 2  # measured: library code paged in, the heap's free slack


def host_only_peak(cfg: ModelConfig, block, tables, held_blocks, step_bytes):
    """On a CPU there is one memory and no copies: blocks are used where they lie, held in RAM or
    mapped from their file one at a time; the embeddings and head are held with the blocks."""
    if held_blocks < cfg.n_layers:
        return int(held_blocks * block + block + step_bytes + CPU_RUNTIME_BYTES)  # + the mapped block
    return int(held_blocks * block + tables + step_bytes + CPU_RUNTIME_BYTES)


def place_blocks(cfg: ModelConfig, batch, seq, dtype, device_budget, ram_budget, unified=False, **kw):
    """The most blocks on the device, then in RAM, that keep the predicted peaks under the budgets.
    unified: device and host are one memory (a Mac), both peaks count against device_budget."""
    resident = cfg.n_layers
    plan = lambda r, m: predict(cfg, batch, seq, dtype, resident_blocks=r, ram_blocks=m, **kw)  # noqa: E731
    needs = (lambda p: p.device_bytes + p.host_bytes) if unified else (lambda p: p.device_bytes)  # noqa: E731
    while resident > 0 and needs(plan(resident, 0)) > device_budget:
        resident -= 1
    ram = cfg.n_layers - resident
    while ram > 0 and plan(resident, ram).host_bytes > ram_budget:
        ram -= 1
    return plan(resident, ram)


def print_plan(cfg: ModelConfig, batch, seq, dtype, rank, targets, quant=None):
    """Print the predicted peaks of a finetune in each offload mode (quant: the blocks' Quant, or None)."""
    print(f'model: {model_params(cfg) / 1e9:.2f}B parameters, batch {batch} x seq {seq}, {dtype}'
          f'{", " + quant.type + " blocks" if quant else ""}, LoRA r={rank} on {",".join(targets)}')
    for label, resident, ram in [('device (all resident)', cfg.n_layers, 0), ('ram (streamed)', 0, cfg.n_layers),
                                 ('disk (streamed)', 0, 0)]:
        plan = predict(cfg, batch, seq, dtype, rank, targets, resident_blocks=resident, ram_blocks=ram,
                       quant=quant)
        print(f'  {label:<22} device {plan.device_bytes / GIB:7.2f} GiB   host {plan.host_bytes / GIB:7.2f} GiB')
