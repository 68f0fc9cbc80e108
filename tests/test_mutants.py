"""scripts/mutants.py's table still applies to the code: every fragment is found exactly once in its
file and every test it names exists, so a refactor makes the table fail here instead of going stale.
(The mutants themselves run with `python scripts/mutants.py`, not in the suite.)"""
import ast
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
    spec = importlib.util.spec_from_file_location('mutants', os.path.join(ROOT, 'scripts', 'mutants.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MUTANTS = load_script().MUTANTS


def test_every_fragment_is_found_exactly_once():
    assert load_script().check(MUTANTS) == []


def test_the_check_sees_a_stale_fragment():
    script = load_script()
    stale = script.Mutant('stale', 'slowllama/model/block.py', 'no such code', 'x', 'tests/test_model.py')
    twice = script.Mutant('twice', 'slowllama/model/block.py', 'import torch', 'x', 'tests/test_model.py')
    assert [p.split(':')[0] for p in script.check([stale, twice])] == ['stale', 'twice']


def functions_of(path, cache={}):
    if path not in cache:
        with open(os.path.join(ROOT, path), encoding='utf-8') as f:
            tree = ast.parse(f.read())
        cache[path] = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    return cache[path]


@pytest.mark.parametrize('mutant', MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_named_tests_exist(mutant):
    assert mutant.tests.split(), mutant.name
    for test in mutant.tests.split():
        path, _, name = test.partition('::')
        assert os.path.isfile(os.path.join(ROOT, path)), f'{mutant.name}: no file {path}'
        if name:
            assert name.split('[')[0] in functions_of(path), f'{mutant.name}: no test {test}'
