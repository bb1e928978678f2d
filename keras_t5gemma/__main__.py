"""`python -m keras_t5gemma`: the `keras-t5gemma` command (see `keras_t5gemma.cli`)."""

import sys

from keras_t5gemma.cli import main

sys.exit(main())
