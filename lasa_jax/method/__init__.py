"""The LASA algorithms as pure functions: arrays and records in, arrays and records out.

``silhouette`` (stage 1 maths), ``probe`` (the SSI), ``kto`` (losses), ``kto_data`` (items,
tokens, batches), ``trainer`` (the jitted sharded step), ``gate`` (the refusal prefix and SSI
gating), ``judges`` + ``refusals`` (labelling replies), ``report`` (aggregation and tables),
``figures`` (every plot). Nothing here reads a config or knows a workdir."""
