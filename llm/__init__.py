"""llm: a trainer for language-model architecture research."""
