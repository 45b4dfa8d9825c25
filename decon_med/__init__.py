"""decon-med: encoder-decoder contrastive pre-training (DeCon) and low-label fine-tuning for medical segmentation."""

__version__ = "0.1.0"
