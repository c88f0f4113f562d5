"""Adapters to the frameworks people already use: the transformers text-generation pipeline and its model facade."""
