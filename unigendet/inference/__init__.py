"""Inference: detection scoring (head), and later text explanations and image generation."""
