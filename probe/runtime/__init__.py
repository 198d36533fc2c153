"""MoE runtime: checkpoint-loading model (`model`, `checkpoint`, `families`) and routing recorder
(`record`)."""
