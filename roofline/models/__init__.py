"""Model families, one file each; `registry.model_class` picks the class for a ModelConfig."""
