"""shufflemamba: Vision Mamba / ShuffleMamba models and their ImageNet training.

``import shufflemamba`` registers the models with timm, so
``timm.create_model("shufflemamba_base_patch16_224")`` works.
"""

from . import models
from .models import LayerwiseShuffle, VisionMamba

__version__ = "0.1.0"
__all__ = ["LayerwiseShuffle", "VisionMamba", "models", "__version__"]
