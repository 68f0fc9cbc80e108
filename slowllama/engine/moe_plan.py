"""The experts a Mixture-of-Experts block fetches, for the memory plan (plan.py): expected and at
worst for a pass of T tokens, and the bytes of a block as a pass fetches it. Pure arithmetic."""
import math

from ..model.block import block_shapes
from ..model.config import ModelConfig
from ..model.quant import packed_nbytes
from ..weights.copier import layout_bytes
from ..weights.packed import file_layout
from ..weights.prepared import DTYPES

# A MoE block travels in two parts (weights/store.py): its attention and router at each fetch, then
# only the experts some token of the pass routes to. Which ones is known only once the router has run,
# so the plan counts them two ways for a pass of T tokens, each token choosing k of E experts: the
# expected number under uniform routing (each expert missed by a token with probability 1 - k/E, so
# hit by some token with 1 - (1 - k/E)^T), and the worst case, min(E, T k), which the peaks count.

def experts_expected(cfg: ModelConfig, tokens):
    """Experts a block fetches for `tokens` tokens, expected under uniform routing."""
    e, k = cfg.n_experts, cfg.experts_per_token
    return e * (1 - (1 - k / e) ** tokens) if e else 0.0


def experts_worst(cfg: ModelConfig, tokens):
    """The most experts a block can fetch for `tokens` tokens: every token choosing k others."""
    return min(cfg.n_experts, tokens * cfg.experts_per_token)


def _split_layout(cfg: ModelConfig, dtype, quant):
    """(the block's attention, norms and router as stored, one expert's) layouts: {name: (shape, dtype)}."""
    layout = file_layout(block_shapes(cfg), quant, DTYPES[dtype])
    expert = {n: v for n, v in layout.items() if n.startswith('mlp.experts.0.')}
    return {n: v for n, v in layout.items() if not n.startswith('mlp.experts.')}, expert


def fetched_block_bytes(cfg: ModelConfig, experts, dtype='bf16', quant=None):
    """Bytes of one block as a pass fetches it: all of it for a dense model; for a MoE block its
    attention and router and `experts` of its experts, packed as stored."""
    core, expert = _split_layout(cfg, dtype, quant)
    return layout_bytes(core) + (experts * layout_bytes(expert) if cfg.n_experts else 0)


def fetched_block_params(cfg: ModelConfig, experts):
    """block_params of a block as a pass fetches it (see fetched_block_bytes)."""
    shapes = block_shapes(cfg)
    one = sum(math.prod(shape) for n, shape in shapes.items() if n.startswith('mlp.experts.0.'))
    return sum(math.prod(shape) for shape in shapes.values()) - (cfg.n_experts - experts) * one


def expert_params(cfg: ModelConfig):
    """One expert's weights (0 for a dense model): with --quant, what is unpacked of a MoE block's
    experts at any time (model/moe.py unpacks each only while it computes)."""
    return fetched_block_params(cfg, 1) - fetched_block_params(cfg, 0) if cfg.n_experts else 0


def core_params(cfg: ModelConfig):
    """What every fetch of a block brings, dense or MoE: for a MoE block, all but its experts."""
    return fetched_block_params(cfg, 0)


def experts_line(cfg: ModelConfig, tokens, dtype='bf16', quant=None):
    """One line: the experts a block fetches for a pass of `tokens` tokens, expected and at worst, and
    what that block then weighs; '' for a dense model."""
    if not cfg.n_experts:
        return ''
    expected, worst = experts_expected(cfg, tokens), experts_worst(cfg, tokens)
    return (f'experts fetched per block for {tokens} tokens: {expected:.1f} of {cfg.n_experts} expected (uniform '
            f'routing: E(1-(1-k/E)^T), k={cfg.experts_per_token}), {worst} at worst (min(E, Tk)); a block then '
            f'weighs {fetched_block_bytes(cfg, round(expected), dtype, quant) / 2 ** 20:.1f} MiB expected, '
            f'{fetched_block_bytes(cfg, worst, dtype, quant) / 2 ** 20:.1f} MiB at worst, of '
            f'{fetched_block_bytes(cfg, cfg.n_experts, dtype, quant) / 2 ** 20:.1f} MiB whole')


def decoded_token_bytes(cfg: ModelConfig, dtype='bf16', quant=None):
    """Bytes the store reads from the model's files for one decoded token (disk tier, as stored in
    `dtype`): every block as one token fetches it (a MoE block's attention and router and the k
    experts the token chose), the whole head (its logits span the vocabulary) and one embedding row.
    The final norm's few bytes are not counted (nor counted by the store)."""
    w = DTYPES[dtype].itemsize
    packed = quant is not None and quant.head
    head = packed_nbytes((cfg.vocab_size, cfg.dim), quant) if packed else cfg.vocab_size * cfg.dim * w
    row = packed_nbytes((1, cfg.dim), quant) if packed else cfg.dim * w
    return cfg.n_layers * fetched_block_bytes(cfg, experts_worst(cfg, 1), dtype, quant) + head + row
