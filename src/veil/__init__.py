"""veil: obfuscated training and inference with stochastic conditional noise layers.

The library in a few calls::

    from veil.defenses import create_defense
    from veil.training import TrainConfig, fit
"""

__version__ = "0.1.0"
