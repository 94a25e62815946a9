"""Conversation -> model inputs, and token ids -> text events."""
