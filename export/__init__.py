"""Checkpoint -> ONNX, and what is done to an exported file (installed as
`center_embed.export`; needs onnx, and torch for everything that reads a checkpoint).

    onnx_export     export_checkpoint(): the graph, its metadata, the atomic write (torch)
    atypicality     the `atypicality` output: fitted on training images' feature statistics
    calibrate       the held-out images and the unknown thresholds computed on them
    verify          onnx.checker, torch/onnxruntime parity, accuracy through a runtime
    quantize        static int8 (QDQ) of the backbone
    enrolled_model  a copy of a model with enrolled classes (`enroll`; onnx, never torch)
    triton          the file as a Triton model repository (config.pbtxt; no torch)

Importing this package imports nothing else. The ONNX contract: docs/export.md.
"""
