"""The notebooks of `examples/notebooks/` run top to bottom in a fresh kernel (nbclient); a cell that raises fails.

`quickstart.ipynb` loads the bundled preset, generates, fine-tunes with LoRA
and evaluation, evaluates, shows the curves and exports to `transformers`
and ONNX. `tpu_fine_tuning.ipynb` runs on 8 virtual CPU devices standing in
for a v5e-8's chips. Both are stored without outputs. The two run at the
same time, each in its own kernel (one compiles while the other computes).
About 3 minutes together on 2 CPU cores.
"""

import asyncio
import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).parents[1] / "examples" / "notebooks"
NAMES = ("quickstart.ipynb", "tpu_fine_tuning.ipynb")
# Compiling fast matters more in a run-through than the code XLA makes.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax", reason="the notebooks run on JAX")


def client(book, folder):
    """A client executing `book` in a new kernel whose working folder is `folder`."""
    return nbclient.NotebookClient(
        book, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )


def environment(xla_flags=FAST_COMPILE):
    return {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": xla_flags}


def run(book, folder, xla_flags=FAST_COMPILE):
    """Executes `book`; raises at the first failing cell."""
    client(book, folder).execute(env=environment(xla_flags))
    return book


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """`{name: the executed notebook, or what its first failing cell raised}`, both notebooks run at once."""
    flags = {
        "quickstart.ipynb": FAST_COMPILE,
        "tpu_fine_tuning.ipynb": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}",
    }

    async def run_both():
        runs = [
            client(
                nbformat.read(NOTEBOOKS / name, as_version=4), tmp_path_factory.mktemp(name.split(".")[0])
            ).async_execute(env=environment(flags[name]))
            for name in NAMES
        ]
        return await asyncio.gather(*runs, return_exceptions=True)

    return dict(zip(NAMES, asyncio.run(run_both())))


def executed_book(executed, name):
    if isinstance(executed[name], BaseException):
        raise executed[name]
    return executed[name]


def test_the_notebooks_are_stored_without_outputs():
    for name in NAMES:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} holds outputs"


def test_a_failing_cell_fails_the_run(tmp_path):
    book = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('cell two broke')")]
    )
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="cell two broke"):
        run(book, tmp_path)


def test_quickstart_runs(executed):
    book = executed_book(executed, "quickstart.ipynb")
    text = "".join(output.get("text", "") for cell in book.cells for output in cell.get("outputs", []))
    assert "after fine-tuning" in text and "exact" in text
    # The install cell did nothing here: the package is installed.
    assert not book.cells[1].outputs
    images = [
        output for cell in book.cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})
    ]
    assert images, "the curves were not shown"


def test_tpu_notebook_runs_on_8_virtual_devices(executed):
    book = executed_book(executed, "tpu_fine_tuning.ipynb")
    text = "".join(output.get("text", "") for cell in book.cells for output in cell.get("outputs", []))
    assert "8 devices" in text and "bytes of weights per device" in text
