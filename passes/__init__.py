"""Relax passes of mlc-quant, one per file (installed as ``mlc_quant.passes``)."""
from .annotate_linear import AnnotateLinear
from .collect_stats import CollectStats
from ._linear import LinearSite, find_linears, module_linears, LINEARS_ATTR, STATS_ATTR

__all__ = ["AnnotateLinear", "CollectStats", "LinearSite", "find_linears", "module_linears",
           "LINEARS_ATTR", "STATS_ATTR"]
from .smooth_linear import SmoothLinear, SmoothGroup, find_smoothing_groups
from .quantize_linear import QuantizeLinear

__all__ += ["SmoothLinear", "SmoothGroup", "find_smoothing_groups", "QuantizeLinear"]
from .merge_sibling_linears import MergeSiblingLinears, merge_params, merged_linears

__all__ += ["MergeSiblingLinears", "merge_params", "merged_linears"]
from .fold_split_concat import FoldSplitConcat
from .offload_norm_act import OffloadNormAct
from .fuse_act_quantize import FuseActQuantize
from .fuse_silu_gemm import FuseSiluGemm

__all__ += ["FoldSplitConcat", "OffloadNormAct", "FuseActQuantize", "FuseSiluGemm"]
