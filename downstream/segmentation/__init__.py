"""ADE20K-style semantic segmentation: UperNet on a multi-scale pyramid of ViT blocks."""
