"""Where a model keeps its chat templates, found, read and written as transformers does.

A template is Jinja text; a model may have several by name: `default`, and others such as
`tool_use`. transformers saves them as chat_template.jinja (the default) and
additional_chat_templates/NAME.jinja (the others); older folders keep them in tokenizer_config.json's
`chat_template` (a string, or a list of {"name", "template"}), processors in chat_template.json, and
GGUF files in their metadata (`tokenizer.chat_template`, `tokenizer.chat_template.NAME`). The files
win over tokenizer_config.json, as in transformers. A prepared folder keeps them as transformers
saves them, so every reader of the folder (ours, transformers, export) finds the same template.
"""
import json
import os

from ..errors import SlowLlamaError
from ..weights.files import read_json

DEFAULT = 'default'
TEMPLATE_FILE = 'chat_template.jinja'
TEMPLATE_DIR = 'additional_chat_templates'
TEMPLATE_JSON = 'chat_template.json'
CONFIG_FILE = 'tokenizer_config.json'


def read_templates(folder):
    """-> ({name: template}, the file they came from); ({}, None) when the folder has none."""
    folder = str(folder)
    templates = _jinja_files(folder)
    if templates:
        return templates, os.path.join(folder, TEMPLATE_FILE if DEFAULT in templates else TEMPLATE_DIR)
    for name in (TEMPLATE_JSON, CONFIG_FILE):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            config = read_json(path, name)
            value = config.get('chat_template') if isinstance(config, dict) else None
            templates = templates_from_value(value, path)
            if templates:
                return templates, path
    return {}, None


def templates_from_value(value, where):
    """`chat_template` as JSON holds it -> {name: template}: a string is the default template, a
    list holds named ones."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT: value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get('name'), str)
                                       and isinstance(t.get('template'), str) for t in value):
        templates = {t['name']: t['template'] for t in value}
        for name in templates:
            check_name(name, where)
        return templates
    raise SlowLlamaError(f'{where}: chat_template must be a string or a list of {{"name", "template"}} strings')


def check_name(name, where):
    """A template's name becomes a file name: nothing that could point outside the folder."""
    if not name or name.startswith('.') or '/' in name or '\\' in name or '\0' in name:
        raise SlowLlamaError(f'{where}: {name!r} cannot be the name of a chat template')


def _jinja_files(folder):
    templates = {}
    path = os.path.join(folder, TEMPLATE_FILE)
    if os.path.isfile(path):
        templates[DEFAULT] = read_text(path)
    extra = os.path.join(folder, TEMPLATE_DIR)
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith('.jinja') and not name.startswith('.'):
                templates[name[:-len('.jinja')]] = read_text(os.path.join(extra, name))
    return templates


def read_text(path, flag=None):
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: chat template not found' + (f' ({flag})' if flag else '')) from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise SlowLlamaError(f'{path}: not a UTF-8 text file' + (f' ({flag})' if flag else '')) from None


def template_files(templates):
    """{name: template} -> {relative path: bytes}, laid out as transformers saves them."""
    files = {}
    for name, template in templates.items():
        path = TEMPLATE_FILE if name == DEFAULT else f'{TEMPLATE_DIR}/{name}.jinja'
        files[path] = template.encode('utf-8')
    return files


def with_templates(files, templates, where):
    """Tokenizer files read from a source ({name: bytes}) -> the files of a prepared folder: the
    templates as .jinja files, and tokenizer_config.json without a `chat_template` of its own (one
    place for each fact). `templates` are the source's ({name: template})."""
    files = dict(files)
    if CONFIG_FILE in files:
        try:
            config = json.loads(files[CONFIG_FILE])
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise SlowLlamaError(f'{where}: {CONFIG_FILE} is not valid JSON ({e})') from None
        if isinstance(config, dict) and 'chat_template' in config:
            del config['chat_template']
            files[CONFIG_FILE] = (json.dumps(config, indent=2, ensure_ascii=False) + '\n').encode()
    files.pop(TEMPLATE_JSON, None)
    return {**files, **template_files(templates)}


def gguf_templates(metadata):
    """{name: template} from a GGUF's metadata (metadata(key) -> value or None), as llama.cpp's
    writer stores them: the default under tokenizer.chat_template, the others listed in
    tokenizer.chat_templates, each under tokenizer.chat_template.NAME."""
    templates = {}
    default = metadata('tokenizer.chat_template')
    if default is not None:
        templates[DEFAULT] = default
    for name in metadata('tokenizer.chat_templates') or []:
        template = metadata(f'tokenizer.chat_template.{name}')
        if isinstance(name, str) and template is not None:
            templates[name] = template
    for name, template in templates.items():
        if not isinstance(template, str):
            raise SlowLlamaError(f'metadata tokenizer.chat_template of {name!r} is not a string')
        check_name(name, 'GGUF metadata tokenizer.chat_templates')
    return templates


def gguf_template_metadata(templates):
    """{name: template} -> the GGUF metadata llama.cpp's writer gives them (gguf_templates' inverse)."""
    metadata = {'tokenizer.chat_template': templates[DEFAULT]} if DEFAULT in templates else {}
    named = [name for name in templates if name != DEFAULT]
    if named:
        metadata['tokenizer.chat_templates'] = named
        metadata.update({f'tokenizer.chat_template.{name}': templates[name] for name in named})
    return metadata


def copy_tokenizer_files(src, names, writer, converted=None):
    """The source folder's tokenizer files (and `converted` ones made from them: {name: bytes}),
    with its chat templates from wherever it keeps them, laid out as transformers saves them."""
    found = {}
    for name in names:
        path = os.path.join(src, name)
        if os.path.exists(path):
            with open(path, 'rb') as f:
                found[name] = f.read()
    found = {**(converted or {}), **found}
    for name, data in with_templates(found, read_templates(src)[0], src).items():
        writer.add_tokenizer_file(name, data)
