"""tl-privacy: find and switch off the MLP neurons that hold memorized personal data."""

from tl_privacy.hooks import UnsupportedModelError, attached, check_model, mlp_post_name
from tl_privacy.localization import LocalizationConfig, localize
from tl_privacy.masks import HardConcreteMask
from tl_privacy.neurons import IncompatibleNeuronsError, PrivacyNeurons

__version__ = "0.1.0"

__all__ = [
    "HardConcreteMask",
    "IncompatibleNeuronsError",
    "LocalizationConfig",
    "PrivacyNeurons",
    "UnsupportedModelError",
    "attached",
    "check_model",
    "localize",
    "mlp_post_name",
]
