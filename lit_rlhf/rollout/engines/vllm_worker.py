"""Runs inside vLLM's worker process (``LLM(worker_extension_cls=...)``): receives pushed weights.

Kept tiny and free of lit_rlhf imports: the worker imports it by name. Three ways in, one per
transport (``VLLMEngine.transport``):

- ``cuda_ipc``: an engine spawned on the trainer's GPU gets each bucket of weights as one CUDA IPC
  handle of a flat device buffer (no copy through the host); the worker maps it, loads the views and
  lets go before it returns;
- ``in_process``: an engine in the trainer's own process (tensor parallelism, vLLM's external
  launcher) gets the device tensors themselves;
- ``safetensors``: on CPU, tensors do not survive vLLM's RPC between processes, so weights travel as
  safetensors bytes.

vLLM's layer-wise reload takes Hugging Face names and re-fuses and re-packs them into its own layers,
so a bucket always holds whole decoder layers.
"""

from __future__ import annotations

import pickle
from typing import Any

# one bucket's layout: (name, shape, first element, element count) of each tensor in its flat buffer
Layout = list[tuple[str, tuple[int, ...], int, int]]


def pack_bucket(named: list[tuple[str, Any]]) -> tuple[Any, Layout]:
    """One flat buffer holding ``named``'s tensors (all of one dtype and device), and their layout."""
    import torch

    layout: Layout = []
    start = 0
    for name, tensor in named:
        layout.append((name, tuple(tensor.shape), start, tensor.numel()))
        start += tensor.numel()
    return torch.cat([tensor.reshape(-1) for _, tensor in named]), layout


def unpack_bucket(buffer: Any, layout: Layout) -> list[tuple[str, Any]]:
    """The named views of ``buffer`` that ``pack_bucket`` laid out (no copy)."""
    return [(name, buffer[start : start + count].view(shape)) for name, shape, start, count in layout]


def ipc_handle(buffer: Any) -> bytes:
    """A CUDA IPC handle of ``buffer``, pickled (vLLM's RPC carries bytes, not torch objects).

    The sender keeps ``buffer`` alive until the receiver returns, and calls ``torch.cuda.ipc_collect()``
    afterwards so that its memory is freed once the receiver has let go."""
    from torch.multiprocessing.reductions import reduce_tensor

    return pickle.dumps(reduce_tensor(buffer))


def open_ipc_handle(handle: bytes, device_index: int) -> Any:
    """The tensor behind ``handle``, mapped on this process's ``device_index``: the sender numbered
    its GPU in its own CUDA_VISIBLE_DEVICES, and a spawned engine sees only that GPU, as cuda:0."""
    rebuild, args = pickle.loads(handle)
    args = list(args)
    args[6] = device_index  # rebuild_cuda_tensor's storage_device
    return rebuild(*args)


def refresh_tied_head(model: Any) -> bool:
    """Re-process an output layer tied to the input embedding after a reload; returns whether it did.

    vLLM's layer-wise reload processes each layer whose weights arrive (on CPU: re-packs the GEMM
    weight, ``cpu_linear``); a tied head receives none (its weight *is* the embedding's), so its
    packed copy would keep the weights it started with (the dummy ones) and every log-prob would be
    off. Re-running its weight processing packs the current, shared weight (a no-op on a GPU)."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or not any(m is not head and getattr(m, "weight", None) is weight for m in model.modules()):
        return False  # no head, or one loaded as a layer of its own
    method = getattr(head, "quant_method", None)
    if method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(head)
    return True


class WeightReceiver:
    """Mixed into vLLM's worker: ``llm.collective_rpc("load_weight_chunk", args=(blob,))`` and the like.
    A push ends with ``collective_rpc("weights_loaded")``."""

    def weights_loaded(self) -> bool:
        """After the last bucket of a push: re-process what the reload skipped (a tied output layer)."""
        return refresh_tied_head(self.model_runner.get_model())

    def load_weight_chunk(self, blob: bytes) -> int:
        """Load the whole layers in ``blob`` (safetensors bytes); returns how many tensors it held."""
        from safetensors.torch import load

        weights = load(blob)
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)

    def load_weight_ipc(self, handle: bytes, layout: Layout) -> int:
        """Load one bucket sent as a CUDA IPC handle (``ipc_handle``); returns how many tensors it held."""
        import torch

        buffer = open_ipc_handle(handle, torch.cuda.current_device())
        self.reload_weights(weights_iterator=iter(unpack_bucket(buffer, layout)))
        torch.cuda.synchronize()  # every copy out of the sender's memory is done before it may reuse it
        del buffer
        return len(layout)

    def load_weight_tensors(self, named: list[tuple[str, Any]]) -> int:
        """Load device tensors handed over in the trainer's own process; returns how many."""
        self.reload_weights(weights_iterator=iter(named))
        return len(named)
