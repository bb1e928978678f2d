"""ONNX precisions (`export_onnx(..., precision=...)`): fp32, fp16, int8, q4 and q4f16 in one folder.

One export of the bundled demo preset holds all five graph sets. Each is
checked against float32: greedy answers on the demo's held-out prompts (text
and image), logits against Keras' float32 within a stated tolerance, and
what its graphs are made of (4-bit `MatMulNBits`, float32 kept in the float16
graphs where it must be).
"""

import json
import shutil

import keras
import numpy as np
import onnx
import pytest
from conftest import assert_matches_reference
from test_onnx_export import _decoder_logits
from test_onnx_export import _held_out

from keras_t5gemma.cli import main
from keras_t5gemma.export import export_onnx
from keras_t5gemma.export import onnx_graph
from keras_t5gemma.export.onnx import precision_files
from keras_t5gemma.models.t5gemma2.t5gemma2_seq_2_seq_lm import T5Gemma2Seq2SeqLM
from t5gemma_onnx import OnnxSeq2SeqLM
from t5gemma_onnx import available_precisions

DEMO = "t5gemma2_tiny_digits"
MAX_LENGTH = 16
PRECISIONS = ("fp32", "fp16", "int8", "q4", "q4f16")
# Held-out prompts for the greedy agreement (about a third with an image).
AGREEMENT_EXAMPLES = 300
# Greedy answers equal to float32's, at least (measured: 1.0 for every precision on 600 held-out prompts).
AGREEMENT = {"fp32": 1.0, "fp16": 1.0, "int8": 1.0, "q4": 0.97, "q4f16": 0.97}
# Largest logit difference from Keras float32, as a fraction of the largest logit (measured on the demo
# preset: fp32 4e-7, fp16 3.1e-4, int8 1.0e-2, q4 5.1e-2, q4f16 5.0e-2).
LOGIT_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "int8": 3e-2, "q4": 0.1, "q4f16": 0.1}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model and one export folder holding every precision."""
    seq_2_seq_lm = T5Gemma2Seq2SeqLM.from_preset(DEMO)
    seq_2_seq_lm.compile(sampler="greedy")
    folder = tmp_path_factory.mktemp("precisions")
    settings = export_onnx(seq_2_seq_lm, folder, max_decode_length=MAX_LENGTH, precision=",".join(PRECISIONS))
    runtimes = {precision: OnnxSeq2SeqLM(folder, precision=precision) for precision in PRECISIONS}
    return seq_2_seq_lm, folder, settings, runtimes


def _answers(runtime, examples):
    text = [example for example in examples if example.image is None]
    image = [example for example in examples if example.image is not None]
    return runtime.generate([e.prompt for e in text], max_length=MAX_LENGTH) + runtime.generate(
        [e.prompt for e in image], [e.image for e in image], max_length=MAX_LENGTH
    )


def test_greedy_answers_of_each_precision_agree_with_float32_on_held_out_prompts(demo):
    _, _, _, runtimes = demo
    examples = _held_out(AGREEMENT_EXAMPLES, seed=2)
    examples = [e for e in examples if e.image is None] + [e for e in examples if e.image is not None]
    assert 0.2 < np.mean([example.image is not None for example in examples]) < 0.8
    float32 = _answers(runtimes["fp32"], examples)
    assert np.mean([a.strip() == e.target for a, e in zip(float32, examples)]) > 0.9  # a model that answers
    for precision in PRECISIONS[1:]:
        answers = _answers(runtimes[precision], examples)
        agreement = np.mean([a == b for a, b in zip(float32, answers)])
        print(f"{precision} greedy agreement with fp32: {agreement:.4f} on {len(examples)} held-out prompts")
        assert agreement >= AGREEMENT[precision], (precision, agreement)


def test_logits_of_each_precision_are_within_their_tolerance_of_keras_float32(demo):
    seq_2_seq_lm, _, _, runtimes = demo
    examples = _held_out(12, seed=3)
    prompts = [example.prompt for example in examples]
    images = [[] if example.image is None else [example.image] for example in examples]
    encoder_ids, encoder_mask, pixels = runtimes["fp32"].encoder_inputs(prompts, images)
    decoder_ids = runtimes["fp32"].generate_token_ids(
        encoder_ids, encoder_mask, pixels, max_length=MAX_LENGTH, stop_token_ids=None
    )["decoder_token_ids"]
    inputs = {
        "encoder_token_ids": encoder_ids.astype("int32"),
        "encoder_padding_mask": encoder_mask.astype("int32"),
        "decoder_token_ids": decoder_ids.astype("int32"),
        "decoder_padding_mask": np.ones(decoder_ids.shape, "int32"),
        "images": pixels,
    }
    expected = keras.ops.convert_to_numpy(seq_2_seq_lm.predict_on_batch(inputs))
    scale = np.abs(expected).max()
    errors = {}
    for precision, runtime in runtimes.items():
        # One prefill chunk (`test_onnx_export` checks steps against chunks; generation here runs steps).
        _, logits = _decoder_logits(runtime, encoder_ids, encoder_mask, pixels, decoder_ids, False)
        assert logits.dtype == np.float32
        tolerance = LOGIT_TOLERANCE[precision]
        errors[precision] = assert_matches_reference(logits, expected, atol=tolerance * scale, rtol_to_scale=tolerance)
    print({precision: f"{error / scale:.2g}" for precision, error in errors.items()})
    # The precisions are what they say: each coarser one is further from float32.
    assert errors["fp32"] < errors["fp16"] < errors["int8"] < errors["q4"]


def _graph(folder, name):
    return onnx.load(str(folder / name), load_external_data=False)


def _ops(model, op_type):
    return [node for node in model.graph.node if node.op_type == op_type]


def _attribute(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_q4_graphs_run_4_bit_matmuls_and_are_smaller_than_int8(demo):
    _, folder, settings, _ = demo
    backbone = demo[0].backbone
    for precision in ("q4", "q4f16"):
        decoder = _graph(folder, precision_files(precision)["decoder"])
        nbits = _ops(decoder, "MatMulNBits")
        # 7 matmuls per decoder layer (query, key, value, output, gate, up, down) and the tied logits.
        assert len(nbits) == 7 * backbone.decoder_num_layers + 1
        assert {(_attribute(n, "bits"), _attribute(n, "block_size")) for n in nbits} == {(4, 32)}
        assert not _ops(decoder, "MatMul") or all(
            init.name not in {i for n in _ops(decoder, "MatMul") for i in n.input} for init in decoder.graph.initializer
        )
        gathers = _ops(decoder, "GatherBlockQuantized")
        assert len(gathers) == 1 and _attribute(gathers[0], "bits") == 4
        # The table is stored once, (V, D / 2): the lookup and the logits (through a reshape) read the same codes.
        logits_node = next(n for n in nbits if _attribute(n, "N") == backbone.vocabulary_size)
        reshape = next(n for n in decoder.graph.node if n.output[0] == logits_node.input[1])
        assert reshape.op_type == "Reshape" and reshape.input[0] == gathers[0].input[0]
        table = next(i for i in decoder.graph.initializer if i.name == gathers[0].input[0])
        assert list(table.dims) == [backbone.vocabulary_size, backbone.hidden_dim // 2]
        assert settings["precisions"][precision]["block_size"] == 32
    # The tiny model's graphs weigh as much as its weights; the weights files show the storage.
    sizes = {precision: (folder / precision_files(precision)["weights"]).stat().st_size for precision in PRECISIONS}
    print({precision: f"{size / 2**10:.0f} KiB" for precision, size in sizes.items()})
    assert sizes["q4"] < 0.7 * sizes["int8"] and sizes["int8"] < 0.3 * sizes["fp32"]
    assert sizes["q4f16"] < sizes["q4"] and sizes["fp16"] < 0.55 * sizes["fp32"]
    totals = {precision: entry["bytes"] for precision, entry in settings["precisions"].items()}
    assert totals["q4"] < totals["int8"] < totals["fp16"] < totals["fp32"]


def test_4_bit_codes_stand_for_the_weights_within_half_a_step():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(24, 70)).astype("float32") * np.exp(rng.normal(size=(24, 1)))
    matrix[3, :32] = 0.0  # an all-zero block
    packed, scales = onnx_graph.quantize_q4_rows(matrix)
    assert packed.shape == (24, 3, 16) and scales.shape == (24, 3)  # 70 padded to 3 blocks of 32
    restored = onnx_graph.dequantize_q4_rows(packed, scales, 70)
    step = np.repeat(np.abs(scales), 32, axis=1)[:, :70]
    error = np.abs(restored - matrix)
    # Half a step, but for weights of the extreme's other sign beyond code 7 (clipped): at most one step.
    clipped = matrix / np.repeat(scales, 32, axis=1)[:, :70] > 7.5
    assert np.all(error[~clipped] <= step[~clipped] / 2 + 1e-6) and np.all(error <= step + 1e-6)
    # Each block's largest-magnitude weight is exact (the code -8).
    blocks = np.pad(matrix, ((0, 0), (0, 26))).reshape(24, 3, 32)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    restored_blocks = np.pad(restored, ((0, 0), (0, 26))).reshape(24, 3, 32)
    np.testing.assert_allclose(
        np.take_along_axis(restored_blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0], largest, rtol=1e-6
    )


def test_float16_graphs_keep_norms_softmax_and_logits_in_float32(demo):
    _, folder, _, _ = demo
    for precision in ("fp16", "q4f16"):
        for graph in ("encoder", "decoder"):
            model = _graph(folder, precision_files(precision)[graph])
            # onnx's inference does not know onnxruntime's ops; the fp16 graphs have none.
            if precision == "fp16":
                model = onnx.shape_inference.infer_shapes(model)
                types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
                types.update({i.name: i.data_type for i in model.graph.initializer})
                types.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
                for op_type in ("Softmax", "ReduceMean", "LayerNormalization", "Tanh"):
                    for node in _ops(model, op_type):
                        # Tanh: the soft caps (float32) and GELU (float16).
                        wanted = {onnx.TensorProto.FLOAT}
                        if op_type == "Tanh":
                            wanted.add(onnx.TensorProto.FLOAT16)
                        assert types[node.input[0]] in wanted, (graph, op_type, node.name)
                assert any(types[n.input[0]] == onnx.TensorProto.FLOAT for n in _ops(model, "Softmax"))
                matmul_weights = [types[name] for node in _ops(model, "MatMul") for name in node.input if name in types]
                assert onnx.TensorProto.FLOAT not in [
                    i.data_type
                    for i in model.graph.initializer
                    if i.name in {n.input[1] for n in _ops(model, "MatMul")}
                ]
                assert onnx.TensorProto.FLOAT16 in matmul_weights
            outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
            assert outputs.get("logits", onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
            assert outputs.get("encoder_output", onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
            cache = "present_key_0" if graph == "decoder" else "cross_key_0"
            assert outputs[cache] == onnx.TensorProto.FLOAT16


def test_precisions_share_one_tokenizer_and_settings_and_the_runtime_picks_one(demo, tmp_path):
    _, folder, settings, runtimes = demo
    names = sorted(path.name for path in folder.iterdir())
    graph_files = [file for precision in PRECISIONS for file in precision_files(precision).values()]
    assert len(set(graph_files)) == len(graph_files) == 4 * len(PRECISIONS)
    assert names == sorted(graph_files + ["t5gemma2_onnx.json", "tokenizer.spm"])
    assert available_precisions(folder) == list(PRECISIONS)
    assert {runtime.tokenizer.serialized_model_proto() for runtime in runtimes.values()} == {
        (folder / "tokenizer.spm").read_bytes()
    }
    assert OnnxSeq2SeqLM(folder).precision == settings["default_precision"] == "fp32"
    # A folder without fp32 defaults to the first precision exported.
    only = tmp_path / "q4_and_int8"
    export_onnx(demo[0], only, max_decode_length=MAX_LENGTH, precision=["q4", "int8"])
    assert OnnxSeq2SeqLM(only).precision == "q4"
    assert not (only / "encoder.onnx").exists() and (only / "encoder_q4.onnx").exists()
    with pytest.raises(ValueError, match="no 'fp16' graphs; it holds q4, int8"):
        OnnxSeq2SeqLM(only, precision="fp16")
    with pytest.raises(ValueError, match="Unknown precision"):
        export_onnx(demo[0], tmp_path / "bad", precision="q3")
    with pytest.raises(ValueError, match="not both"):
        export_onnx(demo[0], tmp_path / "bad", precision="q4", quantize="int8")
    # A single-precision folder of the earlier layout (format version 1) still loads, as its one precision.
    earlier = tmp_path / "version_1"
    shutil.copytree(only, earlier)
    for name in precision_files("int8").values():
        (earlier / name.replace("_int8", "")).write_bytes((earlier / name).read_bytes())
    version_1 = {key: value for key, value in settings.items() if key not in ("precisions", "default_precision")}
    version_1 |= {
        "format_version": 1,
        "quantization": "int8",
        "files": {**settings["files"], **precision_files("fp32")},
    }
    (earlier / "t5gemma2_onnx.json").write_text(json.dumps(version_1))
    prompts = [example.prompt for example in _held_out(8) if example.image is None]
    runtime = OnnxSeq2SeqLM(earlier)
    assert runtime.precision == "int8" and available_precisions(earlier) == ["int8"]
    assert runtime.generate(prompts, max_length=MAX_LENGTH) == runtimes["int8"].generate(prompts, max_length=MAX_LENGTH)


def test_command_line_exports_several_precisions_and_generates_with_one(capsys, tmp_path):
    output = tmp_path / "onnx"
    assert main(["export", "--preset", DEMO, str(output), "--format", "onnx", "--precision", "q4,fp16"]) == 0
    assert "q4 " in capsys.readouterr().out
    assert available_precisions(output) == ["q4", "fp16"]
    prompt = "reverse: 1 2 3"
    expected = OnnxSeq2SeqLM(output, precision="fp16").generate(prompt)
    assert main(["generate", "--onnx", str(output), "--precision", "fp16", prompt]) == 0
    assert capsys.readouterr().out.strip() == expected.strip() == "3 2 1"
    assert main(["generate", "--onnx", str(output), "--precision", "int8", prompt]) == 2
    assert "no 'int8' graphs" in capsys.readouterr().err
    assert main(["generate", "--precision", "q4", prompt]) == 2
    assert main(["export", "--preset", DEMO, str(tmp_path / "x"), "--format", "onnx", "--precision", "q4,int3"]) == 2
    assert "Unknown precision ['int3']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_server_runs_the_precision_it_is_given(demo, monkeypatch):
    pytest.importorskip("fastapi")
    from keras_t5gemma.cli import build_parser
    from keras_t5gemma.commands.serve import settings_from_args
    from keras_t5gemma.serving import registry
    from keras_t5gemma.serving.engines import OnnxEngine

    _, folder, _, runtimes = demo
    args = build_parser().parse_args(["serve", "--onnx", f"digits={folder}", "--onnx-precision", "q4f16"])
    settings = settings_from_args(args)
    opened = []

    def engine(source, **options):
        opened.append(options)
        raise RuntimeError("opened")

    monkeypatch.setattr(registry, "OnnxEngine", engine)
    with pytest.raises(RuntimeError, match="opened"):
        registry.ModelRegistry(settings.models, settings, None)._load(settings.models[0])
    assert opened[0]["precision"] == "q4f16"
    served = OnnxEngine(folder, **opened[0])
    assert served.model.precision == "q4f16" and served.model._files["decoder"] == "decoder_q4f16.onnx"
    prompts = [example.prompt for example in _held_out(4) if example.image is None]
    assert served.model.generate(prompts) == runtimes["q4f16"].generate(prompts)


def test_q4_graphs_compute_the_float32_model_over_4_bit_rounded_weights(demo, tmp_path, monkeypatch):
    """q4 is float32 over the weights its codes stand for: no error besides the rounding itself.

    With `accuracy_level=0` (float32 activations inside `MatMulNBits`), the q4
    graphs' logits equal those of fp32 graphs written over every matmul
    kernel and the table replaced by `dequantize_q4_rows(quantize_q4_rows(.))`.
    """
    seq_2_seq_lm, _, _, runtimes = demo
    monkeypatch.setattr(onnx_graph, "Q4_ACCURACY_LEVEL", 0)
    export_onnx(seq_2_seq_lm, tmp_path / "q4", max_decode_length=MAX_LENGTH, precision="q4")
    linear, embedding_table = onnx_graph.linear, onnx_graph.embedding_table

    def rounded(matrix):  # (N, K) rows, as quantized
        matrix = np.asarray(matrix, "float32")
        return onnx_graph.dequantize_q4_rows(*onnx_graph.quantize_q4_rows(matrix), matrix.shape[1])

    monkeypatch.setattr(onnx_graph, "linear", lambda g, x, kernel, *args: linear(g, x, rounded(kernel.T).T, *args))
    monkeypatch.setattr(onnx_graph, "embedding_table", lambda g, table, name: embedding_table(g, rounded(table), name))
    export_onnx(seq_2_seq_lm, tmp_path / "rounded", max_decode_length=MAX_LENGTH, precision="fp32")
    examples = _held_out(8, seed=4)
    prompts = [example.prompt for example in examples]
    images = [[] if example.image is None else [example.image] for example in examples]
    encoder_ids, encoder_mask, pixels = runtimes["fp32"].encoder_inputs(prompts, images)
    decoder_ids = np.tile(np.arange(2, 2 + MAX_LENGTH), (len(prompts), 1)).astype("int64")
    _, q4 = _decoder_logits(OnnxSeq2SeqLM(tmp_path / "q4"), encoder_ids, encoder_mask, pixels, decoder_ids, False)
    _, expected = _decoder_logits(
        OnnxSeq2SeqLM(tmp_path / "rounded"), encoder_ids, encoder_mask, pixels, decoder_ids, False
    )
    scale = np.abs(expected).max()
    assert_matches_reference(q4, expected, atol=1e-5 * scale, rtol_to_scale=1e-5)
    # ... and the rounding is what separates them from float32.
    _, float32 = _decoder_logits(runtimes["fp32"], encoder_ids, encoder_mask, pixels, decoder_ids, False)
    assert np.abs(float32 - expected).max() > 1e-3 * scale
