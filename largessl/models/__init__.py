"""What the encoder is. Single-device PyTorch; nothing here imports deepspeed (`config` imports no torch)."""
