"""Adapter tests use tiny models: one torch thread avoids large slowdowns from thread handoffs on busy cores."""

import torch

torch.set_num_threads(1)
