"""The Hugging Face `transformers` wing: decoder layers of any causal LM (`layers`), hooks on the
residual stream (`hooks`) and hidden-state means of conversations (`hidden`). No vLLM here."""
