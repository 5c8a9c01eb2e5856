"""The model: config.json parsing (``config``), the Flax decoder (``transformer``, ``rope``),
safetensors I/O (``checkpoint``), ``LanguageModel`` (``lm``), last-token features
(``features``), KV-cache generation (``generate``) and tiny local checkpoints (``tiny``)."""
