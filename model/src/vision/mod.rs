//! Vision encoders: Swin (swin), CLIP-ViT and DeiT (vit).
