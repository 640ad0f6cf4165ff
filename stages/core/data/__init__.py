"""Data: dataset and caption adapters (``datasets/``, one path-confinement check for all), the torch
dataset, the class-balanced sampler, the decoded-image cache and batched on-device augmentation."""
