"""Reasoning: SAE steering, thinking control and the memory agent."""
