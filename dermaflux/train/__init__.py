"""Fine-tuning the Flux transformer: rectified-flow objective (pure torch) and the Ray Train + DeepSpeed driver."""
