"""Running the model on the device: the model runner (batch-shaped static buffers), CUDA graphs and their capture
worker, the KV-cache tensors, the serving stream, direct CUDA driver calls and the token reader."""
