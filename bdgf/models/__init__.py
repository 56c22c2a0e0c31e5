"""Stage-2 classifier: three feature-guided branches (CNN, Mamba, Transformer) and their wrapper."""
from bdgf.models.classifier import BRANCHES, BDGFClassifier, ClassifierConfig
from bdgf.models.cnn import CNNBranch, CNNConfig
from bdgf.models.mamba import BiMambaLayer, MambaBlock, MambaBranch, MambaConfig, MambaMixer, centre_out_order
from bdgf.models.transformer import TransformerBranch, TransformerConfig

__all__ = [
    "BRANCHES",
    "BDGFClassifier",
    "ClassifierConfig",
    "CNNBranch",
    "CNNConfig",
    "BiMambaLayer",
    "MambaBlock",
    "MambaBranch",
    "MambaConfig",
    "MambaMixer",
    "centre_out_order",
    "TransformerBranch",
    "TransformerConfig",
]
