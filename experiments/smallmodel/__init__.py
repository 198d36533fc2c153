"""The small MoE test-bench model: corpus, training, recording, analysis."""
