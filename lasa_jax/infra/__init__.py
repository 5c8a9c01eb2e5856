"""Infrastructure: device mesh and logical-axis rules (``mesh``), multi-host start-up and host
gathers (``multihost``), the memory fit check (``fitcheck``), crash-safe file I/O (``fileio``)
and Orbax train-state checkpoints (``checkpoints``). Nothing here knows LASA or the model."""
