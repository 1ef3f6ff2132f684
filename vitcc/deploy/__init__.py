"""Deployment: ONNX export and its check, and timing the compact model against the dense one."""
