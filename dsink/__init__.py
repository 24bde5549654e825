"""dsink: Dual-granularity Sinkhorn distillation (D-SINK) for long-tailed, label-noisy data.

The package holds all logic; ``stages/`` are thin DVC entry points over it.
"""

__version__ = "0.1.0"
