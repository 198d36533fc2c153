"""The deeper (20-layer) small model: train, distil and score predictors; plan quality."""
