"""resnext: transfer learning for image classification with the ResNet / ResNeXt family."""

__version__ = "0.1.0"
