"""T5Gemma 2: backbone, tasks, preprocessors, tokenizer, image converter, layout and presets."""
