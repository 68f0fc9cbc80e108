"""The package's layout (DESIGN.md): imports point down only. No module imports one that imports it
back, directly or through others (function-level imports included); no recipe imports another recipe;
no component imports a recipe."""
import ast
import os

import slowllama

PACKAGE = os.path.dirname(os.path.abspath(slowllama.__file__))
SHARED_BY_RECIPES = {'slowllama.recipes', 'slowllama.recipes.options', 'slowllama.recipes.run_setup',
                     'slowllama.recipes.inference'}
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


def is_recipe(module):
    return (module.startswith('slowllama.recipes.') and module not in SHARED_BY_RECIPES) or module in OTHER_RECIPES


def test_the_graph_is_read():
    graph = import_graph()
    assert 'slowllama.engine.streamed' in graph['slowllama.api'] and 'slowllama.recipes.run_setup' in graph['slowllama.bci.train']
    assert sum(map(is_recipe, graph)) >= 8


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
