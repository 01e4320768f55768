"""ptekit's model and file side: configs, the decoder, checkpoints, tokenizers, lowering to .pte."""
