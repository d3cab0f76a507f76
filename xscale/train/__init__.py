"""Training: LightningModules, DataModules, staged and joint pipelines, callbacks."""
