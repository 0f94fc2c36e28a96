//! Checkpoints: official torch.save files, safetensors, key handling and resizing.
