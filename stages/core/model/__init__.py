"""Model: backbones, embedding heads (linear, DivE's slot head) and the similarity spec each head carries."""
