"""moespeq: run Mixture-of-Experts language models that do not fit in GPU memory."""

__version__ = "0.1.0"
