"""Quantization passes: dynamic and static int8 (two targets: com.onnxopt ops or onnxruntime QDQ), int8
embedding tables.

Importing the package registers the passes. The lowering targets and numerics are in common.py.
"""
from . import chain  # noqa: F401  (registers chain_qconv_u8)
from . import dynamic  # noqa: F401  (registers quantize_dynamic)
from . import embeddings  # noqa: F401  (registers quantize_embeddings)
from . import fp16  # noqa: F401  (registers convert_fp16)
from . import qdq  # noqa: F401  (registers import_qdq)
from . import residual  # noqa: F401  (registers fuse_qconv_residual)
from . import static  # noqa: F401  (registers quantize_static, quantize_auto)
