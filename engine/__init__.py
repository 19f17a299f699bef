"""The inference engine, room by room: core (the loop), worker (tensors and sampling), text,
models, checkpoints, calibration. The decode path never imports the offline tools."""
