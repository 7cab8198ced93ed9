"""The user jobs, one module each, every one returning a :class:`tensorlotr.report.Result`.

``convert`` (PEFT LoRA -> LoTR), ``export`` (LoTR -> PEFT LoRA), ``inspect``, ``decompose``
(fine-tuned minus base -> LoTR), ``zoo`` (many LoRAs in one basis), ``logs`` (TensorBoard ->
parquet), ``demo``; ``driver`` is the plan-to-adapter loop that convert and decompose share,
``calibration`` the output-aware settings they take. Nothing is imported here, so a job loads
only what it needs (the file jobs never load the torch bindings).
"""
