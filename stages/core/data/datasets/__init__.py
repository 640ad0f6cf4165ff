"""Dataset and caption adapters: one module per dataset, each turning its own layout into manifests; the
registry module names them (``dataset.name``). Nothing is imported here, so a stage that reads images
(``stages.core.data.torch_dataset``) never imports every adapter."""
