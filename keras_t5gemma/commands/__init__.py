"""The subcommands of `keras-t5gemma`, one module each: `add_parser(commands)` adds the subcommand and sets
its `run(args)`, which calls the library and returns the exit status. `SUBCOMMANDS` is the order `--help`
lists them in."""

from keras_t5gemma.commands import classify
from keras_t5gemma.commands import convert
from keras_t5gemma.commands import demo
from keras_t5gemma.commands import embed
from keras_t5gemma.commands import evaluate
from keras_t5gemma.commands import export
from keras_t5gemma.commands import fine_tune
from keras_t5gemma.commands import generate
from keras_t5gemma.commands import presets
from keras_t5gemma.commands import serve

SUBCOMMANDS = (
    demo.add_parser,
    generate.add_parser,
    fine_tune.add_parser,
    evaluate.add_parser,
    embed.add_parser,
    classify.add_parser,
    convert.add_parser,
    export.add_parser,
    presets.add_parser,
    serve.add_parser,
)
