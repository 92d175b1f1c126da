"""The fan-out simulator (``simulate``), its fit to the published runs (``calibrate``) and ``cai plan`` (``planner``, with the worker profile)."""
