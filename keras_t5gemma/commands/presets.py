"""`keras-t5gemma presets`: the registered presets."""

from keras_t5gemma.commands.common import say


def add_parser(commands):
    commands.add_parser("presets", help="list the bundled and released presets").set_defaults(run=run_presets)


def run_presets(args):
    from keras_t5gemma.utils.preset_utils import is_bundled
    from keras_t5gemma.utils.preset_utils import registered_presets

    presets = registered_presets()
    for title, bundled in (("Bundled (no download):", True), ("Released (downloaded from the Hub):", False)):
        say(title)
        for name, preset in presets.items():
            if is_bundled(preset) == bundled:
                say(f"  {name:<24} {preset['description'].splitlines()[0]}")
    return 0


# `keras-t5gemma serve` (its FastAPI stack is the `serve` extra, imported when the command runs).
