"""Building blocks of DiAD."""

from anomalib_diad.components.anomaly_map import FeatureDistanceAnomalyMap
from anomalib_diad.components.sampler import DDIMSampler
from anomalib_diad.components.sff import SpatialFeatureFusion
from anomalib_diad.components.sg_network import SemanticGuidedNetwork

__all__ = [
    "DDIMSampler",
    "FeatureDistanceAnomalyMap",
    "SemanticGuidedNetwork",
    "SpatialFeatureFusion",
]
