"""Training: data loaders, fine-tuning (with distillation, under torchrun), evaluation."""
