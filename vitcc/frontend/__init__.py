"""Getting a model in: model specs (timm:, hf:, torchvision:, py:, files), safe loading, input shapes, capture."""
