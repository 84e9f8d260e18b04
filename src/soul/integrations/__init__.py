"""Bridges to other training stacks: `soul.integrations.transformers` (Sophia inside `transformers.Trainer`)."""
