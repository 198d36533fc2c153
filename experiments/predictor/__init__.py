"""Predictor studies: cost on the GPU, kernel profile, distillation on more tokens, plan quality."""
