"""Runs inside vLLM's worker process (``LLM(worker_extension_cls=...)``): receives pushed weights.

Kept tiny and free of lit_rlhf imports: the worker imports it by name. Tensors do not survive
vLLM's RPC between processes, so weights travel as safetensors bytes; vLLM's layer-wise reload
takes Hugging Face names and re-fuses and re-packs them into its own layers.
"""

from __future__ import annotations


class WeightReceiver:
    """Mixed into vLLM's worker: ``llm.collective_rpc("load_weight_chunk", args=(blob,))``."""

    def load_weight_chunk(self, blob: bytes) -> int:
        """Load the whole layers in ``blob`` (safetensors bytes); returns how many tensors it held."""
        from safetensors.torch import load

        weights = load(blob)
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)
