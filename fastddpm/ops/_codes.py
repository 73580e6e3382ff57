"""Integer codes of the C++ schemas (csrc/include/fastddpm/elementwise.h)."""

PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
VARIANCE_TYPES = {
    "fixed_small": 0,
    "fixed_small_log": 1,
    "fixed_large": 2,
    "learned": 4,
    "learned_range": 5,
}
NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2
