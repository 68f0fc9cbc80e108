"""Memory planning: how many bytes each part of a run needs, where the frozen blocks should live,
how an optimizer step's micro-batches travel and which blocks keep their activations, and the peak
device and host memory a run will reach. Pure arithmetic over ModelConfig; no files."""
import math
from dataclasses import dataclass

from ..errors import SlowLlamaError
from ..model.block import block_shapes
from ..model.config import ModelConfig
from ..model.lora import LoraConfig, lora_shapes
from ..model.quant import packed_nbytes
from ..weights.copier import layout_bytes
from ..weights.packed import file_layout
from ..weights.pinned import ROW_STAGING_BYTES
from ..weights.prepared import DTYPES, model_params
from .keep_cost import fastest_kept, keep_pays
from .moe_plan import core_params, expert_params, experts_line, experts_worst, fetched_block_bytes
from .plan_limits import ram_page_cache, refuse_below_one_block

GIB = 1024 ** 3
SLICE_ELEMENTS = 1 << 21  # the head's logits held at once: [tokens, slice rows] <= 2M floats (8 MB)
MIN_SLICE_ROWS = 64
DTYPE_BYTES = {'bf16': 2, 'fp16': 2, 'fp32': 4}


def head_slice_rows(tokens):
    """Vocabulary rows the streamed head takes at a time for `tokens` positions."""
    return max(MIN_SLICE_ROWS, SLICE_ELEMENTS // max(1, tokens))


# A block's weights are counted off its shapes (model/block.block_shapes: the block itself, built on
# the meta device) in the layout its file has (projections packed with --quant), as the store holds
# it; the whole model's (weights/prepared.model_params) off the same shapes and the tables'.

def block_params(cfg: ModelConfig):
    return sum(math.prod(shape) for shape in block_shapes(cfg).values())


def ffn_width(cfg: ModelConfig):
    """The feed-forward's inner width a token's activations take: a MoE token runs k experts."""
    return cfg.experts_per_token * cfg.expert_hidden_dim if cfg.n_experts else cfg.hidden_dim


def block_bytes(cfg: ModelConfig, dtype='bf16', quant=None):
    """Bytes of one block as stored and streamed: its projections packed when `quant` is set (a
    quant.Quant), every other tensor (everything without quant) in `dtype`."""
    return layout_bytes(file_layout(block_shapes(cfg), quant, DTYPES[dtype]))


def lora_params(cfg: ModelConfig, rank, targets):
    shapes = lora_shapes(cfg, LoraConfig(rank, targets=targets))  # one block's A and B matrices
    return cfg.n_layers * sum(math.prod(shape) for shape in shapes.values())


def block_working_set(cfg: ModelConfig, batch, seq, act_bytes):
    """Bytes autograd keeps while recomputing and backpropagating one block (activations + grads)."""
    tokens = batch * seq
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_token = 6 * cfg.dim + 2 * q + 4 * kv + 4 * ffn_width(cfg)  # norms, q/k/v (+ roped), attn out, ffn
    attention = batch * cfg.n_heads * seq * seq if seq > 1024 else 0  # math-kernel scores at long seq
    return (tokens * per_token + attention) * act_bytes


# A kept block's forward frees temporaries between the tensors autograd saves, and a CPU's heap
# (glibc malloc) keeps those holes instead of returning them: measured at 0.3 to 0.65 of the saved
# bytes (0.4B, fp32 and bf16, 4 x 128, 8 x 64, 2 x 256 and 1 x 512, LoRA on 2 to 7 projections,
# dropout 0 to 0.1, device and disk tier; peaks then 0.88-1.08x the plan), so a kept block counts
# this much more on a cpu. A MoE block's kept tensors are many small ones a routed expert (the heap
# fills its holes with them): the whole Qwen3-30B-A3B nf4 at 1 x 256 measured 0.29 (24 blocks kept
# in 4 GiB: max RSS 3.08 GiB, 0.87x a plan counting 0.5).
CPU_HEAP_SLACK = 0.5
CPU_HEAP_SLACK_MOE = 0.3


def heap_slack(cfg: ModelConfig):
    return CPU_HEAP_SLACK_MOE if cfg.n_experts else CPU_HEAP_SLACK


def saved_input_bytes(cfg: ModelConfig, batch, seq, act_bytes):
    """One block's input for one micro-batch, kept from the forward for the block's recompute."""
    return batch * seq * cfg.dim * act_bytes


LORA_INPUT = {'q': 'attn_in', 'k': 'attn_in', 'v': 'attn_in', 'o': 'attn_out', 'gate': 'ffn_in', 'up': 'ffn_in', 'router': 'ffn_in', 'experts': 'ffn_act',
              'down': 'ffn_act'}  # what each target's LoRA reads


def kept_activation_bytes(cfg: ModelConfig, batch, seq, dtype='bf16', targets=('q', 'v'), rank=8, dropout=0.0,
                          lora_dropout=0.0, device_type='cpu', packed=False, packed_experts=False):
    """Bytes a block keeps from its forward under autograd until its backward (its frozen weights
    not counted: they are fetched again), for one micro-batch of batch x seq: what autograd saves,
    term by term as torch 2.x saves it (tests/test_plan.py checks the sum against the saved tensors
    of a real block), plus the block's input the engine holds. packed_experts: a MoE block's experts
    travel packed (--quant) and run inside model/moe._Unpacked, which keeps their input alone."""
    t, w, f = batch * seq, DTYPE_BYTES[dtype], 4
    q, kv, heads = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_heads
    width = {'attn_in': cfg.dim, 'attn_out': q, 'ffn_in': cfg.dim, 'ffn_act': ffn_width(cfg)}
    norms = 4 if cfg.pre_norms and cfg.post_norms else 2  # gemma: four a block
    total = norms * t * (cfg.dim + 1) * f  # each RMSNorm: its input in fp32 and 1/rms
    if cfg.qk_norm:
        total += t * (q + kv + heads + cfg.n_kv_heads) * f
    if w != f:  # in fp32 the block's input is the first norm's input; else both are held
        total += t * cfg.dim * w + 4 * seq * cfg.head_dim * w * (batch if packed else 1)  # + rope's cos, sin cast
    math_attention = dropout > 0 and device_type != 'cuda'  # attention dropout outside cuda: the math kernel
    if cfg.attn_softcap is not None:  # gemma2's scores, written out (block.softcapped_attention): q, the
        math_attention = True       # repeated k and v; tanh's output, the fp32 softmax and its cast back
        total += 3 * t * q * w + t * heads * seq * (2 * w + f if w != f else 2 * f)
    elif math_attention:  # q, k, v per head and the probabilities, their dropout mask and the dropped ones, in fp32
        total += 3 * t * q * f + 3 * t * heads * seq * f
    else:  # the fused kernel: q, k, v after rope, the output, the log-sum-exp
        total += t * (2 * q + 2 * kv) * w + t * heads * f
    if packed:
        total += batch * seq * seq * f  # the documents' mask, as an additive float mask
    if dropout:
        total += 2 * t * cfg.dim * w  # the residual branches' dropout masks
    if not (cfg.n_experts and packed_experts):  # _Unpacked runs the experts' SwiGLU again in the backward
        total += 3 * t * ffn_width(cfg) * w  # gate, silu(gate), up
    if cfg.n_experts:
        total += moe_kept_bytes(cfg, t, w, targets, packed_experts)
    shared = {'attn_out'} if not math_attention else set()  # the fused attention keeps its output anyway
    for target in targets:  # LoRA: A's input (fp32) and A's output
        source = LORA_INPUT[target]
        total += t * rank * f
        if lora_dropout:
            total += 2 * t * width[source] * f  # the dropped input and its mask
        elif w != f:
            total += t * width[source] * f  # each target's own fp32 copy of its input
        elif source not in shared:  # in fp32 the targets that read one input share it
            shared.add(source)
            total += t * width[source] * f
    return total


def moe_kept_bytes(cfg: ModelConfig, t, w, targets, packed_experts=False):
    """What a MoE block keeps beyond a dense MLP's terms, for t tokens: each expert's gathered input
    and its output (weighed by the router after it), the router's fp32 probabilities and choices
    (tests/test_kept.py measures them: without these the plan kept 1.5x less than a MoE block holds,
    and auto kept more blocks than memory held). With `experts` among the targets, the expert LoRA's
    fp32 inputs, counted a few percent over, except where the experts are packed (model/moe._Unpacked
    keeps their input alone and runs them again in the backward)."""
    k, f = cfg.experts_per_token, 4
    per_choice = 3 if packed_experts else 2  # packed: one more tensor of the model's width a choice, measured
    total = t * (per_choice * k * cfg.dim * w + cfg.n_experts * f + 128)
    if 'experts' in targets and not packed_experts:
        total += t * k * (2 * cfg.dim + cfg.expert_hidden_dim) * f
    return total


@dataclass
class StepPlan:
    """How one optimizer step runs: `trip` micro-batches travel together (each block is fetched once
    for their forward and once for their backward), the last `kept_blocks` blocks keep their
    activations (the others are recomputed from their saved input), and the saved inputs may take
    `stash_device_bytes` on the device and `stash_ram_bytes` in host RAM before they spill to disk."""
    micro_batches: int
    trip: int
    kept_blocks: int
    n_layers: int
    kept_bytes: int         # the kept activations of one trip
    saved_input_bytes: int  # the saved inputs of one trip
    budget: int             # what the step could take on the device (on a cpu: the host)
    stash_device_bytes: int
    stash_ram_bytes: int
    note: str = ''          # why the plan recomputes what it does, when that was not asked for

    @property
    def trips(self):
        return math.ceil(self.micro_batches / self.trip)

    def describe(self):
        kept = ('every block keeps its activations' if self.kept_blocks == self.n_layers else
                'every block is recomputed in the backward' if not self.kept_blocks else
                f'the last {self.kept_blocks} of {self.n_layers} blocks keep their activations, the rest are '
                'recomputed')
        travel = (f'{self.micro_batches} micro-batches per step, {self.trip} per trip ({self.trips} trip'
                  f'{"s" if self.trips > 1 else ""}: each block crosses {2 * self.trips} times a step)')
        return (f'{travel}; {kept} ({self.kept_bytes / GIB:.2f} GiB kept, {self.saved_input_bytes / GIB:.2f} GiB '
                f'of saved inputs, of {self.budget / GIB:.2f} GiB){"; " + self.note if self.note else ""}')


def plan_step(cfg: ModelConfig, batch, seq, dtype, micro_batches, budget, ram_budget=0, disk_budget=None, trip=None,
              keep='auto', working=0, block_files=0, host_heap=False, ram_files=0, in_flight=0, disk_reads=None,
              **activation):
    """The StepPlan for `micro_batches` of batch x seq within `budget` bytes on the device (on a cpu:
    the host) for what the step holds beyond the weights (`working` of it taken by the working set of
    one block's backward and the head), with saved inputs spilling to `ram_budget` bytes of host RAM,
    then to `disk_budget` bytes of disk (None: unlimited). block_files: on a cpu, the bytes of the
    block files read at each use, which kept activations leave to the page cache only where they fit
    beside the step (page_cache_reserve); host_heap: the step runs on a cpu's heap (heap_slack
    more for each kept block). ram_files: on cuda, the bytes of the disk tier's block files the page
    cache would keep in host RAM (ram_page_cache). in_flight: the blocks held at once, already taken
    off `budget` (for the message when not even one micro-batch fits). disk_reads: (one block file's
    bytes, the disk's bytes a second as the run read them) where every block is read from its file on
    a cpu: auto then keeps the blocks that make the step fastest, the page cache taking the rest
    (keep_cost.fastest_kept), where the files cannot stay cached.

    trip: micro-batches per trip; None: all of them as long as their hidden states and gradients fit
    on the device (saved inputs spill: a few percent of a block's bytes a micro-batch, far less than
    the blocks' second trip they save). keep: 'auto' (the most blocks that fit, the last ones:
    their backward comes first, so their memory is held the shortest) where keeping saves time
    (keep_cost.keep_pays), 'all', 'none', or a number of blocks. activation: kept_activation_bytes'
    settings (targets, rank, dropout, ...)."""
    n, w = cfg.n_layers, DTYPE_BYTES[dtype]
    one_input = saved_input_bytes(cfg, batch, seq, w)
    one_kept = kept_activation_bytes(cfg, batch, seq, dtype, **activation)  # one block's, one micro-batch's
    per_block = int(one_kept * (1 + heap_slack(cfg) * host_heap))

    def device_need(k, kept):  # kept activations, each micro-batch's hidden state and gradient, working set
        return k * kept * per_block + 2 * k * one_input + working

    if trip is None:
        trip = micro_batches
        while trip > 1 and device_need(trip, 0) > budget:
            trip -= 1
    trip = max(1, min(trip, micro_batches))
    stash = trip * n * one_input
    if disk_budget is not None and stash > budget - device_need(trip, 0) + ram_budget + disk_budget:
        raise SlowLlamaError(f'grad_accum {micro_batches}: the saved inputs of {trip} micro-batch(es) of {batch} x '
                             f'{seq} need {stash / GIB:.2f} GiB; the device has {budget / GIB:.2f} GiB for the step, '
                             f'RAM {ram_budget / GIB:.2f} GiB and the spill folder\'s disk {disk_budget / GIB:.2f} GiB '
                             '(lower `batch_size` or `seq_len`, or free memory or disk)')
    reserve, cache_note = page_cache_reserve(block_files, budget, device_need(trip, 0))
    # blocks read from disk each step: one block's room stays with the page cache beside the two in
    # use, or the system takes their pages back while they are read and used (the 7B in 4 GiB with 19
    # blocks kept and no such room read 7.5 GB a step more than with none, and lost most of its gain);
    # auto leaves it, a number of blocks or `all` asked for is fitted as asked
    read_room = in_flight // 2 if keep == 'auto' and block_files and not reserve else 0
    pays, note = (keep_pays(cfg, batch, seq, dtype, one_kept, ffn_width(cfg), activation.get('device_type', 'cpu'))
                  if keep == 'auto' else (True, ''))
    if pays:
        kept, kept_note = _kept_blocks(keep, n, budget - reserve - read_room, lambda blocks: device_need(trip, blocks))
        if keep == 'auto' and kept and disk_reads and not reserve and not cfg.n_experts:
            cache_room = lambda k: budget - read_room - device_need(trip, k) - trip * (n - k) * one_input  # noqa: E731
            kept, kept_note = fastest_kept(cfg, batch, seq, dtype, trip, kept, one_kept, ffn_width(cfg),
                                           *disk_reads, cache_room)
        note = '; '.join(part for part in (note, kept_note) if part)
    else:
        kept = 0
    refuse_below_one_block(budget, device_need(1, 0), in_flight, batch, seq)
    room = max(0, budget - device_need(trip, kept))
    ram_room, ram_note = ram_page_cache(ram_files, ram_budget, trip * (n - kept) * one_input - room)
    note = '; '.join(part for part in (note, cache_note, ram_note) if part)
    return StepPlan(micro_batches, trip, kept, n, trip * kept * per_block, trip * (n - kept) * one_input, budget,
                    stash_device_bytes=room, stash_ram_bytes=ram_room, note=note)


def page_cache_reserve(block_files, budget, step_need):
    """-> (what kept activations leave to the page cache of `block_files` bytes of blocks read from
    their files, a note saying which, in numbers). All of it where the files fit in `budget` beside
    what the step needs without keeping (`step_need`): the next step then reads them from memory.
    None where they do not: every step reads every block from disk whatever is reserved (the two
    blocks in flight are counted apart), so that memory serves kept activations and saved inputs."""
    if not block_files:
        return 0, ''
    if block_files + step_need <= budget:
        return block_files, (f'the block files ({block_files / GIB:.2f} GiB) fit beside the step '
                             f'({step_need / GIB:.2f} of {budget / GIB:.2f} GiB): left to the page cache, the next '
                             'step reads them from memory')
    return 0, (f'the block files ({block_files / GIB:.2f} GiB) cannot stay in the page cache beside the step '
               f'({step_need / GIB:.2f} of {budget / GIB:.2f} GiB): read from disk each step, nothing reserved '
               'for them but one block\'s room for the reads')


def _kept_blocks(keep, n, budget, need):
    """-> (blocks that keep their activations, a note when auto keeps fewer than all)."""
    if keep == 'none':
        return 0, ''
    if keep == 'all' or isinstance(keep, int):
        blocks = n if keep == 'all' else max(0, min(int(keep), n))
        if need(blocks) > budget:
            raise SlowLlamaError(f'keep_activations {keep}: the activations of {blocks} blocks need '
                                 f'{need(blocks) / GIB:.2f} GiB, the step has {budget / GIB:.2f} GiB '
                                 '(use auto, a smaller number, a smaller batch, or `micro_batches_per_trip` 1)')
        return blocks, ''
    blocks = n
    while blocks > 0 and need(blocks) > budget:
        blocks -= 1
    if blocks == n:
        return n, ''
    if blocks == 0:
        return 0, (f'activations recomputed: one block\'s need {(need(1) - need(0)) / GIB:.3f} GiB, the step has '
                   f'{max(0, budget - need(0)) / GIB:.3f} GiB to spare')
    return blocks, f'the activations of {blocks} blocks fit in {budget / GIB:.2f} GiB'


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


def step_working_bytes(cfg: ModelConfig, batch, seq, dtype='bf16', micro_batches=1):
    """What the step takes beyond its saved state at its busiest: one block recomputed and pushed
    back through, or the head's pass over a vocabulary slice for `micro_batches` at once, whichever
    is larger."""
    w, tokens = DTYPE_BYTES[dtype], batch * seq
    head_slice = head_slice_rows(tokens)  # the head streams in vocabulary slices
    # a slice's logits (exponentiated in place) and rows; each micro-batch's hidden, softmax @ rows,
    # target rows and gradient
    head_slice = min(head_slice, cfg.vocab_size)  # a slice is never more than the vocabulary
    loss = (2 * tokens * head_slice * 4 + head_slice * cfg.dim * w
            + micro_batches * 4 * tokens * cfg.dim * 4)
    return max(block_working_set(cfg, batch, seq, w), loss)


def cap_budget(free, cap=None):
    """What a plan may take of `free` bytes: 90% of it, and no more than a user's cap."""
    return int(0.9 * free) if cap is None else min(int(0.9 * free), int(cap))


def plain_nf4_unpack_bytes(cfg: ModelConfig, dtype='bf16'):
    """Device bytes the plain nf4 unpack (quant.nf4_dequantize where no faster kernel serves, as on
    mps) holds beside its output while it unpacks a block's largest projection. An fp32 output is
    gathered into in place: only the bytes widened to int32 indices (2 bytes a value). Otherwise the
    gathered float32 pairs (4 bytes a value) and their product with the absmax in float32, before it
    is rounded into the output (4 more; tests/test_mps.py measures both on a cpu)."""
    largest = cfg.dim * max(cfg.hidden_dim, cfg.n_heads * cfg.head_dim)
    return largest * (2 if dtype == 'fp32' else 8)


def predict(cfg: ModelConfig, batch, seq, dtype='bf16', rank=8, targets=('q', 'v'), resident_blocks=0,
            ram_blocks=0, stash_on_device=True, device_is_host=False, quant=None, micro_batches=1, kept_blocks=0,
            plain_unpack=False, **activation):
    """Peak device and host bytes of one training step with this placement, `micro_batches` of batch x
    seq travelling together and the last `kept_blocks` blocks keeping their activations (the rest
    keep their saved inputs). With `quant`, blocks are held and streamed packed and two of them at a
    time are unpacked on the device (plain_unpack: by the plain torch kernels, as on mps, with their
    temporaries). activation: kept_activation_bytes' other settings."""
    w = DTYPE_BYTES[dtype]
    block = block_bytes(cfg, dtype, quant)  # a block held whole (device or RAM tier)
    # a streamed block as its pass fetches it: a MoE block's attention and router and, at worst, as
    # many experts as the trip's tokens can choose (experts_worst); two at once (double buffering,
    # and the last two blocks of the forward are the backward's first)
    fetched = experts_worst(cfg, micro_batches * batch * seq)
    flight = fetched_block_bytes(cfg, fetched, dtype, quant)
    # dequantized: two blocks (a MoE block's attention and router), and one expert at a time (moe.py)
    unpacked = (2 * core_params(cfg) + expert_params(cfg)) * w if quant is not None else 0
    if plain_unpack and quant is not None and quant.type == 'nf4':
        unpacked += plain_nf4_unpack_bytes(cfg, dtype)
    tables = table_bytes(cfg, dtype, quant)
    lora = lora_params(cfg, rank, targets) * 4 * 4  # fp32 weights, grads, two Adam moments
    one_input = saved_input_bytes(cfg, batch, seq, w)
    saved_inputs = micro_batches * (cfg.n_layers - kept_blocks) * one_input
    kept = micro_batches * kept_blocks * int(kept_activation_bytes(cfg, batch, seq, dtype, targets, rank,
                                                                   packed_experts=quant is not None, **activation)
                                             * (1 + heap_slack(cfg) * device_is_host))
    step = (lora + step_working_bytes(cfg, batch, seq, dtype, micro_batches) + 2 * micro_batches * one_input
            + unpacked + kept)
    if device_is_host:
        total = host_only_peak(cfg, block, tables, resident_blocks + ram_blocks, step + saved_inputs, flight)
        return MemoryPlan(total, total, resident_blocks, ram_blocks)
    streamed = cfg.n_layers - resident_blocks
    device = resident_blocks * block + (2 * flight if streamed else 0) + step  # streamed: double buffering
    if resident_blocks == cfg.n_layers:  # everything fits: embeddings and head stay on the device too
        device += tables
    if stash_on_device:
        device += saved_inputs
    host = pinned_bytes(cfg, w, resident_blocks, ram_blocks) + (0 if stash_on_device else saved_inputs)
    return MemoryPlan(int(device), int(host), resident_blocks, ram_blocks)


def pinned_bytes(cfg: ModelConfig, w, resident_blocks, ram_blocks):
    """Host bytes the store pins (store.py, pinned.py): the RAM tier (its blocks, and the embeddings
    and head with them when anything is held in RAM), and when blocks stream from disk their two
    staging buffers and the head's two, in the compute dtype (the reader thread converts). A MoE
    block's staging holds its attention and router only: its experts travel as they are fetched."""
    block = block_params(cfg) * w
    tables = cfg.vocab_size * cfg.dim * w * (1 if cfg.tie_embeddings else 2) + cfg.dim * w  # + the final norm
    everything_resident = resident_blocks == cfg.n_layers
    host = ram_blocks * block + (tables if ram_blocks and not everything_resident else 0)
    if cfg.n_layers - resident_blocks > ram_blocks:  # the head is on the disk tier too
        head_rows = min(cfg.vocab_size, max(1, ROW_STAGING_BYTES // (cfg.dim * w)))
        host += 2 * core_params(cfg) * w + 2 * head_rows * cfg.dim * w
    return host


CPU_RUNTIME_BYTES = 160 * 1024 ** 2  # measured: library code paged in, the heap's free slack


def host_only_peak(cfg: ModelConfig, block, tables, held_blocks, step_bytes, flight=None):
    """On a CPU there is one memory and no copies: blocks are used where they lie, held in RAM or
    mapped from their file (the one computing and the next, its pages faulted in ahead: `flight`
    bytes each, a MoE block's fetched part); the embeddings and head are held with the blocks."""
    if held_blocks < cfg.n_layers:
        return int(held_blocks * block + 2 * (block if flight is None else flight) + step_bytes + CPU_RUNTIME_BYTES)
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


def print_plan(cfg: ModelConfig, batch, seq, dtype, rank, targets, quant=None, micro_batches=1, budget=None,
               device_type='cuda'):
    """Print the predicted peaks of a finetune in each offload mode (quant: the blocks' Quant, or
    None), `micro_batches` a step travelling through the blocks together, activations recomputed
    and kept; with `budget` (bytes for the step on the device), the step plan it allows on a
    `device_type` device (on a cpu: whether keeping pays at this shape, keep_cost)."""
    print(f'model: {model_params(cfg) / 1e9:.2f}B parameters, batch {batch} x seq {seq}, {dtype}'
          f'{", " + quant.type + " blocks" if quant else ""}, LoRA r={rank} on {",".join(targets)}')
    w = DTYPE_BYTES[dtype]
    if cfg.n_experts:  # the peaks below count the worst case
        print(f'  {experts_line(cfg, micro_batches * batch * seq, dtype, quant)}')
        print(f'  a decoded token: {experts_line(cfg, 1, dtype, quant).split(": ", 1)[1]}')
    if micro_batches > 1:
        saved = micro_batches * cfg.n_layers * saved_input_bytes(cfg, batch, seq, w)
        print(f'  {micro_batches} micro-batches a step travel through each block together: each block crosses '
              f'twice a step, their saved inputs take {saved / GIB:.2f} GiB (device, then RAM, then disk)')
    per_block = kept_activation_bytes(cfg, batch, seq, dtype, targets, rank, packed_experts=quant is not None)
    print(f'  activations kept instead of recomputed: {per_block / 2 ** 20:.1f} MiB a block and micro-batch, '
          f'{micro_batches * cfg.n_layers * per_block / GIB:.2f} GiB for every block')
    for label, resident, ram in [('device (all resident)', cfg.n_layers, 0), ('ram (streamed)', 0, cfg.n_layers),
                                 ('disk (streamed)', 0, 0)]:
        peaks = [predict(cfg, batch, seq, dtype, rank, targets, resident_blocks=resident, ram_blocks=ram, quant=quant,
                         micro_batches=micro_batches, kept_blocks=kept) for kept in (0, cfg.n_layers)]
        print(f'  {label:<22}' + ' |'.join(f' {how}: device {p.device_bytes / GIB:6.2f} GiB   host '
                                           f'{p.host_bytes / GIB:6.2f} GiB' for how, p in zip(('recomputed', 'kept'), peaks)))
    if budget is not None:
        working = step_working_bytes(cfg, batch, seq, dtype, micro_batches)
        plan = plan_step(cfg, batch, seq, dtype, micro_batches, budget, working=working, targets=targets, rank=rank,
                         host_heap=device_type == 'cpu', device_type=device_type, packed_experts=quant is not None)
        print(f'  within {budget / GIB:.2f} GiB for the step on {device_type}: {plan.describe()}')
