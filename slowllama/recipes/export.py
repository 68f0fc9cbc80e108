"""The export recipe: a prepared model (+ LoRA) as merged Meta shards, a merged HF folder, a PEFT adapter,
or GGUF for llama.cpp / Ollama (the merged model, or the adapter alone)."""
import os

from ..weights.formats.export import FORMATS, export


def add_arguments(p):
    p.add_argument('--model', required=True, help='the prepared model folder')
    p.add_argument('--lora', default=None, help='the adapter folder (PEFT layout) to merge or export')
    p.add_argument('--format', required=True, choices=FORMATS, help=' | '.join(FORMATS))
    p.add_argument('--out', required=True, help='the folder to write (replaced whole, only on success); '
                   'for gguf and gguf-lora the file (FILE.gguf)')
    p.add_argument('--shards', type=int, default=1, help='meta: model-parallel shards (1 for 7B, 2 for 13B, 8 for 70B)')
    p.add_argument('--dtype', default=None, help='bf16 | fp16 | fp32; for gguf also q8_0 and llama.cpp\'s schemes '
                   'q4_k_m | q5_k_m | q6_k | q4_k_s | q5_k_s | q3_k_m | q4_0 | q5_0, each tensor typed as '
                   'llama-quantize types it (default: the prepared model\'s; gguf-lora: f32)')
    p.add_argument('--max-shard-size', type=float, default=2.0, help='hf: GiB per safetensors file (default 2)')


def run(args):
    out = export(args.model, args.out, args.format, adapter=args.lora, shards=args.shards, dtype=args.dtype,
                 max_shard_bytes=int(args.max_shard_size * 2**30))
    print(f'{args.format} export written to {os.path.abspath(out)}')
