"""memplan: GPU memory planner and simulator for training and fine-tuning LLMs."""

__version__ = "0.1.0"
