"""raydiff: class-conditional diffusion on long-tailed data with CCUA, distributed on Ray.

The core (config, networks, noise process, samplers, losses, engine) runs without Ray;
only the modules of the Ray layer (train, tune, sample, evaluate) import ``ray``.
"""

__version__ = "0.1.0"
