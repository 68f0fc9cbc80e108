"""The torch that setup.cfg requires is one the package runs on: every torch API the package uses that
is younger than some release is listed in NEWER_APIS with the release that brought it, and none is
younger than the floor (CI runs one newer torch only, so a use of a young API would pass there and
break the first user with an older one).

The releases were read from the releases' own files (the macOS arm64 wheels on PyPI: their Python
sources, the type stubs of torch._C and, for Stream.__enter__, the symbols of libtorch_python);
'or older' marks an API already present in 2.3.1, the oldest release read. A use of an attribute of
a young namespace (YOUNG) that the table lacks fails too: look its release up and add it."""
import ast
import configparser
import importlib
import importlib.util
import os
import re

import torch

import slowllama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(slowllama.__file__)))
SCANNED = ['slowllama', 'scripts']
NEWER_APIS = {  # name (or 'function(keyword)') -> (major, minor) of the release that brought it
    'torch.Event': (2, 4),  # the device-generic event
    'torch.Stream': (2, 7),  # the class is 2.3 or older; `with stream:` (Stream.__enter__), as CopyQueue does, is 2.7
    'torch.OutOfMemoryError': (2, 4),
    'torch.accelerator': (2, 6),
    'torch.accelerator.current_accelerator': (2, 6), 'torch.accelerator.current_device_index': (2, 6),
    'torch.accelerator.current_stream': (2, 6), 'torch.accelerator.device_count': (2, 6),
    'torch.accelerator.is_available': (2, 6), 'torch.accelerator.set_device_index': (2, 6),
    'torch.accelerator.set_stream': (2, 6), 'torch.accelerator.synchronize': (2, 6),
    'torch.accelerator.device_index': (2, 8),
    'torch.accelerator.empty_cache': (2, 9), 'torch.accelerator.memory_allocated': (2, 9),
    'torch.accelerator.max_memory_allocated': (2, 9), 'torch.accelerator.memory_reserved': (2, 9),
    'torch.accelerator.max_memory_reserved': (2, 9), 'torch.accelerator.memory_stats': (2, 9),
    'torch.accelerator.reset_peak_memory_stats': (2, 9), 'torch.accelerator.reset_accumulated_memory_stats': (2, 9),
    'torch.accelerator.get_memory_info': (2, 10), 'torch.accelerator.get_device_capability': (2, 10),
    'torch.accelerator.empty_host_cache': (2, 12), 'torch.accelerator.Graph': (2, 12),
    'torch.mps': (2, 3), 'torch.serialization': (2, 3),  # or older; their members one by one
    'torch.mps.synchronize': (2, 3), 'torch.mps.get_rng_state': (2, 3), 'torch.mps.set_rng_state': (2, 3),  # or older
    'torch.mps.manual_seed': (2, 3), 'torch.mps.seed': (2, 3), 'torch.mps.empty_cache': (2, 3),  # or older
    'torch.mps.set_per_process_memory_fraction': (2, 3), 'torch.mps.current_allocated_memory': (2, 3),  # or older
    'torch.mps.driver_allocated_memory': (2, 3), 'torch.mps.event': (2, 3), 'torch.mps.profiler': (2, 3),  # or older
    'torch.mps.device_count': (2, 4),
    'torch.mps.recommended_max_memory': (2, 5), 'torch.mps.is_available': (2, 5),
    'torch.mps.compile_shader': (2, 7), 'torch.mps.load_metallib': (2, 13),
    'torch.serialization.skip_data': (2, 5),
    'torch.utils.serialization': (2, 7), 'torch.utils.serialization.config': (2, 7),
    'torch.utils.serialization.config.save': (2, 7),
    'torch.nn.attention': (2, 3), 'torch.nn.attention.sdpa_kernel': (2, 3), 'torch.nn.attention.SDPBackend': (2, 3),
    'torch.nn.functional.scaled_dot_product_attention(enable_gqa)': (2, 5),
}
YOUNG = ('torch.accelerator', 'torch.mps', 'torch.Stream', 'torch.Event', 'torch.utils.serialization',
         'torch.serialization', 'torch.nn.attention')


def declared_floor():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, 'setup.cfg'))
    found = re.search(r'^torch>=(\d+)\.(\d+)', config['options']['install_requires'], re.M)
    return int(found[1]), int(found[2])


def torch_uses(path):
    """The torch names a file uses, through its import aliases: 'torch.accelerator.current_stream',
    and 'function(keyword)' for each keyword a call passes."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'torch':
                    aliases[alias.asname or 'torch'] = alias.name if alias.asname else 'torch'
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or '').split('.')[0] == 'torch':
            aliases.update({alias.asname or alias.name: f'{node.module}.{alias.name}' for alias in node.names})
            yield node.module
    for node in ast.walk(tree):
        name = dotted(node, aliases)
        if name:
            yield name
        if isinstance(node, ast.Call) and dotted(node.func, aliases):
            yield from (f'{dotted(node.func, aliases)}({k.arg})' for k in node.keywords if k.arg)


def dotted(node, aliases):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return '.'.join([aliases[node.id]] + parts[::-1])
    return None


def package_uses():
    uses = {}
    for folder in SCANNED:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for file in files:
                if file.endswith('.py'):
                    path = os.path.join(dirpath, file)
                    for name in torch_uses(path):
                        uses.setdefault(name, os.path.relpath(path, ROOT))
    return uses


def needs(name):
    """-> (the release a use needs: the newest of the table's entries for it and what it is an
    attribute of, whether the table covers it: an entry for it, or for a class or function it is an
    attribute of; a young module's members are listed one by one)."""
    function, _, keyword = name.partition('(')
    parts = function.split('.')
    listed = [p for p in ('.'.join(parts[:i]) for i in range(1, len(parts) + 1)) if p in NEWER_APIS]
    release = max([NEWER_APIS[p] for p in listed] + [NEWER_APIS.get(name, (0, 0))], default=(0, 0))
    covered = bool(listed) and (listed[-1] == function or not is_module(listed[-1]))
    return release, covered


def is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # an attribute of a module
        return False


def test_no_torch_api_the_package_uses_is_newer_than_the_declared_floor():
    floor = declared_floor()
    uses = package_uses()
    assert 'torch.accelerator.current_stream' in uses and 'torch.Stream' in uses  # the scan sees through imports
    too_new = {name: (needs(name)[0], where) for name, where in uses.items() if needs(name)[0] > floor}
    assert not too_new, f'setup.cfg requires torch>={floor}, but these need a newer one: {too_new}'
    unknown = {name: where for name, where in uses.items() if name.startswith(YOUNG) and not needs(name)[1]}
    assert not unknown, f'look up the release that brought these and add them to NEWER_APIS: {unknown}'


def test_the_floor_is_no_newer_than_the_torch_ci_installs():
    ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read()
    major, minor = re.search(r'torch==(\d+)\.(\d+)', ci).groups()
    assert declared_floor() <= (int(major), int(minor)) <= tuple(int(v) for v in torch.__version__.split('.')[:2])


def test_the_table_names_real_apis():
    """Each entry exists in the installed torch (a typo would let a use slip by)."""
    for name in NEWER_APIS:
        function, _, keyword = name.partition('(')
        module, _, attribute = function.rpartition('.')
        try:
            target = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            target = importlib.import_module(function)
        if keyword:
            assert keyword.rstrip(')') in target.__doc__, name
