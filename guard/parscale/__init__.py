"""ParScale (parallel scaling): P learned transformations of the input through one model, served
batched and KV-cached."""
