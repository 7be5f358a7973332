"""Weight (int8, int4, GGUF Q4/Q8 served natively) and KV-cache quantization, applied as transforms."""

from roofline.quant.kv import KV_CACHE_DTYPES, kv_slot_size, pack_kv, unpack_kv
from roofline.quant.transform import (INT4_GROUP_SIZES, QUANTIZATION_METHODS, LinearScheme, QuantPlan,
                                      finalize_quantized, plan_quantization, quantize_model, route_tensors,
                                      weight_bytes)

__all__ = ["INT4_GROUP_SIZES", "KV_CACHE_DTYPES", "QUANTIZATION_METHODS", "LinearScheme", "QuantPlan",
           "finalize_quantized", "kv_slot_size", "pack_kv", "plan_quantization", "quantize_model",
           "route_tensors", "unpack_kv", "weight_bytes"]
