"""Integrations with training frameworks: TRL's trainer (``integrations/trl/``, imported as
``epsdpo_kernels.trl``)."""
