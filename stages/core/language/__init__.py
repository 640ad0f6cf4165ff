"""Language: frozen text encoders, prompts, ImageNet classifiers and pseudo-labels (PLG), and the
language-guidance targets (ELG, PLG and the controls) that training reads from the caches."""
