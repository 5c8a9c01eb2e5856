"""One module per LASA stage, each with ``run(ctx)``: it reads what earlier stages left in the
workdir and writes its own folder (``bottleneck/``, ``ssi/``, ``align/``, ``baseline/``,
``evaluate/``). ``lasa_jax.runner`` runs them in order."""
