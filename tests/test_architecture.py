"""Which module may import which (ARCHITECTURE.md), checked on the source.

Dependencies point one way: layers <- models <- conversion <- cli, with the
plumbing in `utils/` below the models. Imports inside functions count too.
"""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).parents[1] / "keras_t5gemma"
# Part of the package -> the parts it may import.
ALLOWED = {
    "layers": {"layers"},
    "utils": {"utils"},
    "models": {"layers", "models", "utils"},
    "conversion": {"conversion", "layers", "models", "utils"},
    "training": {"training", "conversion", "layers", "models", "utils", "data", "demo", "evaluation"},
    # Generates answers and scores them (sacrebleu, rouge-score); writes run histories and curves.
    "evaluation": {"models", "data", "utils"},
    # Reads data files (JSONL, CSV, text, images) and writes vectors through `utils.safe_files`: no model.
    "data": {"utils"},
    "demo": set(),
    # Reads a `T5Gemma2Seq2SeqLM`'s weights and config by attribute (needs no model class);
    # writes through `utils.safe_files`.
    "export": {"export", "utils"},
}
COMPAT_MODULE = PACKAGE / "utils" / "keras_hub_compat.py"


def _part(path):
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path):
    """`(line, module)` of every import in `path`, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module


def import_violations(path, allowed):
    """`file:line imports module` for each package import of `path` outside `allowed`."""
    found = []
    for line, module in _imports(path):
        names = module.split(".")
        if names[0] == "keras_t5gemma" and (len(names) == 1 or names[1] not in allowed):
            found.append(f"{path.parent.name}/{path.name}:{line} imports {module}")
    return found


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if _part(path) in ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_point_one_way(path):
    assert import_violations(path, ALLOWED[_part(path)]) == []


def test_the_check_catches_a_model_importing_conversion(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("import keras\n\n\ndef load():\n    from keras_t5gemma.conversion.preset_loader import X\n")
    assert import_violations(model, ALLOWED["models"]) == [
        f"{tmp_path.name}/model.py:5 imports keras_t5gemma.conversion.preset_loader"
    ]
    assert import_violations(model, ALLOWED["conversion"]) == []


def test_every_part_of_the_package_is_placed():
    parts = {_part(path) for path in PACKAGE.rglob("*.py")}
    # The command line and the server sit on top and may import anything.
    assert parts - set(ALLOWED) <= {"__init__", "__main__", "cli", "commands", "serving"}


def test_private_keras_hub_names_come_from_one_module():
    users = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in PACKAGE.rglob("*.py")
        if path != COMPAT_MODULE
        for line, module in _imports(path)
        if module.startswith("keras_hub.src")
    ]
    assert users == []


# Imported by the package but not declared by it, and why.
UNDECLARED = {
    "tensorflow": "installed by tensorflow-text, whose version it must match",
    "fastapi": "optional (the `serve` extra): only `keras_t5gemma.serving`",
    "uvicorn": "optional (the `serve` extra): only `keras_t5gemma.serving`",
    "pydantic": "optional (the `serve` extra): only `keras_t5gemma.serving`",
    "prometheus_client": "optional (the `serve` extra): only `keras_t5gemma.serving`",
    "torch": "optional: only `verify` after a conversion, skipped without it",
    "transformers": "optional: only `verify` after a conversion, skipped without it",
    "onnx": "optional (the `onnx` extra): only `export_onnx`",
    "sacrebleu": "optional (the `eval` extra): only `keras_t5gemma.evaluation`",
    "rouge_score": "optional (the `eval` extra): only `keras_t5gemma.evaluation`",
    "matplotlib": "optional (the `eval` extra): only `keras_t5gemma.evaluation`",
    "pyarrow": "optional (the `parquet` extra): only Parquet files in `keras_t5gemma.data`",
}
# This distribution's own top-level packages besides `keras_t5gemma`.
FIRST_PARTY = {"keras_t5gemma", "t5gemma_onnx"}
# Declared but not imported by the package, and why.
UNIMPORTED = {
    "jax": "the default Keras backend",
    "tensorflow-text": "KerasHub's SentencePiece tokenizer runs on it",
}


def _declared_dependencies():
    tomllib = pytest.importorskip("tomllib")
    with open(PACKAGE.parent / "pyproject.toml", "rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    return {re.split(r"[<>=!~\[ ;]", dependency)[0].lower().replace("_", "-") for dependency in dependencies}


def _imported_distributions():
    modules = {
        module.split(".")[0]
        for path in PACKAGE.rglob("*.py")
        for _, module in _imports(path)
        if module.split(".")[0] not in sys.stdlib_module_names | FIRST_PARTY
    }
    names = packages_distributions()
    return {module: names[module][0].lower().replace("_", "-") for module in modules}


def test_runtime_imports_are_declared_dependencies():
    declared = _declared_dependencies()
    undeclared = {
        module: distribution
        for module, distribution in _imported_distributions().items()
        if distribution not in declared and module not in UNDECLARED
    }
    assert undeclared == {}


def test_declared_dependencies_are_used():
    imported = set(_imported_distributions().values())
    unused = _declared_dependencies() - imported - {name.replace("_", "-") for name in UNIMPORTED}
    assert unused == set()


def _classes(path):
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.ClassDef)]


def _package_class_names():
    return {node.name for path in PACKAGE.rglob("*.py") for node in _classes(path)}


def _base_name(base):
    return base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)


def task_base_violations(path, package_classes):
    """`file: Class has N bases from this package` for a task class with more than two of them."""
    found = []
    for node in _classes(path):
        ours = [_base_name(base) for base in node.bases if _base_name(base) in package_classes]
        if len(ours) > 2:
            found.append(f"{path.name}: {node.name} has {len(ours)} bases from this package: {', '.join(ours)}")
    return found


def model_method_jumps(path):
    """`file:line` for each call `keras.Model.<method>(self, ...)` (past the method order)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if _base_name(owner) == "Model" and node.args and getattr(node.args[0], "id", None) == "self":
            found.append(f"{path.name}:{node.lineno} calls Model.{node.func.attr}(self, ...)")
    return found


MODEL_SOURCES = sorted(PACKAGE.joinpath("models").rglob("*.py"))


@pytest.mark.parametrize("path", MODEL_SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_classes_have_one_line_of_inheritance(path):
    assert task_base_violations(path, _package_class_names()) == []
    assert model_method_jumps(path) == []


def test_the_inheritance_checks_catch_mixins_and_jumps(tmp_path):
    task = tmp_path / "task.py"
    task.write_text(
        "import keras\n\n\nclass A:\n    pass\n\n\nclass B:\n    pass\n\n\nclass C:\n    pass\n\n\n"
        "class Task(A, B, C, keras.Model):\n    def fit(self, x):\n        return keras.Model.fit(self, x)\n"
    )
    assert task_base_violations(task, {"A", "B", "C", "Task"}) == [
        "task.py: Task has 3 bases from this package: A, B, C"
    ]
    assert model_method_jumps(task) == ["task.py:18 calls Model.fit(self, ...)"]


def _with_module_paths_before_the_family_folders(text):
    """A saved config as the version before `models/t5gemma2/` and `models/t5gemma/` wrote it."""
    return re.sub(r"keras_t5gemma\.models\.t5gemma2?\.(t5gemma2?_)", r"keras_t5gemma.models.\1", text)


def test_presets_and_keras_files_saved_before_the_move_still_load(tmp_path):
    import json
    import zipfile

    import keras

    from keras_t5gemma import T5Gemma2Backbone
    from keras_t5gemma import T5Gemma2Seq2SeqLM

    # The bundled preset was saved before the move: its config names the old module.
    bundled = PACKAGE / "presets" / "t5gemma2_tiny_digits" / "config.json"
    assert json.loads(bundled.read_text())["module"] == "keras_t5gemma.models.t5gemma2_backbone"
    backbone = T5Gemma2Backbone.from_preset("t5gemma2_tiny_digits")
    # A `.keras` file whose configs name the old modules.
    saved = tmp_path / "new.keras"
    T5Gemma2Seq2SeqLM(backbone).save(saved)
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                text = _with_module_paths_before_the_family_folders(data.decode())
                assert "keras_t5gemma.models.t5gemma2_seq_2_seq_lm" in text
                data = text.encode()
            target.writestr(item, data)
    reloaded = keras.saving.load_model(old)
    assert isinstance(reloaded, T5Gemma2Seq2SeqLM)
    assert len(reloaded.backbone.weights) == len(backbone.weights)
    for ours, theirs in zip(reloaded.backbone.weights, backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


def _with_fused_kernels_saved_apart(source, target, text_heads):
    """A Keras weights file as versions before the fused kernels saved it.

    The MLP's `gate_up_dense` as `gate_dense` and `up_dense` (Dense layers),
    the attention's `query_key_value_dense` as `query_dense`, `key_dense`
    and `value_dense` (`text_heads`: the text stacks' query and key/value head
    counts; the vision tower's are equal).
    """
    import shutil

    import h5py

    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as file:
        fused = []
        file.visit(
            lambda name: fused.append(name) if name.endswith(("/gate_up_dense", "/query_key_value_dense")) else None
        )
        for name in fused:
            parent = name.rsplit("/", 1)[0]
            variables = file[f"{name}/vars"]
            if name.endswith("/gate_up_dense"):
                # The kernel `(D, 2, I)` and an int8 scale `(1, 1, 2, I)`, as Dense layers held them.
                parts = [
                    (part, lambda value, i=i: value[:, i] if value.ndim == 3 else value.reshape(2, -1)[i])
                    for i, part in enumerate(("gate_dense", "up_dense"))
                ]
            else:
                heads = variables["0"].shape[1]
                query, key_value = text_heads if "vision" not in name else (heads // 3, heads // 3)
                spans = [(0, query), (query, query + key_value), (query + key_value, heads)]
                # The kernel `(D, N + 2K, H)`, a bias `(N + 2K, H)`, an int8 scale `(1, 1, N + 2K, H)`.
                parts = [
                    (part, lambda value, a=a, b=b: value[..., a:b, :])
                    for part, (a, b) in zip(("query_dense", "key_dense", "value_dense"), spans, strict=True)
                ]
            for part, take in parts:
                group = file.create_group(f"{parent}/{part}/vars")
                for key in variables:
                    group[key] = take(variables[key][()])
            del file[name]
    return fused


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_weights_saved_with_the_fused_projections_apart_load_into_the_fused_kernels(tmp_path, quantized):
    import keras

    from keras_t5gemma import T5Gemma2Backbone

    backbone = T5Gemma2Backbone.from_preset("t5gemma2_tiny_digits")
    if quantized:
        backbone.quantize("int8")
    backbone.save_weights(tmp_path / "new.weights.h5")
    attention = backbone.encoder.transformer_layers[0].attention
    text_heads = (attention.num_heads, attention.num_key_value_heads)
    fused = _with_fused_kernels_saved_apart(tmp_path / "new.weights.h5", tmp_path / "old.weights.h5", text_heads)
    # 2 encoder and 2 decoder layers (gate/up and query/key/value each), 1 vision layer (query/key/value).
    assert len(fused) == 9
    reloaded = T5Gemma2Backbone.from_config(backbone.get_config())
    if quantized:
        reloaded.quantize("int8")
    reloaded.load_weights(tmp_path / "old.weights.h5")
    for ours, theirs in zip(reloaded.weights, backbone.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))
