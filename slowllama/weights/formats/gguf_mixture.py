"""Which GGUF type each tensor gets in a llama.cpp quantization scheme (q4_k_m, q5_k_s, ...).

llama.cpp's `llama-quantize` does not write one type throughout: a scheme names a default type, and
a few tensors that matter more get more bits. These tables and rules restate, for the dense llama
models we export, the choices of its per-tensor policy (src/llama-quant.cpp):

- the output head takes Q6_K (Q8_0 when its rows do not split into the default type's blocks); a
  model without output.weight (tied embeddings) reads the head from token_embd, so token_embd is
  treated as the head;
- attn_v and ffn_down take more bits in some layers: "_M" schemes give Q6_K to the first and last
  eighth of the layers and every third layer between (more_bits), Q4_K_S gives Q5_K to the first 4
  attn_v and the first eighth of ffn_down, Q3_K_M gives attn_v Q5_K in the first 2 layers and Q4_K
  after, ffn_down Q5_K in the first sixteenth and Q4_K after, attn_output Q4_K;
- in a 70B (80 layers with grouped-query attention) attn_v never goes below Q5_K;
- a model of exactly 8 experts (Mixtral) takes Q8_0 for attn_v and attn_k, and Q5_K for attn_output in
  q3_k_m, q4_k_s and q4_k_m; the router (ffn_gate_inp) is never quantized: it stays F32, as llama.cpp's
  converter writes it; each 3D ffn_down_exps counts as its layer's ffn_down;
- llama.cpp's other cases, for grouped-query attention (n_head / n_head_kv >= 4), apply to the Q2_K / IQ
  schemes only, none of which we write;
- last, a tensor whose rows do not split into its type's blocks falls back: Q3_K -> Q4_0,
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when even 32-value blocks do not fit.

Counters run in llama.cpp's visiting order (layer number, then name), so the i-th attn_v is layer i.
"""
import re

QK_K = 256
BLOCK_SIZE = {'q3_k': QK_K, 'q4_k': QK_K, 'q5_k': QK_K, 'q6_k': QK_K,
              'q4_0': 32, 'q4_1': 32, 'q5_0': 32, 'q5_1': 32, 'q8_0': 32, 'f16': 1, 'f32': 1}

# scheme -> (default type, llama.cpp's general.file_type name)
SCHEMES = {
    'q3_k_m': ('q3_k', 'MOSTLY_Q3_K_M'),
    'q4_k_s': ('q4_k', 'MOSTLY_Q4_K_S'),
    'q4_k_m': ('q4_k', 'MOSTLY_Q4_K_M'),
    'q5_k_s': ('q5_k', 'MOSTLY_Q5_K_S'),
    'q5_k_m': ('q5_k', 'MOSTLY_Q5_K_M'),
    'q6_k': ('q6_k', 'MOSTLY_Q6_K'),
    'q4_0': ('q4_0', 'MOSTLY_Q4_0'),
    'q5_0': ('q5_0', 'MOSTLY_Q5_0'),
}

# where a type cannot take a tensor's rows: llama.cpp's next choice
FALLBACK = {'q3_k': 'q4_0', 'q4_k': 'q5_0', 'q5_k': 'q5_1', 'q6_k': 'q8_0'}

EMBED, HEAD, ROUTER = 'token_embd.weight', 'output.weight', 'ffn_gate_inp.weight'
_LAYER = re.compile(r'blk\.(\d+)\.')


def more_bits(i, n):
    """The layers an "_M" scheme spends more bits on: first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _attn_v(scheme, i, n, big):
    kind = SCHEMES[scheme][0]
    if scheme == 'q3_k_m':
        kind = 'q5_k' if i < 2 else 'q4_k'
    elif scheme in ('q4_k_m', 'q5_k_m') and more_bits(i, n):
        kind = 'q6_k'
    elif scheme == 'q4_k_s' and i < 4:
        kind = 'q5_k'
    if big and kind in ('q3_k', 'q4_k'):
        kind = 'q5_k'
    return kind


def _ffn_down(scheme, i, n):
    kind = SCHEMES[scheme][0]
    if scheme == 'q3_k_m':
        kind = 'q5_k' if i < n // 16 else 'q4_k'
    elif scheme in ('q4_k_m', 'q5_k_m') and more_bits(i, n):
        kind = 'q6_k'
    elif scheme == 'q4_k_s' and i < n // 8:
        kind = 'q5_k'
    return kind


def _head(default, cols):
    return 'q8_0' if cols % BLOCK_SIZE[default] else 'q6_k' if default != 'q8_0' else default


def _fallback(kind, cols):
    if cols % BLOCK_SIZE[kind] == 0:
        return kind
    kind = FALLBACK.get(kind, 'f16')  # llama.cpp has no fallback for Q4_0 / Q5_0: F16 rather than refuse
    return kind if cols % BLOCK_SIZE[kind] == 0 else 'f16'


def visiting_order(names):
    """llama.cpp's order: by layer number (outer tensors, with none, first), then by name."""
    def key(name):
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name)
    return sorted(names, key=key)


def tensor_types(shapes, scheme, n_layers, n_head, n_head_kv, n_expert=0):
    """{GGUF name: shape in torch order ([experts,] rows, row length)} -> ({name: type}, [fallback notes]).

    1-D tensors (norms, rope factors) and the router stay f32; every matrix takes the scheme's choice."""
    default = SCHEMES[scheme][0]
    tied = HEAD not in shapes
    n_attn_v = sum(name.endswith('attn_v.weight') for name in shapes)
    big = n_layers == 80 and n_head != n_head_kv  # llama.cpp's "70B" model type
    i_attn_v = i_ffn_down = 0
    types, notes = {}, []
    for name in visiting_order(shapes):
        shape = shapes[name]
        if len(shape) < 2 or name.endswith(ROUTER):
            types[name] = 'f32'
            continue
        cols = shape[-1]
        if name == HEAD or (tied and name == EMBED):
            kind = _head(default, cols)
            if kind != default and kind != 'q6_k':  # the head's own fallback, before the general one
                notes.append(f'{name}: rows of {cols} values do not split into q6_k blocks of {QK_K}; '
                             f'written as {_fallback(kind, cols)}')
        elif name.endswith('attn_v.weight'):
            kind, i_attn_v = _attn_v(scheme, i_attn_v, n_attn_v, big), i_attn_v + 1
            kind = 'q8_0' if n_expert == 8 else kind
        elif name.endswith('attn_k.weight') and n_expert == 8:
            kind = 'q8_0'
        elif name.endswith(('ffn_down.weight', 'ffn_down_exps.weight')):
            kind, i_ffn_down = _ffn_down(scheme, i_ffn_down, n_layers), i_ffn_down + 1
        elif name.endswith('attn_output.weight') and n_expert == 8:
            kind = 'q5_k' if scheme in ('q3_k_m', 'q4_k_s', 'q4_k_m') else default
        elif name.endswith('attn_output.weight') and scheme == 'q3_k_m':
            kind = 'q4_k'
        else:
            kind = default
        types[name] = _fallback(kind, cols)
        if types[name] != kind:
            notes.append(f'{name}: rows of {cols} values do not split into {kind} blocks of {BLOCK_SIZE[kind]}; '
                         f'written as {types[name]}')
    return {name: types[name] for name in shapes}, notes
