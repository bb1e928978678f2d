"""T5Gemma (the first generation, text only): backbone, tasks, preprocessors, tokenizer and presets."""
