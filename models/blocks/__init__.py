"""Blocks beyond Llama's attention and MLP, each written once over the backend ops."""
