"""The examples in the package's docstrings run: `>>>` ones as doctests, fenced ```python ones as code.

Fenced examples run in their module's namespace, with `keras`, `np` and the
package's public names; the two layout-map examples need 8 devices and run in
a child process with 8 virtual CPU devices.
"""

import ast
import doctest
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_t5gemma

PACKAGE = Path(keras_t5gemma.__file__).parent
MODULES = sorted(
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    for path in PACKAGE.rglob("*.py")
    if path.name not in ("__init__.py", "__main__.py")
)
EIGHT_DEVICES = {
    "keras_t5gemma.models.encoder_decoder_backbone.EncoderDecoderBackbone.get_layout_map",
    "keras_t5gemma.models.layout.layout_map",
}
# Examples that read a file no test can make offline, and the test that covers what they show.
NEEDS_FILES = {
    "keras_t5gemma.conversion.vocabulary.proto_from_tokenizer_json": "tests/test_tokenizer.py",
}


def _fenced_examples():
    """`(qualified name, code)` of every fenced ```python block in the package's docstrings."""
    examples = []
    for module in MODULES:
        tree = ast.parse((PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text())

        def visit(node, prefix):
            docstring = ast.get_docstring(node) if not isinstance(node, ast.Module) else ast.get_docstring(tree)
            for code in re.findall(r"```python\n(.*?)```", docstring or "", re.S):
                examples.append((prefix, code))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef)):
                    visit(child, f"{prefix}.{child.name}")

        visit(tree, module)
    return examples


EXAMPLES = _fenced_examples()


def _namespace(module):
    namespace = dict(vars(importlib.import_module(module)))
    namespace.update({name: getattr(keras_t5gemma, name) for name in keras_t5gemma.__all__})
    namespace.update(keras=keras, np=np, json=json)
    return namespace


@pytest.mark.parametrize("module", MODULES)
def test_doctests_pass(module):
    results = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert results.failed == 0


# Examples that take minutes on CI's 2 cores: run with `-m slow`, like the test that covers them in CI's stead.
SLOW = {
    "keras_t5gemma.models.task.T5Gemma2Task.gptq_quantize": "tests/test_int4.py",  # about 200 s: GPTQ, layer by layer
}


@pytest.mark.parametrize(
    "name, code",
    [
        pytest.param(name, code, marks=[pytest.mark.slow] if name in SLOW else [])
        for name, code in EXAMPLES
        if name not in EIGHT_DEVICES | set(NEEDS_FILES)
    ],
    ids=lambda value: value if "\n" not in value else "",
)
def test_fenced_example_runs(name, code):
    module = name
    while module not in MODULES:
        module = module.rsplit(".", 1)[0]
    exec(compile(code, name, "exec"), _namespace(module))


def test_every_example_is_run_or_accounted_for():
    names = {name for name, _ in EXAMPLES}
    assert EIGHT_DEVICES | set(NEEDS_FILES) | set(SLOW) <= names
    assert all((PACKAGE.parent / test).exists() for test in SLOW.values())
    for name, code in EXAMPLES:
        if name in NEEDS_FILES:
            assert "open(" in code and (PACKAGE.parent / NEEDS_FILES[name]).exists()


def test_layout_map_examples_run_on_eight_devices():
    blocks = [code for name, code in EXAMPLES if name in EIGHT_DEVICES]
    assert len(blocks) == len(EIGHT_DEVICES)
    # Each example in a namespace of its own, as in the other tests.
    script = "\n".join(
        [
            "import keras, numpy as np, keras_t5gemma",
            "from keras_t5gemma.models.layout import layout_map",
            "names = {name: getattr(keras_t5gemma, name) for name in keras_t5gemma.__all__}",
            f"for code in {blocks!r}:",
            "    exec(code, {'keras': keras, 'np': np, 'layout_map': layout_map, **names})",
        ]
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
