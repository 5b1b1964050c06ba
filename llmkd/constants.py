"""Constants shared across llmkd's layers; this module imports nothing, so any module may import it."""

#: The label of a position that is not trained on (prompt tokens, padding, masked turns): what Hugging Face models
#: and ``torch.nn.functional.cross_entropy`` ignore by default.
IGNORE_INDEX = -100
