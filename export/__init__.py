"""Checkpoint -> ONNX, and opening ONNX models.

    runtime      the torch-free side: onnxruntime sessions, metadata, OnnxModel (serving uses it)
    onnx_export  export_checkpoint(): the graph, its metadata, the atomic write (needs torch)
    calibrate    the held-out images and the unknown threshold computed on them
    verify       onnx.checker, torch/onnxruntime parity, accuracy through onnxruntime
    quantize     static int8 (QDQ) of the backbone
    cli          `center-embed export | verify | inspect`

Importing this package imports nothing else.
"""
