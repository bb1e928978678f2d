"""Training at scale: device meshes, sharded checkpoints, fine-tuning runs, memory estimates."""
