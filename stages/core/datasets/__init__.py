"""Dataset adapters (one module each, registered in ``base.DATASETS`` and imported on first lookup)
and the torch Dataset over a manifest (``torch_dataset.ImageDataset``).

Nothing is imported here, so a stage that reads images never imports every adapter.
"""
