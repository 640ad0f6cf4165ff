"""Image-text retrieval (DivE's own task): ragged token-set storage, the two-tower set model, and its
objective for the shared training loop."""
