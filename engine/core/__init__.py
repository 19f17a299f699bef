"""The serving loop: the async front, the engine core (schedule -> execute -> update), the
scheduler and KV block manager, requests, their outputs, the config tree and the one definition
of sparsity. Scheduler, block manager, sequences, sampling params, outputs and config never
import torch."""
