"""Checkpoint -> ONNX (installed as `center_embed.export`; needs torch and onnx).

    onnx_export  export_checkpoint(): the graph, its metadata, the atomic write (needs torch)
    calibrate    the held-out images and the unknown threshold computed on them
    verify       onnx.checker, torch/onnxruntime parity, accuracy through onnxruntime
    quantize     static int8 (QDQ) of the backbone

Importing this package imports nothing else.
"""
