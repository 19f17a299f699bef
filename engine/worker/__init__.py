"""The worker: the model runner (the only place request state becomes tensors), the sampler, and
the huge-page arenas the CPU path keeps weights and the KV cache in."""
