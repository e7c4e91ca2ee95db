"""neobench: a benchmark suite for parameter-efficient knowledge distillation (LLM-Neo and baselines)."""

__version__ = "0.1.0"
