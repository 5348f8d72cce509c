"""Stop strings (``generation.stop_strings``): the token at which a response's text first holds one.

Both rollout engines stop a row at the same token by the same rule, :meth:`StopStrings.completed`:
after each sampled token the text of the row's last few tokens is decoded (special tokens skipped)
and searched for every stop string. The token that completed a stop string is kept, with its
log-prob, and nothing after it, so the response ids are exactly the sampled ids and the text the
rewards read (the decode of those ids) contains the stop string. Only a tail is decoded, as vLLM's
own incremental detokenizer does, so a check costs the same at every length: the tail is the
longest stop string in characters plus a few tokens, enough for a string that spans tokens and
for a first token whose leading space a decoder drops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LOOK_BACK = 4  # tokens decoded beyond the longest stop string's length (see the module docstring)


class StopStrings:
    """Decides which rows have just completed a stop string.

    Args:
        tokenizer: the policy's tokenizer (decodes the sampled ids).
        strings: the stop strings (``generation.stop_strings``, non-empty).
    """

    def __init__(self, tokenizer, strings: Sequence[str]) -> None:
        if tokenizer is None:
            raise ValueError(
                "generation.stop_strings needs the policy's tokenizer to decode responses: load the actor with "
                "Actor.from_pretrained(path, tokenizer) or pass Actor(..., tokenizer=...)"
            )
        self.tokenizer, self.strings = tokenizer, tuple(strings)
        self.window = max(len(s) for s in self.strings) + LOOK_BACK

    def completed(self, responses: Tensor) -> Tensor:
        """``[R]`` bool: the text of row ``r``'s last :attr:`window` tokens contains a stop string.

        ``responses [R, T]``: each row's response ids so far (its newest token last).
        """
        tails = responses[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        hits = [any(s in text for s in self.strings) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=responses.device)

    def first_stop(self, ids: Sequence[int]) -> int | None:
        """Index of the token at which ``ids`` (one response) first completes a stop string, or None.

        The same rule as :meth:`completed` applied after every token (for responses sampled elsewhere).
        """
        if not ids:
            return None
        ends = list(range(1, len(ids) + 1))
        tails = [list(ids[max(0, end - self.window) : end]) for end in ends]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return next(
            (end - 1 for end, text in zip(ends, texts, strict=True) if any(s in text for s in self.strings)), None
        )
