"""COCO-style detection and instance segmentation: Mask R-CNN on a ViTDet simple pyramid."""
