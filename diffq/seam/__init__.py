"""The layer seam: what a DiT matmul runs, described by a static `LayerSpec` of independent parts.

A layer's spec composes, in the order `Linear` runs them (diffq/models/layers.py):

    smoothing (x / s, W * s)  ->  input part (none | static per-step | dynamic | MoDiff modulated)
      ->  weight part (float | scalar fake-quant | integer codes | additive VQ) of W + A B (LoRA)
      ->  matmul part (float operands | int8 codes with int32 accumulation) + bias
      ->  output cache part (none | reuse | increment-calibrated low rank, ICC)

Each part declares its variables (`variables`), the calibration statistics it needs (`stats`), its trainable
leaves with their learning-rate group (`trainable`), its deployed form (`deployed`) and, for weights, its stored
bits. Parts know nothing of the DiT, and of each other only the matmul part knows the operands its input and
weight parts describe (`affine`); a method is a choice of parts, never a branch in `Linear`.
Config rules map layer globs to specs (`spec.resolve`, `rules.from_config`).
"""
