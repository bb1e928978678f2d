"""The first T5Gemma family through ONNX: export, folder sizes and decode speed against Keras' `generate`.

    python benchmarks/t5gemma_onnx_decode.py                       # s-s config, 16 new tokens, 3 rounds
    python benchmarks/t5gemma_onnx_decode.py --precisions fp32,int8 --rounds 5

A random-weight `T5GemmaSeq2SeqLM` of a released config (float32, Keras'
initializers) is exported once per precision; then greedy generation of
`--new-tokens` tokens after a 64-token prompt runs at batch 1 and 8 for the
ONNX runtime at each precision and for the compiled Keras/JAX `generate`,
interleaved (A, B, C, A, B, C, ...) for `--rounds` rounds after one warm-up
call each; medians. No stop tokens, so every implementation does the same work;
tokens/s counts generated tokens over the whole call (encoder, cross
keys/values, decode). Timings are comparable only within one run.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
PROMPT_TOKENS = 64
GIB = 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "tests" / "data" / "t5gemma-s-s.json"))
    parser.add_argument("--precisions", default="fp32,int8,q4")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import numpy as np

    from keras_t5gemma.conversion.t5gemma_config import backbone_from_t5gemma_config
    from keras_t5gemma.export import export_onnx
    from keras_t5gemma.models.t5gemma.t5gemma_seq_2_seq_lm import T5GemmaSeq2SeqLM
    from t5gemma_onnx import OnnxSeq2SeqLM

    print(f"{Path(args.config).name}, float32, random weights; load average at start {os.getloadavg()}")
    config = json.loads(Path(args.config).read_text())
    seq_2_seq_lm = T5GemmaSeq2SeqLM(backbone_from_t5gemma_config(config, dtype="float32"))
    seq_2_seq_lm.compile(sampler="greedy")
    length = args.new_tokens + 1
    folder = Path(tempfile.mkdtemp(prefix="t5gemma_onnx_"))
    started = time.perf_counter()
    settings = export_onnx(seq_2_seq_lm, folder, max_decode_length=length, precision=args.precisions)
    print(f"export of {args.precisions}: {time.perf_counter() - started:.1f} s")
    for precision, entry in settings["precisions"].items():
        print(f"  {precision}: {entry['bytes'] / GIB:.2f} GiB")

    vocabulary = config["encoder"]["vocab_size"]
    rng = np.random.default_rng(0)
    runners = {}
    for batch in map(int, args.batches.split(",")):
        ids = rng.integers(3, min(vocabulary, 250_000), (batch, PROMPT_TOKENS)).astype("int32")
        ids[:, 0] = 2
        mask = np.ones_like(ids)
        decoder_ids = np.zeros((batch, length), "int32")
        decoder_ids[:, 0] = 2
        decoder_mask = np.zeros_like(decoder_ids)
        decoder_mask[:, 0] = 1
        inputs = {
            "encoder_token_ids": ids,
            "encoder_padding_mask": mask,
            "decoder_token_ids": decoder_ids,
            "decoder_padding_mask": decoder_mask,
        }

        def keras_run(inputs=inputs):
            return seq_2_seq_lm.generate(inputs, stop_token_ids=None)["decoder_token_ids"]

        runners[("keras (JAX)", batch)] = keras_run
        for precision in settings["precisions"]:
            runtime = OnnxSeq2SeqLM(folder, precision=precision)

            def onnx_run(runtime=runtime, ids=ids, mask=mask, start=decoder_ids[:, :1]):
                outputs = runtime.generate_token_ids(
                    ids, mask, decoder_token_ids=start, max_length=length, stop_token_ids=None
                )
                return outputs["decoder_token_ids"]

            runners[(f"onnx {precision}", batch)] = onnx_run
    outputs = {key: run() for key, run in runners.items()}  # warm-up (Keras compiles here)
    for (name, batch), tokens in outputs.items():
        if name == "onnx fp32":
            same = np.array_equal(tokens, outputs[("keras (JAX)", batch)])
            print(f"batch {batch}: ONNX fp32 greedy tokens equal Keras': {same}")
    seconds = {key: [] for key in runners}
    for _ in range(args.rounds):
        for key, run in runners.items():
            started = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - started)
    print(f"\ndecode tokens/s ({args.new_tokens} new tokens, medians of {args.rounds}); load {os.getloadavg()}")
    for (name, batch), times in seconds.items():
        print(f"  {name:<14} batch {batch}: {batch * args.new_tokens / statistics.median(times):8.2f}")


if __name__ == "__main__":
    main()
