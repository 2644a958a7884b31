"""ImageNet-style classification of a pre-trained encoder: k-NN, linear probe, fine-tuning."""
