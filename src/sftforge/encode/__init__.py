"""Conversations -> tokens + labels -> batches: the chat templates, rendering, the Encoder that builds input_ids and labels in lockstep with its proof, encoding at scale, and micro-batches."""
