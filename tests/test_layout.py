"""The package's layout (DESIGN.md, docs/architecture.md, whose floors table this test reads): one folder per
floor, imports point down only.
A module never imports from a higher floor; no module imports one that imports it back, directly or
through others (function-level imports included); no recipe imports another recipe; no component
imports a recipe; the package's top level holds only the entry points and what every floor shares."""
import ast
import os
import re

import slowllama

PACKAGE = os.path.dirname(os.path.abspath(slowllama.__file__))
ARCHITECTURE = os.path.join(os.path.dirname(PACKAGE), 'docs', 'architecture.md')


def read_floors(path=ARCHITECTURE):
    """The floors table of docs/architecture.md (its one statement): module or package -> floor, the
    longest prefix deciding; a module imports from its own floor and below."""
    text = open(path, encoding='utf-8').read()
    table = text[text.index('## The floors'):].split('\n\n')[1]
    floors = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip().strip('|').split('|')]
        if cells[0].isdigit():
            floors.update((name, int(cells[0])) for name in re.findall(r'`([\w.]+)`', cells[1]))
    return floors


FLOORS = read_floors()
TOP_LEVEL = {'__init__', '__main__', 'api', 'cli', 'errors', 'progress'}  # the rest lives on a floor
SHARED_BY_RECIPES = {'slowllama.recipes', 'slowllama.recipes.options', 'slowllama.recipes.run_setup',
                     'slowllama.recipes.inference', 'slowllama.recipes.shapes',
                     'slowllama.recipes.bench_block',  # bench's per-block timing of a MoE shape (no command)
                     'slowllama.recipes.random_model'}  # bench --write-model's random prepared folder (no command)
OTHER_RECIPES = {'slowllama.bci.train', 'slowllama.bci.commands'}  # the BCI package's own recipes
ENTRY_POINTS = {'slowllama.cli', 'slowllama.__main__'}  # dispatch to recipes by name


def module_files():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == '__init__':
                    parts = parts[:-1]
                yield '.'.join(parts), path


def imports_of(module, path, known):
    """The package's modules that `module` imports anywhere in its file."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            names = [f'{base}.{alias.name}' for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition('.')[0]
            if name and not (module + '.').startswith(name + '.'):  # a package's own parents load first anyway
                found.add(name)
    return found


def import_graph():
    files = dict(module_files())
    return {module: imports_of(module, path, files) for module, path in files.items()}


def floor(module):
    parts = module.split('.')
    for n in range(len(parts), 0, -1):
        if '.'.join(parts[:n]) in FLOORS:
            return FLOORS['.'.join(parts[:n])]
    raise AssertionError(f'{module} has no floor in FLOORS')


def is_recipe(module):
    return (module.startswith('slowllama.recipes.') and module not in SHARED_BY_RECIPES) or module in OTHER_RECIPES


def test_the_floors_are_read_from_the_architecture_page():
    assert FLOORS['slowllama.model'] == 1 and FLOORS['slowllama.errors'] == 0 and FLOORS['slowllama.cli'] == 6
    assert FLOORS['slowllama.tokenizer'] == FLOORS['slowllama.weights'] < FLOORS['slowllama.engine']
    assert FLOORS['slowllama.generation'] == FLOORS['slowllama.engine'] < FLOORS['slowllama.training']
    assert FLOORS['slowllama.bci'] < FLOORS['slowllama.bci.train'] == FLOORS['slowllama.recipes']
    assert len(FLOORS) == 17


def test_the_graph_is_read():
    graph = import_graph()
    assert 'slowllama.engine.streamed' in graph['slowllama.api'] and 'slowllama.recipes.run_setup' in graph['slowllama.bci.train']
    assert sum(map(is_recipe, graph)) >= 8


def test_imports_never_point_to_a_higher_floor():
    graph = import_graph()
    up = [f'{module} (floor {floor(module)}) imports {target} (floor {floor(target)})'
          for module, imported in sorted(graph.items()) for target in sorted(imported) if floor(target) > floor(module)]
    assert not up, '\n'.join(up)


def test_every_floor_is_a_folder():
    on_top = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith('.py')}
    assert on_top <= TOP_LEVEL, f'modules beside the floors: {sorted(on_top - TOP_LEVEL)}'
    for module in import_graph():
        floor(module)  # each module has its floor
    for package in ('model', 'tokenizer', 'weights', 'engine', 'generation', 'training', 'data', 'recipes', 'bci'):
        assert os.path.exists(os.path.join(PACKAGE, package, '__init__.py'))


def test_a_wrong_arrow_is_caught():
    """The check itself: an import from the math floor up to the engine is reported."""
    graph = import_graph()
    graph['slowllama.model.block'] = graph['slowllama.model.block'] | {'slowllama.engine.streamed'}
    assert any(floor(target) > floor(module) for module, imported in graph.items() for target in imported)


def test_no_import_circles():
    graph = import_graph()
    state, circles = {}, []

    def visit(module, trail):
        state[module] = 'open'
        for child in sorted(graph[module]):
            if state.get(child) == 'open':
                circles.append(trail[trail.index(child):] + [child])
            elif child not in state:
                visit(child, trail + [child])
        state[module] = 'done'
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, ' ; '.join(' -> '.join(c) for c in circles)


def test_recipes_import_components_only():
    graph = import_graph()
    for module, imported in graph.items():
        recipes = sorted(m for m in imported if is_recipe(m))
        if module not in ENTRY_POINTS:
            assert not recipes, f'{module} imports the recipe(s) {recipes}'
        if not is_recipe(module) and module not in ENTRY_POINTS | SHARED_BY_RECIPES:
            shared = sorted(imported & SHARED_BY_RECIPES)
            assert not shared, f'the component {module} imports {shared}, which belong to the recipes'
