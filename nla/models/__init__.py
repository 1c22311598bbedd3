"""The models: finding and loading them, the block-K backbone, injection, LoRA, the AV, the AR, the pair."""
