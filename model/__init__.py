"""MiMo-V2 and DFlash definitions: configs, checkpoint formats, PyTorch references."""
