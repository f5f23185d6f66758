"""The methods' math in plain torch: no Trainer, no Hydra. Each method adds one module here."""
