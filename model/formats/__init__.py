"""Quantized weight formats of MiMo-V2 hub checkpoints.

- `fp8`: FP8 E4M3 with one fp32 `scale_inv` per 128x128 block (the DeepSeek-V3 style layout).
- `mxfp4`: OCP Microscaling v1.0 FP4 (E2M1 codes, one E8M0 scale per 32 elements along K).

Each module turns float matrices into the stored tensors and back; nothing here knows tensor names.
"""
