"""unigendet: one model that generates images and detects AI-generated ones, with explanations."""

__version__ = "0.1.0"
